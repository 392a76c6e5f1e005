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
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    model.eval()
    tokens_1S = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache(len(model.layers), len(prompt_ids) + max_new_tokens) if use_cache else None
    step_input_1S = tokens_1S
    for _ in range(max_new_tokens):
        logits_1SV = model(step_input_1S if use_cache else tokens_1S, cache=cache).logits
        next_1 = sample_next_token(logits_1SV[:, -1], temperature, top_k, top_p, generator)
        token = int(next_1)
        yield token
        if token == stop_id:
            return
        step_input_1S = next_1[:, None]
        tokens_1S = torch.cat([tokens_1S, step_input_1S], dim=1)


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
