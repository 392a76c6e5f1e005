"""Hugging Face import: a local Mixtral / Qwen3-MoE / OLMoE directory -> a moe_lm run directory.

The result is a normal run directory at step 0 (`.hydra/config.yaml` with the derived model and
expert settings, `checkpoints/step_0000000/` in torch.distributed.checkpoint format, the model's
tokenizer under `tokenizer/`, the source `config.json` as `hf_config.json`), so every tool reads
it unchanged and `init.from_checkpoint=<dir>` trains on from it.

Everything is checked before anything is written: config.json (family, unsupported settings: see
hf_configs), every safetensors file (readable, not truncated), every tensor moe_lm needs (present,
with the shape config.json implies), no tensor left over (a bias, say), the tokenizer. Then the
checkpoint is written one tensor at a time: each moe_lm tensor is built from its HF tensors read
one by one (an expert stack: the result plus one expert matrix) and written before the next is
made, so memory holds about one tensor beyond the process itself, never the model. Tensors keep
their stored dtype (bf16 stays bf16; loading into an fp32 model is exact). The run directory is
assembled under `<out>.partial` and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moe_lm.config import DataConfig, LossConfig, TrainConfig, validate
from moe_lm.data.tokenizer import HFTokenizer, get_tokenizer
from moe_lm.errors import CheckpointError, ConfigError, MoeLMError
from moe_lm.interop.hf_configs import Derived, derive, read_hf_config
from moe_lm.interop.hf_weights import IGNORED_SUFFIXES, Recipe, import_recipes
from moe_lm.interop.safetensors_dir import SafetensorsDir
from moe_lm.model import Transformer
from moe_lm.training.checkpoint import model_identity, save_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def plan_import(hf_dir: Path, tokenizer: str | None = None):
    """Reads and checks everything; returns (derived settings, recipes, source, tokenizer)."""
    derived = derive(read_hf_config(hf_dir))
    source = SafetensorsDir(hf_dir)
    recipes = import_recipes(derived.family, derived.model, derived.expert, source.__contains__)
    check_sources(recipes, source, derived)
    check_targets(recipes, derived)
    tok = get_tokenizer(tokenizer) if tokenizer else _hf_dir_tokenizer(hf_dir)
    if tok.n_vocab > derived.model.vocab_size:
        raise ConfigError(f"The tokenizer has {tok.n_vocab} tokens but config.json's vocab_size "
                          f"is {derived.model.vocab_size}: pass the model's own tokenizer.")
    return derived, recipes, source, tok


def _hf_dir_tokenizer(hf_dir: Path) -> HFTokenizer:
    if not (hf_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{hf_dir} has no tokenizer.json: pass --tokenizer PATH (a directory "
                          "with the model's tokenizer.json, or that file).")
    return HFTokenizer(hf_dir)


def check_sources(recipes: list[Recipe], source: SafetensorsDir, derived: Derived) -> None:
    """Every HF tensor a recipe needs exists with the expected shape; none is left unused."""
    used: set[str] = set()
    for r in recipes:
        for name, shape in r.sources.items():
            if name not in source:
                raise CheckpointError(f"The checkpoint has no tensor {name!r}, which a "
                                      f"{derived.family} model with this config.json needs: the "
                                      "weights and config.json do not belong together, or a "
                                      "shard is missing.")
            if source.shape(name) != shape:
                raise CheckpointError(f"Tensor {name!r} has shape {list(source.shape(name))}, but "
                                      f"config.json implies {list(shape)}: the weights and "
                                      "config.json do not belong together.")
            used.add(name)
    tied_head = {"lm_head.weight"} if derived.model.tie_embeddings else set()
    left = [n for n in source.names() if n not in used and n not in tied_head
            and not n.endswith(IGNORED_SUFFIXES)]
    if left:
        raise CheckpointError(f"The checkpoint holds {len(left)} tensor(s) moe_lm has no place "
                              f"for (e.g. {', '.join(left[:3])}): biases, extra modules or another "
                              "architecture. Nothing was written.")


def check_targets(recipes: list[Recipe], derived: Derived) -> None:
    """The recipes make exactly moe_lm's state dict for the derived config (names and shapes)."""
    with torch.device("meta"):
        model = Transformer(derived.model, derived.expert, LossConfig())
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {r.target: r.shape for r in recipes}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:3]
        raise MoeLMError(f"moe_lm's importer and model disagree on the weights ({diff}); "
                         "this is a bug in moe_lm.interop.")


def run_config(derived: Derived, tokenizer_spec: str) -> TrainConfig:
    """The run's config: moe_lm's defaults with the imported model, experts and tokenizer."""
    base = TrainConfig()
    cfg = replace(base, model=derived.model, expert=derived.expert,
                  loss=replace(base.loss, aux_coef=derived.aux_coef),
                  data=replace(DataConfig(), tokenizer=tokenizer_spec))
    validate(cfg)
    return cfg


def import_hf(hf_dir: str | Path, out_dir: str | Path, tokenizer: str | None = None) -> Path:
    """Imports `hf_dir` into the new run directory `out_dir` (which must not exist yet)."""
    hf_dir, out_dir = Path(hf_dir).expanduser(), Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} already exists and is not empty; moe_lm never writes over "
                          "a directory. Choose a new output directory.")
    derived, recipes, source, tok = plan_import(hf_dir, tokenizer)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / ".hydra").mkdir(parents=True)
    spec = str(out_dir / "tokenizer")
    if isinstance(tok, HFTokenizer):
        (partial / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (tok.files_dir / name).is_file():
                shutil.copy2(tok.files_dir / name, partial / "tokenizer" / name)
    else:
        spec = tok.name
    cfg = run_config(derived, spec)
    OmegaConf.save(OmegaConf.structured(cfg), partial / ".hydra" / "config.yaml")
    shutil.copy2(hf_dir / "config.json", partial / "hf_config.json")
    by_key = {f"model.{r.target}": r for r in recipes}
    shapes = {r.target: torch.empty(r.shape, dtype=_dtype(r, source), device="meta")
              for r in recipes}

    def produce(key: str) -> torch.Tensor:
        r = by_key[key]
        t = r.build(source.read).contiguous()
        if tuple(t.shape) != r.shape:
            raise MoeLMError(f"built {r.target} with shape {list(t.shape)}, expected "
                             f"{list(r.shape)}: a bug in moe_lm.interop.")
        return t

    save_weights(partial, 0, shapes, produce, model_identity(cfg, tok.name))
    note = {"source": str(hf_dir.resolve()), "family": derived.family,
            "tokenizer": tok.name, "bytes": source.nbytes}
    (partial / "import.json").write_text(json.dumps(note, indent=1))
    partial.rename(out_dir) if not out_dir.exists() else _move_into(partial, out_dir)
    return out_dir


def _dtype(r: Recipe, source: SafetensorsDir) -> torch.dtype:
    return source.dtype(next(iter(r.sources))) if r.sources else torch.float32


def _move_into(partial: Path, out_dir: Path) -> None:
    """`out_dir` exists but is empty: move the finished contents in, then drop `partial`."""
    for child in partial.iterdir():
        child.rename(out_dir / child.name)
    partial.rmdir()
