"""Evaluating a trained model: mean next-token loss (nats), perplexity and bits per byte.

Bits per byte divide the total loss by the UTF-8 size of the predicted text, so models with
different tokenizers compare. On the run's own held-out split it reads the same
`trainer.eval_batches` batches the training loop evaluated (so the loss matches the run's last
`val_loss` at that checkpoint; for a run on a data mixture, `source` names the source whose
validation split to read, and the loss matches the run's `val/<source>/loss`); on user files
(.txt/.md/.jsonl/.parquet, a file or a directory) it scores all their tokens, in windows of
`data.seq_len`, end-of-text between documents.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from moe_lm.config import DataConfig
from moe_lm.data import TokenLoader, prepare
from moe_lm.data.corpus import user_source
from moe_lm.data.mixture import check_sources, source_config
from moe_lm.errors import CheckpointError, ConfigError, DataError
from moe_lm.inference.loading import LoadedModel
from moe_lm.inference.progress import progress
from moe_lm.inference.text import token_byte_lengths
from moe_lm.model import Transformer
from moe_lm.parallel.precision import Precision


@dataclass
class EvalResult:
    """Loss over `tokens` predicted tokens that spell `bytes` bytes of text."""

    loss: float  # mean nats per token
    ppl: float
    bits_per_byte: float
    tokens: int
    bytes: int
    batches: int


@torch.no_grad()
def evaluate_batches(model: Transformer, batches: Iterable[torch.Tensor], byte_lengths: np.ndarray,
                     precision: str = "fp32", desc: str = "eval",
                     total: int | None = None) -> EvalResult:
    """Token-weighted mean loss over `(B, S+1)` batches (inputs `[:, :-1]`, targets `[:, 1:]`),
    with a progress bar named `desc` (`total` batches, if known)."""
    model.eval()
    device = next(model.parameters()).device
    lengths = torch.from_numpy(byte_lengths)
    total_nats, n_tokens, n_bytes, n_batches = 0.0, 0, 0, 0
    for batch in progress(batches, f"{desc} ({precision})", total):
        batch = batch.to(device)
        targets = batch[:, 1:]
        with Precision.resolve(precision, device.type).autocast(device.type):
            out = model(batch[:, :-1], targets, return_logits=False)
        total_nats += float(out.lm_loss) * targets.numel()
        n_tokens += targets.numel()
        n_bytes += int(lengths[targets.flatten().cpu()].sum())
        n_batches += 1
    if n_tokens == 0:
        raise DataError("No batches to evaluate: the data is shorter than one window "
                        "(data.seq_len + 1 tokens). Use more text or a smaller --seq-len.")
    loss = total_nats / n_tokens
    if not math.isfinite(loss):  # never a printed "Infinity" with exit code 0
        raise CheckpointError(f"The model gives a non-finite loss ({loss}) on this data: its weights "
                              "are damaged or diverged. Evaluate an earlier checkpoint directory.")
    return EvalResult(loss, math.exp(min(loss, 50.0)), total_nats / math.log(2) / max(n_bytes, 1),
                      n_tokens, n_bytes, n_batches)


def val_split_batches(loaded: LoadedModel, num_batches: int | None = None,
                      source: str | None = None) -> Iterator[torch.Tensor]:
    """The run's fixed validation batches (what the training loop's evaluation sees); of the
    mixture's source named `source` for a run on `data.sources`."""
    cfg = loaded.cfg
    shard_dir = prepare(source_data(cfg.data, source), loaded.tokenizer)
    loader = TokenLoader(shard_dir, "val", cfg.data.seq_len, cfg.data.batch_size, cfg.trainer.seed)
    return loader.val_batches(num_batches or cfg.trainer.eval_batches)


def source_data(data_cfg: DataConfig, source: str | None) -> DataConfig:
    """The DataConfig whose validation split `val_split_batches` reads: the run's own, or one
    source of its mixture alone (prepared and split as the run prepared it)."""
    sources = {s.name: s for s in check_sources(data_cfg)}
    if not sources:
        if source is not None:
            raise ConfigError(f"--source {source}: this run did not train on a data mixture "
                              f"(data.path={data_cfg.path!r}, no data.sources); leave out "
                              "--source to evaluate on its validation split.")
        return data_cfg
    if source not in sources:
        given = "no --source" if source is None else f"--source {source}"
        raise ConfigError(f"{given}: this run trained on a mixture of the sources "
                          f"{list(sources)}; pass --source NAME (one of them) to evaluate on "
                          "that source's validation split (the run's val/NAME/loss), or --data "
                          "FILES for other text.")
    return source_config(data_cfg, sources[source])


def file_batches(loaded: LoadedModel, path: str, seq_len: int, batch_size: int,
                 max_tokens: int | None = None) -> list[torch.Tensor]:
    """Every token of the named files in `(B, seq_len + 1)` windows (the last batch may be short)."""
    tok = loaded.tokenizer
    stream: list[int] = []
    for doc in progress(user_source(path).documents(), f"tokenize {path}", unit="doc"):
        stream.extend(tok.encode(doc))
        stream.append(tok.eot_id)
        if max_tokens and len(stream) > max_tokens:
            break
    ids = np.asarray(stream[:max_tokens + 1] if max_tokens else stream, dtype=np.int64)
    n_windows = (len(ids) - 1) // seq_len
    if n_windows == 0:
        raise DataError(f"{path} holds {len(ids)} tokens, fewer than one window of --seq-len "
                        f"{seq_len} + 1. Use more text or a smaller --seq-len.")
    windows = np.stack([ids[w * seq_len:w * seq_len + seq_len + 1] for w in range(n_windows)])
    return [torch.from_numpy(windows[start:start + batch_size])  # a list: the bar knows its length
            for start in range(0, n_windows, batch_size)]


def evaluate_loaded(loaded: LoadedModel, data: str | None = None, batches: int | None = None,
                    seq_len: int | None = None, batch_size: int | None = None,
                    precision: str | None = None, max_tokens: int | None = None,
                    desc: str = "eval", source: str | None = None) -> EvalResult:
    """Evaluates a loaded model on its run's validation split (of the mixture's `source`), or on
    `data` files."""
    cfg = loaded.cfg
    lengths = token_byte_lengths(loaded.tokenizer, cfg.model.vocab_size)
    if data is None:
        if seq_len or batch_size:
            raise ConfigError("--seq-len and --batch-size apply to --data files; the validation "
                              "split is read with the run's data.seq_len and data.batch_size.")
        rows = val_split_batches(loaded, batches, source)
        total = batches or cfg.trainer.eval_batches
    else:
        if source is not None:
            raise ConfigError("--source names a source of the run's mixture for its validation "
                              "split; --data scores other files. Give one of them.")
        rows = file_batches(loaded, data, seq_len or cfg.data.seq_len,
                            batch_size or cfg.data.batch_size, max_tokens)
        total = len(rows)
    return evaluate_batches(loaded.model, rows, lengths, precision or cfg.trainer.precision,
                            desc, total)


def result_row(loaded: LoadedModel, result: EvalResult, data: str | None,
               quantize: str, precision: str | None = None,
               source: str | None = None) -> dict[str, Any]:
    """What `python -m moe_lm.eval` reports: the checkpoint, the data, then the result's fields."""
    split = "val split" if source is None else f"val split of source {source}"
    return {"checkpoint": str(loaded.ckpt.path), "step": loaded.ckpt.step,
            "data": data or split, "quantize": quantize,
            "precision": precision or loaded.cfg.trainer.precision,
            **asdict(result)}


# what each --quantize mode (moe_lm.compress.weight_only) does to the weights, as the table says it
WEIGHTS_BY_QUANTIZE = {
    "none": "experts unquantized",
    "int8": "torchao int8 weight-only linears and experts (per-channel scales)",
    "int4": "torchao int4 weight-only linears and experts (groups of 32)",
    "int8-experts": "experts int8 (per-channel scales)",
}


def format_result(row: dict[str, Any]) -> str:
    """The human-readable table of a `result_row`."""
    return "\n".join([
        f"checkpoint   {row['checkpoint']} (step {row['step']})",
        f"model        {WEIGHTS_BY_QUANTIZE.get(row['quantize'], row['quantize'])}"
        f", computed in {row['precision']}",
        f"data         {row['data']}: {row['tokens']} tokens, {row['bytes']} bytes, "
        f"{row['batches']} batches",
        f"loss         {row['loss']:.4f} nats/token",
        f"perplexity   {row['ppl']:.2f}",
        f"bits/byte    {row['bits_per_byte']:.4f}",
    ])
