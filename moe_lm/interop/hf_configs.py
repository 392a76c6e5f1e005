"""Hugging Face `config.json` <-> moe_lm settings for Mixtral, Qwen3-MoE and OLMoE.

The three families differ from moe_lm's own model only in switches moe_lm has as config keys:

| HF setting | Mixtral | Qwen3-MoE | OLMoE | moe_lm key |
|---|---|---|---|---|
| q/k RMSNorm | none | per head (`q_norm` over head_dim) | whole projection | `model.qk_norm` none/head/proj |
| top-k weights renormalised | yes | `norm_topk_prob` | `norm_topk_prob` | `expert.norm_topk_prob` |
| head width | `head_dim` | `head_dim` | hidden / heads | `model.head_dim` (0 = d_model / n_heads) |
| dense layers | none | `mlp_only_layers`, `decoder_sparse_step` | none | `model.n_dense_layers`, `model.moe_every` |
| q/k/v clipping | none | none | `clip_qkv` | `model.clip_qkv` |

and `rms_norm_eps` (`model.norm_eps`), the rotary base (`model.rope_theta`), `tie_word_embeddings`,
`router_jitter_noise` (`expert.jitter`; moe_lm jitters the router's input only) and
`router_aux_loss_coef` (`loss.aux_coef`). The rotary layout needs no switch: HF rotates halves of
each head, moe_lm consecutive pairs, and the converters permute the query/key rows (hf_weights).

Settings moe_lm cannot express are refused before anything is written, naming the key: biases,
sliding-window attention, rotary scaling, other activations, attention dropout, quantized weights,
dense-layer patterns that `n_dense_layers`/`moe_every` cannot reproduce, and any other
`model_type` (MLA models such as DeepSeek-V3, attention sinks as in gpt-oss, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_lm.config import ExpertConfig, ModelConfig
from moe_lm.errors import ConfigError
from moe_lm.model import is_moe_layer

FAMILIES = ("mixtral", "qwen3_moe", "olmoe")


@dataclass
class Derived:
    """What an HF config becomes in moe_lm: the model, the experts and the balance-loss weight."""

    family: str
    model: ModelConfig
    expert: ExpertConfig
    aux_coef: float
    eos_token_id: int | None
    bos_token_id: int | None


def read_hf_config(hf_dir: Path):
    """The directory's config as transformers' own config class (its defaults filled in)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass a local Hugging Face model directory "
                          "(config.json + model.safetensors or its shards).")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}). Restore the model's config.json.") from err
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{path}: model_type={model_type!r} cannot be imported; moe_lm imports "
                          f"{', '.join(FAMILIES)} (other architectures, e.g. MLA or attention "
                          "sinks, have no moe_lm equivalent).")
    try:
        from transformers import AutoConfig
    except ImportError as err:
        raise ConfigError("Importing needs the transformers package: pip install "
                          "'moe-lm[hf]'.") from err
    try:
        return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception as err:  # transformers validates the fields (strict dataclasses)
        raise ConfigError(f"transformers rejects {path} ({type(err).__name__}: {err}). Fix that "
                          "key of config.json.") from err


def rope_theta(c) -> float:
    """The rotary base, refusing scaled rotary variants (transformers 4.x and 5.x spellings)."""
    params = getattr(c, "rope_parameters", None) or {}
    scaling = getattr(c, "rope_scaling", None)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ConfigError(f"config.json: rotary scaling rope_type={kind!r} (rope_parameters / "
                          "rope_scaling) is not supported: moe_lm has plain rotary only.")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported.")
    return float(params.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def _refuse_unsupported(c) -> None:
    problems = []
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (moe_lm's MLPs are SwiGLU: silu)")
    if getattr(c, "attention_bias", False):
        problems.append("attention_bias=true (moe_lm's projections have no bias)")
    if getattr(c, "use_sliding_window", False) or (
            c.model_type == "mixtral" and getattr(c, "sliding_window", None) is not None):
        problems.append(f"sliding_window={c.sliding_window} (moe_lm attends to the whole "
                        "sequence; set it to null only if your sequences never exceed it)")
    if getattr(c, "attention_dropout", 0.0):
        problems.append(f"attention_dropout={c.attention_dropout} (moe_lm has no dropout)")
    if getattr(c, "quantization_config", None):
        problems.append("quantization_config (quantized weights: import the unquantized model)")
    if problems:
        raise ConfigError("config.json has settings moe_lm cannot express: " + "; ".join(problems)
                          + ". Nothing was written.")


def _dense_pattern(c, n_layers: int) -> tuple[int, int]:
    """(n_dense_layers, moe_every) reproducing Qwen3-MoE's mlp_only_layers / decoder_sparse_step."""
    if c.model_type != "qwen3_moe":
        return 0, 1
    only, step = set(c.mlp_only_layers or []), c.decoder_sparse_step
    moe = [i not in only and (i + 1) % step == 0 for i in range(n_layers)]
    for n_dense in range(n_layers + 1):
        for every in range(1, n_layers + 1):
            probe = ModelConfig(n_layers=n_layers, n_dense_layers=n_dense, moe_every=every)
            if [is_moe_layer(i, probe) for i in range(n_layers)] == moe:
                return n_dense, every
    raise ConfigError(f"config.json: mlp_only_layers={sorted(only)} with decoder_sparse_step={step} "
                      "puts dense layers where moe_lm cannot (it has first-N-dense, then MoE every "
                      "M-th layer: model.n_dense_layers, model.moe_every).")


def derive(c) -> Derived:
    """moe_lm settings for an HF config of one of the three families (ConfigError if not exact)."""
    _refuse_unsupported(c)
    family = c.model_type
    L, D, H = c.num_hidden_layers, c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or D // H
    n_dense, every = _dense_pattern(c, L)
    E = c.num_local_experts if family == "mixtral" else c.num_experts
    expert_hidden = c.moe_intermediate_size if family == "qwen3_moe" else c.intermediate_size
    model = ModelConfig(
        n_layers=L, d_model=D, n_heads=H, n_kv_heads=c.num_key_value_heads or H,
        ffn_hidden=c.intermediate_size, n_dense_layers=n_dense, moe_every=every,
        vocab_size=c.vocab_size, rope_theta=rope_theta(c), norm_eps=float(c.rms_norm_eps),
        tie_embeddings=bool(c.tie_word_embeddings), init_std=float(c.initializer_range),
        head_dim=0 if head_dim * H == D else head_dim,
        qk_norm={"mixtral": "none", "qwen3_moe": "head", "olmoe": "proj"}[family],
        clip_qkv=float(getattr(c, "clip_qkv", None) or 0.0))
    expert = ExpertConfig(
        num_experts=E, top_k=c.num_experts_per_tok, hidden_size=expert_hidden,
        capacity_factor=0.0, num_shared=0, router="softmax",
        jitter=float(getattr(c, "router_jitter_noise", 0.0) or 0.0),
        norm_topk_prob=True if family == "mixtral" else bool(c.norm_topk_prob))
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    return Derived(family, model, expert, float(c.router_aux_loss_coef), eos, c.bos_token_id)


def export_family(model: ModelConfig, expert: ExpertConfig, has_dense: bool) -> tuple[str | None, list[str]]:
    """The HF family a moe_lm model exports to exactly, or None with the reasons it cannot."""
    problems = []
    if expert.num_shared > 0:
        problems.append(f"expert.num_shared={expert.num_shared}: none of the families has shared experts")
    if expert.router != "softmax":
        problems.append(f"expert.router={expert.router}: the families route with softmax top-k")
    family = {"none": "mixtral", "head": "qwen3_moe", "proj": "olmoe"}[model.qk_norm]
    if family == "mixtral" and not expert.norm_topk_prob:
        problems.append("expert.norm_topk_prob=false without q/k norm: Mixtral renormalises "
                        "the top-k weights (OLMoE/Qwen3-MoE, which do not, have q/k norms)")
    if model.clip_qkv > 0 and family != "olmoe":
        problems.append("model.clip_qkv > 0: only OLMoE (model.qk_norm=proj) clips q/k/v")
    if has_dense and family == "olmoe":
        problems.append("dense layers (model.n_dense_layers / moe_every): OLMoE has only MoE layers")
    if family == "olmoe" and model.head_dim and model.head_dim * model.n_heads != model.d_model:
        problems.append("model.head_dim != d_model / n_heads: OLMoE has no head_dim setting")
    return (None if problems else family), problems


def hf_config_dict(family: str, model: ModelConfig, expert: ExpertConfig, aux_coef: float,
                   max_positions: int, eos_token_id: int | None,
                   bos_token_id: int | None) -> dict[str, Any]:
    """The keyword arguments of the family's transformers config class."""
    m, e = model, expert
    dense = [i for i in range(m.n_layers) if not is_moe_layer(i, m)]
    kw: dict[str, Any] = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, hidden_act="silu",
        max_position_embeddings=max_positions, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, num_experts_per_tok=e.top_k,
        router_aux_loss_coef=aux_coef, initializer_range=m.init_std,
        eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    if family == "mixtral":
        inter = max(e.hidden_size, m.ffn_hidden if dense else 0)  # dense layers: E copies, padded
        kw.update(intermediate_size=inter, num_local_experts=e.num_experts, head_dim=m.head_dim or None,
                  sliding_window=None, router_jitter_noise=e.jitter)
    elif family == "qwen3_moe":
        kw.update(intermediate_size=m.ffn_hidden, moe_intermediate_size=e.hidden_size,
                  num_experts=e.num_experts, head_dim=m.head_width, decoder_sparse_step=1,
                  mlp_only_layers=dense, norm_topk_prob=e.norm_topk_prob, use_sliding_window=False,
                  sliding_window=None, attention_bias=False)
    else:
        kw.update(intermediate_size=e.hidden_size, num_experts=e.num_experts,
                  norm_topk_prob=e.norm_topk_prob, clip_qkv=m.clip_qkv or None,
                  attention_bias=False, pad_token_id=None)
    return kw
