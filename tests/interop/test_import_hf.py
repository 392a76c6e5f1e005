"""Import from transformers' own Mixtral / Qwen3-MoE / OLMoE models, and export back, exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from moe_lm.inference.generate import generate_tokens
from moe_lm.inference import load_model
from moe_lm.interop.hf_export import export
from moe_lm.interop.import_hf import import_hf
from tests.interop.conftest import VOCAB, hf_config, save_hf_model, transformers

REL_TOL = 1e-5


def _ids(seed: int = 0, shape=(2, 40)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def test_imported_logits_and_greedy_generation_equal_transformers(family, tmp_path):
    hf = save_hf_model(tmp_path / "hf", hf_config(family))
    loaded = load_model(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu")
    ids = _ids()
    with torch.no_grad():
        diff = _rel_diff(loaded.model(ids).logits, hf(ids).logits)
    print(f"{family}: max |logit difference| / max |logit| = {diff:.2e}")
    assert diff <= REL_TOL
    prompt = ids[0, :8].tolist()
    ours = list(generate_tokens(loaded.model, prompt, 32))
    hf.generation_config.eos_token_id = None  # 32 tokens on both sides, whatever they are
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert len(ours) == 32 and ours == theirs[0, 8:].tolist()


def test_import_then_export_gives_back_the_same_model(family, tmp_path):
    hf = save_hf_model(tmp_path / "hf", hf_config(family, tie_word_embeddings=family == "olmoe"))
    out = export(import_hf(tmp_path / "hf", tmp_path / "run"), tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(hf)
    want, got = hf.state_dict(), again.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    ids = _ids(1)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in written.items() if original.get(k) != v} == {}
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()


def test_sharded_safetensors_import_like_one_file(tmp_path):
    hf = save_hf_model(tmp_path / "hf", hf_config("qwen3_moe"), max_shard_size="100KB")
    shards = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    loaded = load_model(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu")
    ids = _ids(2)
    with torch.no_grad():
        assert _rel_diff(loaded.model(ids).logits, hf(ids).logits) <= REL_TOL


CHILD = """
import gc, sys
from pathlib import Path
from moe_lm.interop.import_hf import import_hf, plan_import

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

plan_import(Path(sys.argv[1]))  # loads every module the import uses; reads headers only
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
base = status("VmRSS:")
import_hf(sys.argv[1], sys.argv[2])
print(status("VmHWM:") - base)
"""


def test_import_peak_memory_stays_far_below_the_model_size(tmp_path):
    """A model of ~80 MB (fp32) imports with under a third of that in extra peak RSS."""
    config = hf_config("mixtral", hidden_size=256, num_hidden_layers=6, intermediate_size=512)
    save_hf_model(tmp_path / "hf", config)
    model_bytes = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors"))
    limit = model_bytes // 3
    # a fixed mmap threshold returns every freed tensor to the OS at once; glibc's default one
    # adapts and may keep a few freed small tensors in the heap, which would make the peak noisy
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "hf"), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split()[-1])
    print(f"model {model_bytes / 2**20:.1f} MiB, import peak RSS growth {growth / 2**20:.1f} MiB")
    assert growth < limit
    assert (tmp_path / "run" / "checkpoints" / "step_0000000" / "meta.json").is_file()
