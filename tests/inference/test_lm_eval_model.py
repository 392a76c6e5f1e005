"""moe_lm's lm-eval model against lm-eval's own Hugging Face model on the exported Mixtral.

The local tasks in lm_eval_tasks/ (YAML + jsonl, no network) are run through
`lm_eval.simple_evaluate` twice on the same weights: moe_lm's `MoeLM` on the tiny trained run,
and lm-eval's `hf` model (HFLM) on the directory `moe_lm.export_hf` writes, with a transformers
tokenizer giving the same ids. Scores and per-request log-likelihoods must agree within 1e-4,
greedy generations exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_lm.compress.weight_only import quantize_model
from moe_lm.errors import MoeLMError
from moe_lm.interop.hf_export import export
from moe_lm.inference import load_model
from moe_lm.inference import lm_eval_model
from moe_lm.inference.lm_eval_model import MoeLM
from moe_lm.parallel.precision import bf16_supported

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["moe_lm_test_mc", "moe_lm_test_gen", "moe_lm_test_rolling"]
BATCH = 8


def task_texts() -> list[str]:
    """Every text of the local tasks' documents (what both tokenizers must agree on)."""
    texts = []
    for name in ("mc", "gen", "text"):
        for line in (TASK_DIR / f"{name}.jsonl").read_text().splitlines():
            doc = json.loads(line)
            texts += [doc.get("question", ""), *doc.get("choices", []), doc.get("prompt", ""),
                      doc.get("text", "")]
    return [t for t in texts if t]


def run_tasks(lm, tasks=TASKS) -> dict:
    """simple_evaluate on the local tasks, offline, per-request responses kept."""
    from lm_eval.tasks import TaskManager
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(TASK_DIR)  # the YAMLs name their jsonl files relative to the working directory
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True,
                                       task_manager=TaskManager(include_path=str(TASK_DIR)),
                                       bootstrap_iters=0)


def responses(result: dict, task: str) -> list:
    """Per document, the raw responses: [(loglikelihood, is_greedy), ...], [text] or [total]."""
    return [sample["resps"] for sample in result["samples"][task]]


@pytest.fixture(scope="module")
def side_by_side(tiny_run, tmp_path_factory):
    """The local tasks through MoeLM and through lm-eval's HFLM on the exported model."""
    from lm_eval.models.huggingface import HFLM

    from tests.inference.hf_tokenizer import hf_tokenizer_like

    out = export(tiny_run, tmp_path_factory.mktemp("hf") / "mixtral")
    ours = MoeLM(str(tiny_run), device="cpu", batch_size=BATCH)
    hf_tok = hf_tokenizer_like(ours.tokenizer)
    assert all(hf_tok.encode(t) == ours.tok_encode(t) for t in task_texts())
    theirs = HFLM(pretrained=str(out), tokenizer=hf_tok, device="cpu", dtype="float32",
                  batch_size=BATCH)
    assert theirs.max_length == ours.max_length
    return ours, run_tasks(ours), run_tasks(theirs)


def test_multiple_choice_scores_and_loglikelihoods_equal_lm_evals_hf_model(side_by_side):
    _, ours, theirs = side_by_side
    task = "moe_lm_test_mc"
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][task][metric] == pytest.approx(theirs["results"][task][metric],
                                                              abs=1e-4)
    # per document, per choice: [(log-likelihood, is greedy)]
    pairs = [(a[0], b[0]) for doc_a, doc_b in zip(responses(ours, task), responses(theirs, task))
             for a, b in zip(doc_a, doc_b, strict=True)]
    assert len(pairs) == sum(len(json.loads(line)["choices"]) for line in
                             (TASK_DIR / "mc.jsonl").read_text().splitlines())
    for (ll_a, greedy_a), (ll_b, greedy_b) in pairs:
        assert ll_a == pytest.approx(ll_b, abs=1e-4) and greedy_a == greedy_b


def test_rolling_loglikelihoods_equal_lm_evals_hf_model(side_by_side):
    ours_lm, ours, theirs = side_by_side
    task = "moe_lm_test_rolling"
    lines = (TASK_DIR / "text.jsonl").read_text().splitlines()
    longest = max(len(ours_lm.tok_encode(json.loads(line)["text"])) for line in lines)
    assert longest > 2 * ours_lm.max_length  # several windows
    for a, b in zip(responses(ours, task), responses(theirs, task)):
        assert a[0][0] == pytest.approx(b[0][0], rel=1e-6, abs=1e-4)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"][task][metric] == pytest.approx(theirs["results"][task][metric],
                                                              rel=1e-4)


def test_greedy_generations_equal_lm_evals_hf_model(side_by_side):
    _, ours, theirs = side_by_side
    task = "moe_lm_test_gen"
    ours_text, theirs_text = responses(ours, task), responses(theirs, task)
    assert ours_text == theirs_text and any(t[0][0].strip() for t in ours_text)
    assert ours["results"][task]["exact_match,none"] == theirs["results"][task]["exact_match,none"]


@pytest.fixture(scope="module")
def requests(tiny_run):
    """The local tasks' requests as lm-eval builds them: loglikelihood, rolling, generate."""
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(TASK_DIR)
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        tasks = TaskManager(include_path=str(TASK_DIR)).load(TASKS)["tasks"]
        out = {}
        for name, task in tasks.items():
            task.build_all_requests(limit=None, rank=0, world_size=1)
            out[name] = [inst for inst in task.instances]
    return out


def test_batch_size_1_and_8_give_the_same_results(tiny_run, requests):
    loaded = load_model(tiny_run, device="cpu")
    one, eight = MoeLM(loaded, batch_size=1), MoeLM(loaded, batch_size=8)
    mc = requests["moe_lm_test_mc"]
    for (a, ga), (b, gb) in zip(one.loglikelihood(mc), eight.loglikelihood(mc)):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    rolling = requests["moe_lm_test_rolling"]
    assert one.loglikelihood_rolling(rolling) == pytest.approx(
        eight.loglikelihood_rolling(rolling), rel=1e-6, abs=1e-5)
    gen = requests["moe_lm_test_gen"]
    assert one.generate_until(gen) == eight.generate_until(gen)


def test_padded_batch_generation_equals_one_prompt_at_a_time(tiny_run):
    """Left padding is masked: each prompt continues as it does alone (no stop, 6 tokens)."""
    lm = MoeLM(str(tiny_run), device="cpu", batch_size=4)
    texts = ("x", "import os\nimport sys\n", "def f(a, b", "The capital of")
    prompts = [lm.tok_encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    batched = lm._generate(prompts, 6, [], {})
    alone = [lm._generate([p], 6, [], {})[0] for p in prompts]
    assert batched == alone and all(len(ids) == 6 for ids in batched)


def test_bf16_loglikelihoods_stay_close_to_fp32(tiny_run, requests):
    loaded = load_model(tiny_run, device="cpu")
    mc = requests["moe_lm_test_mc"]
    fp32 = [ll for ll, _ in MoeLM(loaded, batch_size=8, precision="fp32").loglikelihood(mc)]
    if not bf16_supported("cpu"):  # moe_lm's precision policy falls back to fp32, with a warning
        with pytest.warns(UserWarning, match="bf16 is not supported"):
            lm = MoeLM(loaded, batch_size=8, precision="bf16")
        assert lm.precision == "fp32" and [ll for ll, _ in lm.loglikelihood(mc)] == fp32
        return
    bf16 = [ll for ll, _ in MoeLM(loaded, batch_size=8, precision="bf16").loglikelihood(mc)]
    assert fp32 != bf16  # the bf16 path really ran in bf16
    # bf16 keeps 8 mantissa bits: relative errors of order 2^-8 per op
    assert bf16 == pytest.approx(fp32, rel=0.05)


# max |log-likelihood change| / |log-likelihood| over the multiple-choice requests of the
# 10-step tiny run, whose logits move by at most 2% (int8) / 50% (int4) of their largest value
# (tests/compress/test_weight_only.py); measured 4.2e-4 (int8) and 0.017 (int4)
LL_BOUNDS = {"int8": 0.01, "int4": 0.1}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_loglikelihoods_stay_close_to_full_precision(tiny_run, requests, mode):
    """The lm-eval path with `--quantize`: a LoadedModel quantized by torchao, as eval does."""
    pytest.importorskip("torchao")
    loaded = load_model(tiny_run, device="cpu")
    mc = requests["moe_lm_test_mc"]

    def loglikelihoods():
        lm = MoeLM(loaded, batch_size=8, precision="fp32")
        return torch.tensor([ll for ll, _ in lm.loglikelihood(mc)])

    fp32 = loglikelihoods()
    quantize_model(loaded.model, mode)
    rel = float(((loglikelihoods() - fp32).abs() / fp32.abs()).max())
    assert 0 < rel <= LL_BOUNDS[mode], rel


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(lm_eval_model, "LM_EVAL_ERROR", ImportError("No module named 'lm_eval'"))
    with pytest.raises(MoeLMError, match=r"pip install -e \"\.\[eval\]\""):
        MoeLM(model=torch.nn.Linear(1, 1), tokenizer=None)


def test_registered_with_lm_eval_as_moe_lm(tiny_run):
    from lm_eval.api.registry import get_model

    assert get_model("moe_lm") is MoeLM
    lm = MoeLM.create_from_arg_string(f"pretrained={tiny_run},device=cpu,batch_size=4")
    assert lm.batch_size == 4 and lm.max_length == load_model(tiny_run).cfg.data.seq_len
