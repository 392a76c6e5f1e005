"""Text generation: autoregressive sampling with a KV cache, streamed as the tokens arrive.

The prompt is processed once, then one token per step. Temperature 0 is greedy; otherwise logits
are divided by the temperature and restricted by top-k and top-p (nucleus) before sampling. The
model runs in eval mode, so every token is routed to its top-k experts with no capacity dropping.
Generation stops at `max_new_tokens` or the end-of-text token.
"""

from __future__ import annotations

import codecs
from typing import Iterator, TextIO

import torch

from moe_lm.errors import ConfigError
from moe_lm.inference.kv_cache import KVCache
from moe_lm.inference.loading import LoadedModel
from moe_lm.inference.text import token_bytes_fn
from moe_lm.model import Transformer


def sample_next_token(logits_BV: torch.Tensor, temperature: float, top_k: int = 0,
                      top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Picks one token per row: argmax at temperature 0, else a sample from the filtered softmax.

    `top_k > 0` keeps the k most likely tokens; `top_p < 1` keeps the smallest set of most likely
    tokens whose probability reaches `top_p` (always at least one).
    """
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, idx_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_BV = cum_BV - sorted_BV.softmax(-1) >= top_p  # mass before this token already >= p
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, idx_BV, sorted_BV)
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts right-aligned in one (B, P) batch, and each row's left padding (B,)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("A prompt is empty: pass at least one token of text with --prompt.")
    P = max(len(p) for p in prompts)
    tokens_BP = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens_BP[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
    pad_B = torch.tensor([P - len(p) for p in prompts], dtype=torch.long)
    return tokens_BP.to(device), pad_B.to(device)


@torch.no_grad()
def decode_steps(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stop_id: int | None = None) -> Iterator[list[int | None]]:
    """Batched generation: yields, per step, each row's new token id (None once the row stopped).

    The prompts are left-padded into one batch and share one preallocated KV cache; the prompt
    pass computes the last position's logits only. A row stops after it yields `stop_id`; the
    batch stops when every row has (stopped rows still run, their outputs unread). The one host
    synchronisation per token is reading the sampled ids.
    """
    device = next(model.parameters()).device
    generator = _seeded_generator(device, seed)
    model.eval()
    tokens_BP, pad_B = left_pad(prompts, stop_id or 0, device)
    cache = KVCache(model.cfg.n_layers, tokens_BP.shape[1] + max_new_tokens, pad_B)
    done = [False] * len(prompts)
    step_input_BS = tokens_BP
    for _ in range(max_new_tokens):
        logits_BV = model(step_input_BS, cache=cache, last_only=True).logits[:, -1]
        next_B = sample_next_token(logits_BV, temperature, top_k, top_p, generator)
        ids = next_B.tolist()
        yield [None if d else i for d, i in zip(done, ids)]
        done = [d or i == stop_id for d, i in zip(done, ids)]
        if all(done):
            return
        step_input_BS = next_B[:, None]


def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                   **sampling) -> list[list[int]]:
    """Each prompt's new token ids (up to and including `stop_id`), generated as one batch."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in decode_steps(model, prompts, max_new_tokens, **sampling):
        for row, token in zip(out, step):
            if token is not None:
                row.append(token)
    return out


@torch.no_grad()
def generate_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    use_cache: bool = True, seed: int | None = None,
                    stop_id: int | None = None) -> Iterator[int]:
    """Yields up to `max_new_tokens` new token ids, one at a time, continuing `prompt_ids`.

    With `use_cache=False` every step re-runs the whole sequence (slow; the reference the KV cache
    is tested against). Stops after yielding `stop_id`.
    """
    if not prompt_ids:
        raise ConfigError("The prompt is empty: pass at least one token of text with --prompt.")
    if use_cache:
        for step in decode_steps(model, [prompt_ids], max_new_tokens, temperature, top_k, top_p,
                                 seed, stop_id):
            yield step[0]
        return
    device = next(model.parameters()).device
    generator = _seeded_generator(device, seed)
    model.eval()
    tokens_1S = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits_1SV = model(tokens_1S).logits
        next_1 = sample_next_token(logits_1SV[:, -1], temperature, top_k, top_p, generator)
        token = int(next_1)
        yield token
        if token == stop_id:
            return
        tokens_1S = torch.cat([tokens_1S, next_1[:, None]], dim=1)


class StreamDecoder:
    """Turns token ids into text as they come, holding back bytes of an unfinished UTF-8 char."""

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes  # id -> bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self.decoder.decode(self.token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Raises ConfigError for sampling settings that mean nothing."""
    if max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError("Need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and "
                          "0 < --top-p <= 1.")


def stream_continuation(loaded: LoadedModel, prompt: str, out: TextIO, max_new_tokens: int,
                        temperature: float, top_k: int, top_p: float, use_cache: bool = True,
                        seed: int | None = None) -> None:
    """Writes `prompt`, then its continuation token by token (flushed as it comes), then a newline."""
    tok = loaded.tokenizer
    stream = StreamDecoder(token_bytes_fn(tok))
    out.write(prompt)
    out.flush()
    for token in generate_tokens(loaded.model, tok.encode(prompt), max_new_tokens, temperature,
                                 top_k, top_p, use_cache=use_cache, seed=seed, stop_id=tok.eot_id):
        if token == tok.eot_id:
            break
        out.write(stream.feed(token))
        out.flush()
    out.write(stream.flush() + "\n")


def _seeded_generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    """The sampling generator of `seed` on `device` (None: torch's global one)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
