"""Hugging Face export: a moe_lm checkpoint as a transformers Mixtral model.

Legend: E experts, D model width, F expert hidden size, I Mixtral's intermediate size, H query
heads, G key/value heads, Dh head width.

Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as its Mixtral
model (`MixtralForCausalLM`) with the same logits, in fp32. What maps one to one: embeddings,
grouped-query attention, RMSNorm, the softmax top-k router with renormalised weights, SwiGLU
experts and a tied or untied LM head. What is rewritten exactly:
- rotary layout: moe_lm rotates consecutive channel pairs (0,1), (2,3), ...; Mixtral rotates
  halves (i, i + Dh/2). The rows of each head's query and key projections are permuted to match
  (attention scores are unchanged).
- dense layers (`model.n_dense_layers`, `model.moe_every`): Mixtral has only MoE layers, so a dense
  SwiGLU becomes E identical experts behind a zero router; whatever k experts are picked, their
  renormalised weights sum to 1 and the output is the dense MLP's.
- sizes: all Mixtral experts share one intermediate size I = max(F, dense ffn_hidden); narrower
  matrices are padded with zero channels, which contribute exactly zero.

What cannot be exported (`build_mixtral` refuses, naming the setting): shared experts
(`expert.num_shared > 0`), the sigmoid or expert-choice routers, and a non-zero router score bias
(aux-loss-free balancing moves Mixtral-invisible selection). The tiktoken tokenizer is not
converted: `moe_lm_tokenizer.json` holds a recipe that loads the encoding with `tiktoken`, offline
for cl100k_base (`moe_lm.interop.tokenizer_note`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_lm.config import TrainConfig
from moe_lm.errors import ConfigError, MoeLMError
from moe_lm.inference.loading import LoadedModel, load_model
from moe_lm.interop.tokenizer_note import NOTE_NAME, tokenizer_note
from moe_lm.model import Transformer, is_moe_layer


def export_problems(cfg: TrainConfig, model: Transformer) -> list[str]:
    """The settings of this model that Mixtral cannot express (empty when it exports exactly)."""
    e = cfg.expert
    problems = []
    if e.num_shared > 0:
        problems.append(f"expert.num_shared={e.num_shared}: Mixtral has no shared experts")
    if e.router != "softmax":
        problems.append(f"expert.router={e.router}: Mixtral routes with softmax top-k")
    biased = [name for name, buf in model.named_buffers()
              if name.endswith("score_bias") and bool(buf.abs().max() > 0)]
    if biased:
        problems.append(f"non-zero router score bias in {len(biased)} layer(s) (aux-loss-free "
                        "balancing, expert.bias_update_rate > 0): Mixtral's router has no bias")
    return problems


def _rotary_pairs_to_halves(w_RD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders each head's output rows from interleaved pairs to [even channels, odd channels]."""
    R, D = w_RD.shape
    head_dim = R // n_heads
    return w_RD.view(n_heads, head_dim // 2, 2, D).transpose(1, 2).reshape(R, D)


def _pad_rows(w_RD: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w_RD, w_RD.new_zeros(rows - w_RD.shape[0], w_RD.shape[1])], 0)


def mixtral_tensors(model: Transformer, cfg: TrainConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """MixtralConfig keyword arguments and the weights under Mixtral's (fused-expert) names.

    Per layer `model.layers.{i}.mlp.experts.gate_up_proj` is (E, 2I, D) (gate rows, then up rows)
    and `down_proj` is (E, D, I); the router is `mlp.gate.weight` (E, D).
    """
    m, e = cfg.model, cfg.expert
    E, Dh = e.num_experts, m.d_model // m.n_heads
    has_dense = any(not is_moe_layer(i, m) for i in range(m.n_layers))
    inter = max(e.hidden_size, m.ffn_hidden if has_dense else 0)
    kwargs = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=inter,
                  num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                  num_key_value_heads=m.n_kv_heads, head_dim=Dh, hidden_act="silu",
                  max_position_embeddings=cfg.data.seq_len, rms_norm_eps=m.norm_eps,
                  tie_word_embeddings=m.tie_embeddings, sliding_window=None,
                  num_experts_per_tok=e.top_k, num_local_experts=E, rope_theta=m.rope_theta,
                  router_aux_loss_coef=cfg.loss.aux_coef)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight,
                                    "model.norm.weight": model.norm.weight,
                                    "lm_head.weight": model.head_weight_VD}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        kv = block.attn.wkv.weight
        out[p + "self_attn.q_proj.weight"] = _rotary_pairs_to_halves(block.attn.wq.weight, m.n_heads)
        out[p + "self_attn.k_proj.weight"] = _rotary_pairs_to_halves(kv[:m.n_kv_heads * Dh],
                                                                     m.n_kv_heads)
        out[p + "self_attn.v_proj.weight"] = kv[m.n_kv_heads * Dh:]
        out[p + "self_attn.o_proj.weight"] = block.attn.wo.weight
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        if block.is_moe:
            ex = block.mlp.experts
            gate_EFD, up_EFD = ex.w1_EDF.transpose(1, 2), ex.w3_EDF.transpose(1, 2)
            down_EFD = ex.w2_EFD
            router_ED = block.mlp.router.gate.weight
        else:  # dense SwiGLU -> E copies behind a zero router (any top-k pick gives the same sum)
            mlp = block.mlp
            gate_EFD, up_EFD = (w.weight.expand(E, -1, -1) for w in (mlp.w1, mlp.w3))
            down_EFD = mlp.w2.weight.t().expand(E, -1, -1)
            router_ED = mlp.w1.weight.new_zeros(E, m.d_model)
        out[p + "mlp.gate.weight"] = router_ED
        out[p + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([_pad_rows(g, inter), _pad_rows(u, inter)], 0) for g, u in zip(gate_EFD, up_EFD)])
        out[p + "mlp.experts.down_proj"] = torch.stack(
            [_pad_rows(d, inter).t() for d in down_EFD])
    return kwargs, {k: v.detach().float().contiguous() for k, v in out.items()}


def _legacy_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-expert names of transformers < 5 (`block_sparse_moe.experts.{j}.w1/w2/w3`)."""
    out = {}
    for name, t in tensors.items():
        if ".mlp.experts.gate_up_proj" in name:
            p = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts.")
            inter = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{p}{j}.w1.weight"], out[f"{p}{j}.w3.weight"] = t[j, :inter], t[j, inter:]
        elif ".mlp.experts.down_proj" in name:
            p = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts.")
            for j in range(t.shape[0]):
                out[f"{p}{j}.w2.weight"] = t[j]
        else:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
    return out


def build_mixtral(loaded: LoadedModel):
    """A `transformers` MixtralForCausalLM (fp32, eval mode) holding the loaded model's weights."""
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError as err:
        raise MoeLMError("Exporting needs the transformers package: pip install transformers "
                         "(or pip install -e '.[dev]').") from err
    problems = export_problems(loaded.cfg, loaded.model)
    if problems:
        raise ConfigError("This model cannot be exported as Mixtral: " + "; ".join(problems)
                          + ". Train with expert.num_shared=0, expert.router=softmax and "
                          "expert.bias_update_rate=0 to get an exportable model.")
    kwargs, tensors = mixtral_tensors(loaded.model, loaded.cfg)
    theta = kwargs.pop("rope_theta")
    if hasattr(MixtralConfig(), "rope_parameters"):  # transformers >= 5
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        kwargs["rope_theta"] = theta
    config = MixtralConfig(**kwargs, bos_token_id=None, eos_token_id=loaded.tokenizer.eot_id)
    hf = MixtralForCausalLM(config).float().eval()
    expected = hf.state_dict()
    if "model.layers.0.mlp.experts.gate_up_proj" not in expected:
        tensors = _legacy_names(tensors)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise MoeLMError(f"This transformers version's Mixtral has other weight names (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); export needs transformers "
                         "4.x or 5.x.")
    hf.load_state_dict(tensors, strict=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Loads a checkpoint and writes the Mixtral model (+ tokenizer note) to `out_dir`."""
    loaded = load_model(path, device="cpu")
    hf = build_mixtral(loaded)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    note = tokenizer_note(loaded.tokenizer, loaded.ckpt.path)
    (out_dir / NOTE_NAME).write_text(json.dumps(note, indent=1))
    return out_dir


def export_summary(out: Path) -> str:
    """Two lines: what was written (from its config.json) and how to load and tokenize it."""
    cfg = json.loads((Path(out) / "config.json").read_text())
    note = json.loads((Path(out) / NOTE_NAME).read_text())
    return (f"wrote {out} (MixtralForCausalLM: {cfg['num_hidden_layers']} layers, "
            f"{cfg['num_local_experts']} experts, top-{cfg['num_experts_per_tok']}, "
            f"intermediate_size {cfg['intermediate_size']})\n"
            "load it with transformers.AutoModelForCausalLM.from_pretrained"
            f"({str(out)!r}); tokenize with {note['usage']} ({note['requires']}; see {NOTE_NAME}).")
