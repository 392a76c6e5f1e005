"""The exported model's tokenizer recipe works with no network, and tokenizes as moe_lm does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moe_lm.data import get_tokenizer
from moe_lm.interop.hf_export import export

TEXT = "def main():\n    print('héllo, wörld') <|endoftext|> 12345"

# sockets refuse to connect and tiktoken's cache is empty: only a bundled BPE file can load
NO_NETWORK = """
import socket
def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.create_connection = refuse
"""


def run_offline(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"),
           "HOME": str(tmp_path), "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", NO_NETWORK + code], env=env, text=True,
                          capture_output=True, timeout=120)


def test_exported_tokenizer_recipe_loads_offline_and_matches_moe_lm(tiny_run, tmp_path):
    pytest.importorskip("transformers")
    out = export(tiny_run, tmp_path / "hf")
    note = json.loads((out / "moe_lm_tokenizer.json").read_text())
    assert note["encoding"] == "cl100k_base" and note["offline"] is True
    code = note["python"] + f"\nprint(list(enc.encode_ordinary({TEXT!r})), enc.eot_token)"
    proc = run_offline(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = get_tokenizer("cl100k_base")
    assert proc.stdout.split()[-1] == str(note["eot_id"]) == str(expected.eot_id)
    assert proc.stdout.rsplit(" ", 1)[0].strip() == str(expected.encode(TEXT))


def test_plain_cl100k_base_needs_the_network_the_recipe_avoids(tmp_path):
    """The reference the recipe is checked against: tiktoken's own name fails in this sandbox."""
    proc = run_offline("import tiktoken; tiktoken.get_encoding('cl100k_base')", tmp_path)
    assert proc.returncode != 0 and "cl100k_base.tiktoken" in proc.stderr  # tried to download
