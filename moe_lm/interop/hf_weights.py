"""Weight names and layouts: Hugging Face Mixtral / Qwen3-MoE / OLMoE <-> moe_lm's Transformer.

Legend: E experts, D model width, F expert hidden size, H query heads, G key/value heads, Dh head
width, R rows of a projection (heads x Dh).

What maps one to one: embeddings, norms, o_proj, the router (`gate`), the LM head. What is
rewritten exactly (a permutation, a transpose or a concatenation, never arithmetic):
- rotary layout: HF rotates the halves (i, i + Dh/2) of each head, moe_lm consecutive pairs
  (2i, 2i+1). Each head's query/key rows (and the q/k norm weights, which multiply the same
  channels) are permuted; attention scores are unchanged.
- k_proj and v_proj are one `wkv` matrix in moe_lm (k rows, then v rows).
- experts: moe_lm holds w1/w3 as (E, D, F) and w2 as (E, F, D); HF stores one (F, D) / (D, F)
  matrix per expert (`experts.{j}.gate_proj`/`up_proj`/`down_proj`; Mixtral `w1`/`w3`/`w2`), or,
  inside transformers >= 5, fused `gate_up_proj` (E, 2F, D) and `down_proj` (E, D, F).

`import_recipes` lists, per moe_lm tensor, the HF tensors it needs (with their expected shapes)
and how to build it from them one read at a time; `export_tensors` goes the other way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moe_lm.config import ExpertConfig, ModelConfig
from moe_lm.model import is_moe_layer

Reader = Callable[[str], torch.Tensor]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def halves_to_pairs(w_R: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders each head's rows (dim 0) from HF's [first half, second half] to moe_lm's pairs."""
    rest = w_R.shape[1:]
    head_dim = w_R.shape[0] // n_heads
    return w_R.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w_R.shape)


def pairs_to_halves(w_R: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `halves_to_pairs`: moe_lm's interleaved pairs to HF's halves."""
    rest = w_R.shape[1:]
    head_dim = w_R.shape[0] // n_heads
    return w_R.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w_R.shape)


@dataclass
class Recipe:
    """How one moe_lm tensor is made: from which HF tensors (name -> expected shape), and how."""

    target: str
    shape: tuple[int, ...]
    sources: dict[str, tuple[int, ...]]
    build: Callable[[Reader], torch.Tensor]


def _copy(target: str, name: str, shape: tuple[int, ...]) -> Recipe:
    return Recipe(target, shape, {name: shape}, lambda read: read(name))


def _permuted(target: str, name: str, shape: tuple[int, ...], heads: int) -> Recipe:
    return Recipe(target, shape, {name: shape}, lambda read: halves_to_pairs(read(name), heads))


def _expert_names(family: str, prefix: str, j: int) -> tuple[str, str, str]:
    """One expert's (gate, up, down) weight names in the HF hub layout."""
    if family == "mixtral":
        p = f"{prefix}block_sparse_moe.experts.{j}."
        return p + "w1.weight", p + "w3.weight", p + "w2.weight"
    p = f"{prefix}mlp.experts.{j}."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


def _stack(names: list[str], transpose: bool) -> Callable[[Reader], torch.Tensor]:
    """Builds (E, a, b) from E matrices read one at a time (peak: the result + one matrix)."""
    def build(read: Reader) -> torch.Tensor:
        out = None
        for j, name in enumerate(names):
            w = read(name)
            w = w.t() if transpose else w
            if out is None:
                out = torch.empty(len(names), *w.shape, dtype=w.dtype)
            out[j] = w
            del w
        return out
    return build


def _expert_recipes(family: str, i: int, E: int, D: int, F: int, fused: bool) -> list[Recipe]:
    t, prefix = f"layers.{i}.mlp.experts.", f"model.layers.{i}."
    if fused:  # transformers >= 5 in-memory names: gate rows then up rows
        gu, down = prefix + "mlp.experts.gate_up_proj", prefix + "mlp.experts.down_proj"
        return [
            Recipe(t + "w1_EDF", (E, D, F), {gu: (E, 2 * F, D)},
                   lambda read: read(gu)[:, :F].transpose(1, 2).contiguous()),
            Recipe(t + "w3_EDF", (E, D, F), {gu: (E, 2 * F, D)},
                   lambda read: read(gu)[:, F:].transpose(1, 2).contiguous()),
            Recipe(t + "w2_EFD", (E, F, D), {down: (E, D, F)},
                   lambda read: read(down).transpose(1, 2).contiguous()),
        ]
    names = [_expert_names(family, prefix, j) for j in range(E)]
    gates, ups, downs = ([n[k] for n in names] for k in range(3))
    return [
        Recipe(t + "w1_EDF", (E, D, F), {n: (F, D) for n in gates}, _stack(gates, True)),
        Recipe(t + "w3_EDF", (E, D, F), {n: (F, D) for n in ups}, _stack(ups, True)),
        Recipe(t + "w2_EFD", (E, F, D), {n: (D, F) for n in downs}, _stack(downs, True)),
    ]


def import_recipes(family: str, m: ModelConfig, e: ExpertConfig,
                   has: Callable[[str], bool]) -> list[Recipe]:
    """Every tensor of moe_lm's state dict for this model, as built from the HF checkpoint."""
    D, H, G, Dh, V = m.d_model, m.n_heads, m.n_kv_heads, m.head_width, m.vocab_size
    E, F = e.num_experts, e.hidden_size
    out = [_copy("embed.weight", "model.embed_tokens.weight", (V, D)),
           _copy("norm.weight", "model.norm.weight", (D,))]
    if not m.tie_embeddings:
        out.append(_copy("lm_head.weight", "lm_head.weight", (V, D)))
    for i in range(m.n_layers):
        p, t = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        k_name, v_name = a + "k_proj.weight", a + "v_proj.weight"
        out += [
            _permuted(t + "attn.wq.weight", a + "q_proj.weight", (H * Dh, D), H),
            Recipe(t + "attn.wkv.weight", (2 * G * Dh, D), {k_name: (G * Dh, D), v_name: (G * Dh, D)},
                   lambda read, k=k_name, v=v_name: torch.cat(
                       [halves_to_pairs(read(k), G), read(v)], 0)),
            _copy(t + "attn.wo.weight", a + "o_proj.weight", (D, H * Dh)),
            _copy(t + "attn_norm.weight", p + "input_layernorm.weight", (D,)),
            _copy(t + "mlp_norm.weight", p + "post_attention_layernorm.weight", (D,)),
        ]
        if m.qk_norm == "head":  # one Dh vector shared by all heads: permute within the head
            out += [_permuted(t + "attn.q_norm.weight", a + "q_norm.weight", (Dh,), 1),
                    _permuted(t + "attn.k_norm.weight", a + "k_norm.weight", (Dh,), 1)]
        elif m.qk_norm == "proj":
            out += [_permuted(t + "attn.q_norm.weight", a + "q_norm.weight", (H * Dh,), H),
                    _permuted(t + "attn.k_norm.weight", a + "k_norm.weight", (G * Dh,), G)]
        if not is_moe_layer(i, m):  # Qwen3-MoE's dense MLP layers
            mp = p + "mlp."
            out += [_copy(t + "mlp.w1.weight", mp + "gate_proj.weight", (m.ffn_hidden, D)),
                    _copy(t + "mlp.w3.weight", mp + "up_proj.weight", (m.ffn_hidden, D)),
                    _copy(t + "mlp.w2.weight", mp + "down_proj.weight", (D, m.ffn_hidden))]
            continue
        gate = p + ("block_sparse_moe.gate.weight" if family == "mixtral" and not
                    has(p + "mlp.gate.weight") else "mlp.gate.weight")
        out.append(_copy(t + "mlp.router.gate.weight", gate, (E, D)))
        out.append(Recipe(t + "mlp.router.score_bias", (E,), {},
                          lambda read, E=E: torch.zeros(E, dtype=torch.float32)))
        fused = has(p + "mlp.experts.gate_up_proj")
        out += _expert_recipes(family, i, E, D, F, fused)
    return out


def export_tensors(model, family: str, m: ModelConfig, e: ExpertConfig,
                   inter: int) -> dict[str, torch.Tensor]:
    """moe_lm's weights under the family's transformers (>= 5, fused-expert) parameter names.

    Mixtral has only MoE layers: a dense SwiGLU becomes E identical experts behind a zero router
    (the renormalised weights of whatever k are picked sum to 1), and narrower matrices are
    zero-padded to the one intermediate size `inter`, both exact. Qwen3-MoE keeps dense layers.
    HF formats have no cross-layer sharing: a `model.share_layers` block is written out once per
    applied layer (n_layers copies: the same logits, the blocks' weights take share_layers times
    the space).
    """
    E, G, H = e.num_experts, m.n_kv_heads, m.n_heads
    Dh = m.head_width
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight,
                                    "model.norm.weight": model.norm.weight,
                                    "lm_head.weight": model.head_weight_VD}
    for i, block in enumerate(model.applied_layers()):  # a shared block: one copy per layer
        p, attn = f"model.layers.{i}.", block.attn
        kv = attn.wkv.weight
        out[p + "self_attn.q_proj.weight"] = pairs_to_halves(attn.wq.weight, H)
        out[p + "self_attn.k_proj.weight"] = pairs_to_halves(kv[:G * Dh], G)
        out[p + "self_attn.v_proj.weight"] = kv[G * Dh:]
        out[p + "self_attn.o_proj.weight"] = attn.wo.weight
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        if m.qk_norm != "none":
            heads_q, heads_k = (1, 1) if m.qk_norm == "head" else (H, G)
            out[p + "self_attn.q_norm.weight"] = pairs_to_halves(attn.q_norm.weight, heads_q)
            out[p + "self_attn.k_norm.weight"] = pairs_to_halves(attn.k_norm.weight, heads_k)
        if not block.is_moe and family == "qwen3_moe":
            mlp = block.mlp
            out[p + "mlp.gate_proj.weight"] = mlp.w1.weight
            out[p + "mlp.up_proj.weight"] = mlp.w3.weight
            out[p + "mlp.down_proj.weight"] = mlp.w2.weight
            continue
        if block.is_moe:
            ex = block.mlp.experts
            gate_EFD, up_EFD = ex.w1_EDF.transpose(1, 2), ex.w3_EDF.transpose(1, 2)
            down_EFD, router_ED = ex.w2_EFD, block.mlp.router.gate.weight
        else:  # Mixtral: a dense SwiGLU as E copies behind a zero router
            mlp = block.mlp
            gate_EFD, up_EFD = (w.weight.expand(E, -1, -1) for w in (mlp.w1, mlp.w3))
            down_EFD = mlp.w2.weight.t().expand(E, -1, -1)
            router_ED = mlp.w1.weight.new_zeros(E, m.d_model)
        out[p + "mlp.gate.weight"] = router_ED
        out[p + "mlp.experts.gate_up_proj"] = torch.cat(
            [_pad_dim1(gate_EFD, inter), _pad_dim1(up_EFD, inter)], 1)
        out[p + "mlp.experts.down_proj"] = _pad_dim1(down_EFD, inter).transpose(1, 2)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _pad_dim1(w_EFD: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended along dim 1 up to `rows` (zero channels contribute exactly zero)."""
    pad = rows - w_EFD.shape[1]
    return w_EFD if pad == 0 else torch.cat([w_EFD, w_EFD.new_zeros(w_EFD.shape[0], pad,
                                                                    w_EFD.shape[2])], 1)


def legacy_names(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The per-expert names of the hub layout (and of transformers < 5)."""
    out = {}
    for name, t in tensors.items():
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.split("mlp.experts.")[0]
            inter = t.shape[1] // 2
            for j in range(t.shape[0]):
                g, u, _ = _expert_names(family, prefix, j)
                out[g], out[u] = t[j, :inter], t[j, inter:]
        elif ".mlp.experts.down_proj" in name:
            prefix = name.split("mlp.experts.")[0]
            for j in range(t.shape[0]):
                out[_expert_names(family, prefix, j)[2]] = t[j]
        elif family == "mixtral":
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
        else:
            out[name] = t
    return out
