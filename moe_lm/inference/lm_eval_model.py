"""moe_lm as an lm-evaluation-harness model: `MoeLM`, registered with lm-eval as `moe_lm`.

Legend: B batch, S sequence, V vocabulary.

It answers lm-eval's three request types the way lm-eval's own Hugging Face model (`hf`, HFLM)
does, so a model exported with `moe_lm.export_hf` scores the same through either:
- `loglikelihood`: requests sorted by length, longest first, and batched with lm-eval's Collator
  (requests whose context + continuation[:-1] agree share one forward); inputs are
  right-padded, which a causal model never sees, and truncated on the left to `max_length + 1`
  tokens; the continuation's log-probabilities are taken in fp32.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length` tokens, the first
  conditioned on the prefix token (end-of-text; moe_lm's tokenizers have no BOS).
- `generate_until`: prompts grouped by generation settings, sorted, left-padded and decoded
  together with a KV cache that masks each row's padding (`PaddedKVCache`); a row stops at
  end-of-text, at a stop string or after `max_gen_toks` tokens, and its text is cut at the first
  stop string. Greedy unless the task asks for sampling (`do_sample` with `temperature`,
  `top_k`, `top_p`, as `moe_lm.generate` samples).

In eval mode every token goes to its top-k experts with no capacity dropping, so padding and the
other requests of a batch change no request's routing, except under `expert.router=expert_choice`,
whose experts choose among all the tokens of a batch (a warning says so).

lm-eval is an optional extra (`pip install -e ".[eval]"`): this module imports without it, and
`require_lm_eval()` says how to install it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moe_lm.data import Tokenizer
from moe_lm.errors import ConfigError, MoeLMError
from moe_lm.inference.generate import sample_next_token
from moe_lm.inference.kv_cache import PaddedKVCache
from moe_lm.inference.loading import LoadedModel, load_model
from moe_lm.model import Transformer
from moe_lm.parallel.precision import Precision

try:  # the optional [eval] extra
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                      postprocess_generated_text)
    LM_EVAL_ERROR: ImportError | None = None
except ImportError as err:  # MoeLM() then raises require_lm_eval()'s error
    LM_EVAL_ERROR = err
    TemplateLM = object  # type: ignore[assignment,misc]

    def register_model(*names):  # type: ignore[no-redef]
        return lambda cls: cls

INSTALL_HINT = 'pip install -e ".[eval]" (or pip install lm-eval)'


def require_lm_eval() -> None:
    """Raises a MoeLMError saying how to install lm-eval when it is missing."""
    if LM_EVAL_ERROR is not None:
        raise MoeLMError(f"Task evaluation needs the lm-eval package ({LM_EVAL_ERROR}): "
                         f"{INSTALL_HINT}.")


@register_model("moe_lm")
class MoeLM(TemplateLM):
    """A moe_lm model answering lm-eval requests (see the module docstring).

    `pretrained` is a run directory, a checkpoint directory or an already loaded model
    (`LoadedModel`, e.g. with int8 experts). `model` + `tokenizer` instead evaluate a live model
    (the training loop's). `max_length` defaults to the run's `data.seq_len`; `precision` (fp32,
    bf16) to the run's `trainer.precision`.
    """

    backend = "causal"

    def __init__(self, pretrained: str | Path | LoadedModel | None = None, *,
                 model: Transformer | None = None, tokenizer: Tokenizer | None = None,
                 max_length: int | None = None, batch_size: int | str = 1,
                 device: str = "auto", backend: str | None = None,
                 precision: str | None = None, max_gen_toks: int = 256, **unused: Any):
        require_lm_eval()
        super().__init__()
        if isinstance(pretrained, (str, Path)):
            pretrained = load_model(pretrained, device, backend)
        if isinstance(pretrained, LoadedModel):
            model, tokenizer = pretrained.model, pretrained.tokenizer
            cfg = pretrained.cfg
            max_length = max_length or cfg.data.seq_len
            precision = precision or cfg.trainer.precision
            if cfg.expert.router == "expert_choice":
                warnings.warn("expert.router=expert_choice routes each token by the whole batch: "
                              "log-likelihoods depend on the batch (use --batch-size 1 to get "
                              "each request alone).", stacklevel=2)
        if model is None or tokenizer is None:
            raise ConfigError("MoeLM needs `pretrained` (a run or checkpoint directory) or both "
                              "`model` and `tokenizer`.")
        if not max_length:
            raise ConfigError("MoeLM(model=...) needs max_length (the context the model was "
                              "trained on, data.seq_len).")
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ConfigError(f"batch_size={batch_size!r}: pass a number of requests per forward "
                              "(lm-eval's automatic batch size is not supported).") from None
        if self.batch_size < 1 or max_gen_toks < 1:
            raise ConfigError("MoeLM needs batch_size >= 1 and max_gen_toks >= 1 (got "
                              f"{batch_size}, {max_gen_toks}).")
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        self._device = next(model.parameters()).device
        self._precision = Precision.resolve(precision or "fp32", self._device.type)
        self.precision = self._precision.name  # fp32 where the device has no bf16
        if unused:
            warnings.warn(f"MoeLM ignores the arguments {sorted(unused)}.", stacklevel=2)

    # -- tokens ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """The ids moe_lm's data pipeline would give `string` (its tokenizers add no BOS)."""
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- forward -----------------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, tokens_BS: torch.Tensor, cache: PaddedKVCache | None = None) -> torch.Tensor:
        was_training = self.model.training  # a live training model goes back to training mode
        self.model.eval()
        try:
            with self._precision.autocast(self.device.type):
                return self.model(tokens_BS.to(self.device), cache=cache).logits
        finally:
            self.model.train(was_training)

    # -- loglikelihood -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is greedy) per `(strs, ctx, cont)`."""
        def by_length(req):  # longest first, as HFLM: the first batch is the largest
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        reorder = Collator(requests, sort_fn=by_length, group_by="contexts",
                           group_fn=lambda req: req[-2] + req[-1][:-1])
        results = []
        for chunk in reorder.get_batched(n=self.batch_size):
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(len(x) for x in inputs)
            tokens_BS = torch.tensor([x + [self.eot_token_id] * (width - len(x)) for x in inputs])
            logits_BSV = self._logits(tokens_BS)
            for (strs, ctx, cont), inp, logits_SV in zip(chunk, inputs, logits_BSV):
                logp_1CV = F.log_softmax(logits_SV[len(inp) - len(cont):len(inp)].float(), -1)[None]
                for req_strs, cont_toks, logp in reorder.get_cache(
                        req_str=strs, cxt_toks=ctx, cont_toks=cont, logits=logp_1CV):
                    cont_1C = torch.tensor(cont_toks, device=logp.device)[None]
                    greedy = bool((logp.argmax(-1)[:, -cont_1C.shape[1]:] == cont_1C).all())
                    answer = (float(logp[:, -cont_1C.shape[1]:].gather(
                        2, cont_1C[..., None]).sum()), greedy)
                    results.append(answer)
                    if req_strs is not None:
                        self.cache_hook.add_partial("loglikelihood", req_strs, answer)
        return reorder.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over disjoint windows of `max_length` tokens."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_eval_utils.make_disjoint_window,
                                 lm_eval_utils.get_rolling_token_windows(
                                     token_list=self.tok_encode(text),
                                     prefix_token=self.prefix_token_id,
                                     max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation --------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context until a stop string, end-of-text or max_gen_toks."""
        reorder = Collator([req.args for req in requests],
                           sort_fn=lambda req: (-len(self.tok_encode(req[0])), req[0]),
                           group_by="gen_kwargs", group_fn=lambda req: req[1])
        eos = self.tokenizer.decode([self.eot_token_id])
        results = []
        for chunk in reorder.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise ConfigError(f"The task asks for {max_new} new tokens but the model's context "
                                  f"is {self.max_length}: lower the task's max_gen_toks or raise "
                                  "max_length.")
            prompts = [self.tok_encode(c)[-max_ctx:] or [self.prefix_token_id] for c in contexts]
            for context, gen_kwargs, ids in zip(contexts, all_kwargs,
                                                self._generate(prompts, max_new, until, kwargs)):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return reorder.get_original(results)

    @staticmethod
    def _sampling(kwargs: dict) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) of a request's generation kwargs; temperature 0 = greedy."""
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        return temperature, int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str],
                  kwargs: dict) -> list[list[int]]:
        """New token ids per prompt (end-of-text excluded), decoded as one left-padded batch."""
        width = max(len(p) for p in prompts)
        pad_B = torch.tensor([width - len(p) for p in prompts], device=self.device)
        tokens_BS = torch.tensor([[self.eot_token_id] * (width - len(p)) + p for p in prompts])
        cache = PaddedKVCache(self.model.cfg.n_layers, width + max_new, pad_B)  # applied layers
        temperature, top_k, top_p = self._sampling(kwargs)
        generator = None
        if temperature > 0:  # sampling: repeatable, seeded per batch
            generator = torch.Generator(self.device).manual_seed(int(kwargs.get("seed", 1234)))
        out: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))  # rows of `out` still in the batch, in batch order
        logits_BV = self._logits(tokens_BS, cache)[:, -1]
        for step in range(max_new):
            next_B = sample_next_token(logits_BV, temperature, top_k, top_p, generator)
            keep = []
            for j, (row, token) in enumerate(zip(active, next_B.tolist())):
                if token == self.eot_token_id:
                    continue
                out[row].append(token)
                text = self.tok_decode(out[row])
                if not any(stop and stop in text for stop in until):
                    keep.append(j)
            if not keep or step == max_new - 1:
                break
            if len(keep) < len(active):
                rows_R = torch.tensor(keep, device=self.device)
                cache.keep_rows(rows_R)
                next_B = next_B[rows_R]
                active = [active[j] for j in keep]
            logits_BV = self._logits(next_B[:, None], cache)[:, -1]
        return out
