"""A loaded moe_lm model as the `transformers` model of its family (Mixtral, Qwen3-MoE or OLMoE).

The family follows from the model's switches (hf_configs.export_family): no q/k norm is Mixtral,
per-head q/k norm Qwen3-MoE, whole-projection q/k norm OLMoE. A run made by moe_lm.import_hf
keeps the source's `config.json` as `hf_config.json`; its token ids and position limit are
written back, so import -> export gives the original config and weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_lm.errors import ConfigError, MoeLMError
from moe_lm.interop.hf_configs import export_family, hf_config_dict
from moe_lm.interop.hf_weights import export_tensors, legacy_names
from moe_lm.model import is_moe_layer

CLASSES = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"),
           "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
           "olmoe": ("OlmoeConfig", "OlmoeForCausalLM")}


def export_problems(cfg, model) -> list[str]:
    """The settings of this model that no supported HF family expresses (empty when exact)."""
    m = cfg.model
    has_dense = any(not is_moe_layer(i, m) for i in range(m.n_layers))
    _, problems = export_family(m, cfg.expert, has_dense)
    biased = [name for name, buf in model.named_buffers()
              if name.endswith("score_bias") and bool(buf.abs().max() > 0)]
    if biased:
        problems.append(f"non-zero router score bias in {len(biased)} layer(s) (aux-loss-free "
                        "balancing, expert.bias_update_rate > 0): the HF routers have no bias")
    return problems


def _recorded_ids(run_dir: Path | None, cfg, eot_id: int) -> dict:
    """max_position_embeddings and special-token ids: the imported source's, else the run's."""
    src = run_dir / "hf_config.json" if run_dir is not None else None
    if src is not None and src.is_file():
        raw = json.loads(src.read_text())
        return {"max_positions": raw.get("max_position_embeddings", cfg.data.seq_len),
                "eos_token_id": raw.get("eos_token_id"), "bos_token_id": raw.get("bos_token_id"),
                "pad_token_id": raw.get("pad_token_id")}
    return {"max_positions": cfg.data.seq_len, "eos_token_id": eot_id, "bos_token_id": None,
            "pad_token_id": None}


def build_hf_model(loaded):
    """(transformers model in fp32 eval mode holding the loaded weights, its family name)."""
    try:
        import transformers
    except ImportError as err:
        raise MoeLMError("Exporting needs the transformers package: pip install "
                         "'moe-lm[hf]'.") from err
    cfg, model = loaded.cfg, loaded.model
    problems = export_problems(cfg, model)
    if problems:
        raise ConfigError("This model cannot be exported as Mixtral, Qwen3-MoE or OLMoE: "
                          + "; ".join(problems) + ". Train with expert.num_shared=0, "
                          "expert.router=softmax and expert.bias_update_rate=0 to get an "
                          "exportable model.")
    m, e = cfg.model, cfg.expert
    has_dense = any(not is_moe_layer(i, m) for i in range(m.n_layers))
    family, _ = export_family(m, e, has_dense)
    ids = _recorded_ids(loaded.run_dir, cfg, loaded.tokenizer.eot_id)
    pad = ids.pop("pad_token_id")
    kw = hf_config_dict(family, m, e, cfg.loss.aux_coef, **ids)
    if pad is not None:
        kw["pad_token_id"] = pad
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[family])
    if hasattr(config_cls(), "rope_parameters"):  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": m.rope_theta}
    else:
        kw["rope_theta"] = m.rope_theta
    config = config_cls(**kw)
    hf = model_cls(config).float().eval()
    inter = kw["intermediate_size"] if family == "mixtral" else e.hidden_size
    tensors = export_tensors(model, family, m, e, inter)
    expected = hf.state_dict()
    if not any(k.endswith("mlp.experts.gate_up_proj") for k in expected):
        tensors = legacy_names(tensors, family)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise MoeLMError(f"This transformers version's {family} has other weight names (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); export needs transformers "
                         "4.x or 5.x.")
    hf.load_state_dict(tensors, strict=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf, family
