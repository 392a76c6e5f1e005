"""Hugging Face export: a moe_lm run or checkpoint -> a `transformers` model directory.

Writes `config.json` + `model.safetensors` that `transformers.AutoModelForCausalLM` loads as
Mixtral, Qwen3-MoE or OLMoE (hf_build picks the family) with the same logits in fp32. A Hugging
Face tokenizer goes along (its files are copied); a tiktoken one is named in
`moe_lm_tokenizer.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moe_lm.data.tokenizer import HFTokenizer
from moe_lm.inference import load_model
from moe_lm.interop.hf_build import build_hf_model, export_problems
from moe_lm.interop.import_hf import TOKENIZER_FILES
from moe_lm.interop.tokenizer_note import NOTE_NAME, tokenizer_note

SHARE_NOTE = "moe_lm_shared_layers.txt"  # written when shared blocks were unrolled


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Loads a checkpoint and writes the transformers model and its tokenizer to `out_dir`."""
    loaded = load_model(path, device="cpu")
    hf, _ = build_hf_model(loaded)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    _share_note(out_dir, loaded.cfg.model.share_layers)
    tok = loaded.tokenizer
    if isinstance(tok, HFTokenizer):
        for name in TOKENIZER_FILES:
            if (tok.files_dir / name).is_file() and name != "generation_config.json":
                shutil.copy2(tok.files_dir / name, out_dir / name)
        return out_dir
    note = tokenizer_note(tok, loaded.ckpt.path)  # a recipe that works offline for cl100k_base
    (out_dir / NOTE_NAME).write_text(json.dumps(note, indent=1))
    return out_dir


def _share_note(out_dir: Path, share_layers: int) -> None:
    """Says in the directory that shared blocks were unrolled (HF formats cannot share layers)."""
    path = out_dir / SHARE_NOTE
    if share_layers > 1:
        path.write_text(f"This model was trained with model.share_layers={share_layers}: each "
                        f"group of {share_layers} consecutive layers shares one block. Hugging "
                        "Face formats have no cross-layer sharing, so the export holds one copy "
                        "of each block per layer (same logits, a larger file).\n")
    elif path.exists():
        path.unlink()


__all__ = ["SHARE_NOTE", "export", "export_problems", "export_summary"]


def export_summary(out_dir: Path) -> str:
    """One line saying what was written."""
    cfg = json.loads((out_dir / "config.json").read_text())
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    return (f"wrote {out_dir} ({cfg['architectures'][0]}: {cfg['num_hidden_layers']} layers, "
            f"{experts} experts, top-{cfg['num_experts_per_tok']}); load it with "
            f"transformers.AutoModelForCausalLM.from_pretrained({str(out_dir)!r})."
            + _tokenize_hint(out_dir)
            + (f"\n{(out_dir / SHARE_NOTE).read_text().strip()}" if (out_dir / SHARE_NOTE).is_file()
               else ""))


def _tokenize_hint(out_dir: Path) -> str:
    """For a tiktoken model: how to tokenize (from moe_lm_tokenizer.json); else nothing."""
    path = Path(out_dir) / NOTE_NAME
    if not path.is_file():
        return ""
    note = json.loads(path.read_text())
    return f"\ntokenize with: {note['usage']}  ({note['requires']})"
