"""Training throughput: moe_lm against `transformers`' MixtralForCausalLM, same model, same run.

Legend: B batch, S sequence, D model width, E experts, k top-k, F expert hidden width, V vocabulary.

    python experiments/bench_train.py                    # E=8 k=2 D=512 L=4 S=512 B=4, cl100k
    python experiments/bench_train.py --quick            # a small model, a few seconds a step
    python experiments/bench_train.py --threads 1 --steps 8 --markdown experiments/results/x.md

Both sides train the same network: moe_lm's `Trainer` builds it from the config below, and the
Mixtral model gets the very same weights (q/k rows permuted from moe_lm's interleaved rotary pairs
to Mixtral's rotate-half layout, so both compute the same function: the script prints both step-0
losses). Same batches (moe_lm's loader, same seed), bf16 autocast over fp32 weights, the same
AdamW (moe_lm's `build_optimizer`, fused), gradient clipping and schedule; both add a 0.01 load
balancing loss (moe_lm's z-loss is off, Mixtral has none). moe_lm's step is `Trainer.train_step`
itself. Mixtral runs with each experts implementation asked for (`eager`, `grouped_mm`).

Steps are interleaved (step i of every candidate before step i+1 of any, rotating which goes
first) after warm-up steps; the script prints median step times, tokens/s, their ratios, and
model FLOP/s against the measured peak matrix-multiply FLOP/s of the device (MFU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe_layer import environment_lines, measure_peak_flops  # noqa: E402

from moe_lm.config import to_train_config  # noqa: E402
from moe_lm.data import TokenLoader, prepare  # noqa: E402
from moe_lm.model import count_params  # noqa: E402
from moe_lm.training.loop import Trainer  # noqa: E402
from moe_lm.training.optim import build_optimizer, build_scheduler  # noqa: E402


def moe_lm_config(args: argparse.Namespace, compile: bool = False, backend: str = "torch"):
    """The benchmarked model as a moe_lm TrainConfig (all layers MoE, like Mixtral)."""
    overrides = {
        "model": {"n_layers": args.layers, "d_model": args.d_model, "n_heads": args.heads,
                  "n_kv_heads": args.kv_heads, "n_dense_layers": 0, "tie_embeddings": True},
        "expert": {"num_experts": args.experts, "top_k": args.top_k, "hidden_size": args.hidden,
                   "backend": backend},
        "loss": {"aux_coef": 0.01, "z_coef": 0.0},
        # val_fraction: the Trainer builds a validation loader, which needs one whole batch
        "data": {"seq_len": args.seq_len, "batch_size": args.batch, "val_fraction": 0.1},
        "trainer": {"max_steps": 10_000, "precision": args.precision, "compile": compile,
                    "device": args.device},
        "logger": {"wandb": {"mode": "disabled"}},
    }
    return to_train_config(overrides)


def mixtral_from(trainer: Trainer, impl: str) -> torch.nn.Module:
    """MixtralForCausalLM with the trainer's model's weights and the given experts implementation."""
    from transformers import MixtralConfig, MixtralForCausalLM

    m, e, ours = trainer.cfg.model, trainer.cfg.expert, trainer.model
    config = MixtralConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=e.hidden_size,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads, max_position_embeddings=trainer.cfg.data.seq_len,
        rms_norm_eps=m.norm_eps, rope_parameters={"rope_theta": m.rope_theta, "rope_type": "default"},
        tie_word_embeddings=m.tie_embeddings, num_local_experts=e.num_experts,
        num_experts_per_tok=e.top_k, output_router_logits=True,
        router_aux_loss_coef=trainer.cfg.loss.aux_coef, sliding_window=None,
        attn_implementation="sdpa", experts_implementation=impl,
    )
    hf = MixtralForCausalLM(config)
    hf.config._experts_implementation = impl
    hd = m.d_model // m.n_heads
    # interleaved rotary pairs (2i, 2i+1) -> rotate-half channels (i, i + hd/2), per head
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    state = {}
    sd = {k: v.detach() for k, v in ours.state_dict().items()}
    state["model.embed_tokens.weight"] = sd["embed.weight"]
    state["model.norm.weight"] = sd["norm.weight"]
    if not m.tie_embeddings:
        state["lm_head.weight"] = sd["lm_head.weight"]
    kv = m.n_kv_heads * hd
    for i in range(m.n_layers):
        o, p = f"layers.{i}.", f"model.layers.{i}."
        wkv = sd[o + "attn.wkv.weight"]
        state[p + "self_attn.q_proj.weight"] = _permute_heads(sd[o + "attn.wq.weight"], perm, hd)
        state[p + "self_attn.k_proj.weight"] = _permute_heads(wkv[:kv], perm, hd)
        state[p + "self_attn.v_proj.weight"] = wkv[kv:]
        state[p + "self_attn.o_proj.weight"] = sd[o + "attn.wo.weight"]
        state[p + "input_layernorm.weight"] = sd[o + "attn_norm.weight"]
        state[p + "post_attention_layernorm.weight"] = sd[o + "mlp_norm.weight"]
        state[p + "mlp.gate.weight"] = sd[o + "mlp.router.gate.weight"]
        w1, w3, w2 = (sd[o + f"mlp.experts.{n}"] for n in ("w1_EDF", "w3_EDF", "w2_EFD"))
        state[p + "mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=2).transpose(1, 2)
        state[p + "mlp.experts.down_proj"] = w2.transpose(1, 2)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    if m.tie_embeddings:
        hf.tie_weights()
    return hf.to(trainer.device).train()


def _permute_heads(w_OD: torch.Tensor, perm: torch.Tensor, hd: int) -> torch.Tensor:
    """Reorders each head's output rows of a projection weight by `perm`."""
    heads = w_OD.shape[0] // hd
    return w_OD.view(heads, hd, -1)[:, perm].reshape(w_OD.shape).contiguous()


class MixtralStep:
    """One training step of MixtralForCausalLM, the way moe_lm's `Trainer.train_step` does it."""

    def __init__(self, trainer: Trainer, impl: str, shard_dir):
        cfg = trainer.cfg
        self.cfg, self.device, self.precision = cfg, trainer.device, trainer.precision
        self.model = mixtral_from(trainer, impl)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.data = TokenLoader(shard_dir, "train", cfg.data.seq_len, cfg.data.batch_size,
                                cfg.trainer.seed)

    def __call__(self) -> float:
        batch = self.data.next_batch().to(self.device, non_blocking=True)
        with self.precision.autocast(self.device.type):
            targets_BS = batch[:, 1:].contiguous()  # no shift inside: same targets as moe_lm
            out = self.model(input_ids=batch[:, :-1], labels=targets_BS, shift_labels=targets_BS)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float((out.loss - self.cfg.loss.aux_coef * out.aux_loss).detach())  # the LM loss


def flops_per_token(trainer: Trainer) -> float:
    """Training FLOPs per token: 6 x active matmul parameters + causal attention (6 L S D)."""
    m = trainer.cfg.model
    active = count_params(m, trainer.cfg.expert)["active"]  # the tied embedding counts as LM head
    return 6 * active + 6 * m.n_layers * trainer.cfg.data.seq_len * m.d_model


def run(args: argparse.Namespace) -> str:
    """Runs the benchmark and returns the markdown report it printed."""
    backends = [b for b in args.backends.split(",") if b]
    cfg = moe_lm_config(args, backend=backends[0])
    run_dir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    trainer = Trainer(cfg, run_dir)
    device = trainer.device
    shard_dir = prepare(trainer.cfg.data, trainer.tokenizer)
    impls = [i for i in args.hf_impls.split(",") if i]
    candidates = {}
    for i in impls:
        try:
            candidates[f"transformers Mixtral {i}"] = MixtralStep(trainer, i, shard_dir)
        except (ValueError, TypeError, KeyError, NotImplementedError) as err:  # older transformers
            print(f"skipping transformers Mixtral {i}: {type(err).__name__}: {err}", flush=True)

    def step_of(t: Trainer):
        return lambda: float(t.train_step()["lm_loss"])

    ours = {"moe_lm": step_of(trainer)}  # more trainers: same seed, so same weights and batches
    for b in backends[1:]:
        ours[f"moe_lm expert.backend={b}"] = step_of(
            Trainer(moe_lm_config(args, backend=b), Path(tempfile.mkdtemp())))
    if args.compile:
        compiled = Trainer(moe_lm_config(args, compile=True, backend=backends[0]),
                           Path(tempfile.mkdtemp()))
        ours["moe_lm trainer.compile=true"] = step_of(compiled)
    candidates = {**ours, **candidates}
    losses = {n: [] for n in candidates}
    times = {n: [] for n in candidates}
    first = {}
    names = list(candidates)
    for step in range(args.warmup + args.steps):
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            if name not in names:
                continue
            _sync(device)
            start = time.perf_counter()
            try:
                loss = candidates[name]()
            except (RuntimeError, ValueError, NotImplementedError) as err:  # e.g. out of memory
                print(f"dropping {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                names.remove(name)
                continue
            _sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
            elif step == 0:
                first[name] = time.perf_counter() - start  # includes compilation, if any
            losses[name].append(loss)
        print(f"step {step + 1}: " + ", ".join(f"{n} {times[n][-1] if times[n] else 0:.2f}s"
                                                for n in names), flush=True)

    tokens = cfg.data.batch_size * cfg.data.seq_len
    fpt = flops_per_token(trainer)
    peak_dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
    peak = measure_peak_flops(peak_dtype, device)
    med = {n: statistics.median(times[n]) for n in names}  # those that ran to the end
    params = count_params(trainer.cfg.model, trainer.cfg.expert)
    hf_params = {n: sum(p.numel() for p in c.model.parameters())
                 for n, c in candidates.items() if n not in ours}
    m, e = trainer.cfg.model, trainer.cfg.expert
    lines = [
        f"## Training throughput: L={m.n_layers} D={m.d_model} heads {m.n_heads}/{m.n_kv_heads} "
        f"E={e.num_experts} k={e.top_k} F={e.hidden_size} V={m.vocab_size}, B={cfg.data.batch_size} "
        f"S={cfg.data.seq_len}, {cfg.trainer.precision}, {device}; moe_lm expert.backend="
        f"{backends[0]}", "",
        *environment_lines(torch.get_num_threads()),
        f"- parameters: moe_lm {params['total'] / 1e6:.1f}M total, {params['active'] / 1e6:.1f}M "
        f"active; transformers " + ", ".join(f"{v / 1e6:.1f}M" for v in hf_params.values()),
        f"- model FLOPs per token (6 x active + attention): {fpt / 1e6:.0f}M; measured peak "
        f"{str(peak_dtype).replace('torch.', '')} matmul: {peak / 1e9:.0f} GFLOP/s",
        f"- steps: {args.steps} timed, interleaved, after {args.warmup} warm-up steps; "
        f"{tokens} tokens per step",
        "- first-step LM loss (same weights, same batch): " + ", ".join(
            f"{n} {losses[n][0]:.4f}" for n in names), "",
        "| trainer | median step s | min s | max s | first step s | tokens/s | model GFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        tps = tokens / med[n]
        lines.append(f"| {n} | {med[n]:.2f} | {min(times[n]):.2f} | {max(times[n]):.2f} | "
                     f"{first.get(n, float('nan')):.2f} | {tps:.0f} | {tps * fpt / 1e9:.0f} | {tps * fpt / peak:.1%} |")
    lines.append("")
    best = min((n for n in ours if n in names), key=med.get)
    for n in names:
        if n != best:
            target = " (target >= 1.5x)" if n not in ours else ""
            lines.append(f"- {best} tokens/s / {n} tokens/s: **{med[n] / med[best]:.2f}x**{target}")
    lines.append("")
    report = "\n".join(lines)
    print(report, flush=True)
    return report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024, help="F, each expert's hidden width")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--compile", action="store_true",
                   help="also time moe_lm with trainer.compile=true (first step = compile time)")
    p.add_argument("--backends", default="torch",
                   help="comma-separated moe_lm expert backends; the first is the 'moe_lm' row")
    p.add_argument("--hf-impls", default="eager,grouped_mm",
                   help="comma-separated Mixtral experts implementations")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="D=128, F=256, L=2, S=128, 3 steps")
    p.add_argument("--markdown", default=None, help="append the report to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.hidden, args.layers, args.seq_len = 128, 256, 2, 128
        args.heads, args.kv_heads, args.steps, args.warmup = 4, 2, 3, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = run(args)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
