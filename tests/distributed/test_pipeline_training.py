"""`parallel.pp` in the Trainer trains exactly like one process; its checkpoints reshard.

A pp=2 run reads the whole batch on both ranks (no data parallelism) and cuts each step's
trainer.grad_accum=2 loader batches into 2 microbatches, so it equals one process with the same
data.batch_size and gradient accumulation: per step the loss, the gradient norm over all stages,
the validation loss and every MoE layer's token counts (from both stages) must agree. The pp=2
run's step-3 checkpoint then resumes in one process and with tp=2, and the single process's in a
pp=2 run: steps 4-5 equal the uninterrupted run. Impossible pipelines fail before the model.
"""

from __future__ import annotations

import json
import shutil

import pytest

from moe_lm.errors import ConfigError
from moe_lm.training.checkpoint import list_checkpoints
from tests.conftest import read_metrics, train_losses
from tests.distributed.helpers import (REL_TOL, STEPS, assert_losses_close,
                                       assert_stopped_before_step, grad_norms, spawn_ranks,
                                       torchrun_train)
from tests.distributed.test_layout_errors import no_model_allocation  # noqa: F401 (fixture)
from tests.distributed.workers import train_rank
from tests.training.helpers import train_in_process

pytestmark = pytest.mark.distributed

PIPE = ["model.tie_embeddings=false", "trainer.grad_accum=2", "trainer.ckpt_every=3"]


def _torchrun(run, overrides, nproc=2):
    proc = torchrun_train(run, overrides, nproc=nproc, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_same_run(got_dir, want_dir, steps=range(1, STEPS + 1), what=""):
    got, want = train_losses(got_dir), train_losses(want_dir)
    norms, want_norms = grad_norms(got_dir), grad_norms(want_dir)
    loss_diff = max(abs(got[s] - want[s]) for s in steps)
    norm_diff = max(abs(norms[s] - want_norms[s]) for s in steps)
    print(f"{what}: max |loss diff| {loss_diff:.3g}, max |grad norm diff| {norm_diff:.3g}")
    assert_losses_close(got, want, steps)
    assert_losses_close(norms, want_norms, steps, "grad_norm")


def _routing(run_dir):
    """step -> every MoE layer's token counts (rank 0's row: all stages' layers)."""
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("tokens_per_expert")}
            for r in read_metrics(run_dir) if "loss" in r}


def _val(run_dir):
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}


def _from_step_3(src, dst):
    """A copy of run `src` as it was after step 3: its step-5 checkpoint and the metrics rows
    of later steps removed (the resumed run must write them again)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_0000005")
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= 3]
    (dst / "metrics.jsonl").write_text("".join(f"{line}\n" for line in kept))
    assert max(train_losses(dst)) == 3
    return dst


@pytest.fixture(scope="module")
def pipe_overrides(dist_overrides):
    return [*dist_overrides, *PIPE]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe_overrides):
    run = tmp_path_factory.mktemp("pipe_single")
    train_in_process(run, pipe_overrides)
    return run


@pytest.fixture(scope="module")
def pipe_run(tmp_path_factory, pipe_overrides):
    run = tmp_path_factory.mktemp("pipe_pp2")
    _torchrun(run, [*pipe_overrides, "parallel.pp=2"])
    return run


@pytest.mark.slow
def test_pipeline_2_equals_single_process(pipe_run, reference):
    _assert_same_run(pipe_run, reference, what="pp=2 1F1B")
    assert _routing(pipe_run) == _routing(reference)  # both stages' layers, every step
    # the one MoE layer (block 1) lives on rank 1's stage: its counts reached rank 0's log
    assert list(_routing(pipe_run)[1]) == ["moe/layer0/tokens_per_expert"]
    val, want = _val(pipe_run), _val(reference)
    assert sorted(val) == sorted(want) == [0, STEPS]
    assert_losses_close(val, want, [0, STEPS], "val_loss")


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_on_one_process_and_back(tmp_path, pipe_run, reference,
                                                             pipe_overrides):
    """pp=2 -> one process, and one process -> pp=2, from the step-3 checkpoints."""
    one = _from_step_3(pipe_run, tmp_path / "pp2_to_1")
    train_in_process(one, pipe_overrides)
    _assert_same_run(one, reference, what="pp=2 -> 1")
    pipe = _from_step_3(reference, tmp_path / "1_to_pp2")
    proc = _torchrun(pipe, [*pipe_overrides, "parallel.pp=2"])
    assert "resumed from" in proc.stdout + proc.stderr
    _assert_same_run(pipe, reference, what="1 -> pp=2")


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_with_tensor_parallel(tmp_path, pipe_run, reference,
                                                          pipe_overrides):
    run = _from_step_3(pipe_run, tmp_path / "pp2_to_tp2")
    proc = _torchrun(run, [*pipe_overrides, "parallel.tp=2"])
    assert "resumed from" in proc.stdout + proc.stderr
    _assert_same_run(run, reference, what="pp=2 -> tp=2")


@pytest.mark.slow
def test_tensor_parallel_checkpoint_resumes_in_a_pipeline(tmp_path, reference, pipe_overrides):
    _torchrun(tmp_path, [*pipe_overrides, "parallel.tp=2", "trainer.stop_at=3"])
    proc = _torchrun(tmp_path, [*pipe_overrides, "parallel.pp=2"])
    assert "resumed from" in proc.stdout + proc.stderr
    _assert_same_run(tmp_path, reference, what="tp=2 -> pp=2")


@pytest.mark.slow
def test_interleaved_pipeline_equals_single_process(tmp_path, pipe_overrides):
    """Interleaved1F1B: 4 stages of one block, 2 per rank (looped placement)."""
    overrides = [*pipe_overrides, "model.n_layers=4"]
    train_in_process(tmp_path / "single", overrides)
    _torchrun(tmp_path / "pp2", [*overrides, "parallel.pp=2",
                                 "parallel.pp_schedule=Interleaved1F1B"])
    _assert_same_run(tmp_path / "pp2", tmp_path / "single", what="pp=2 Interleaved1F1B")
    routing = _routing(tmp_path / "pp2")
    assert routing == _routing(tmp_path / "single")
    assert len(routing[1]) == 3  # MoE blocks 1-3, on stages of both ranks
    val, want = _val(tmp_path / "pp2"), _val(tmp_path / "single")
    assert sorted(val) == sorted(want) == [0, STEPS]  # through the forward-only schedule
    assert_losses_close(val, want, [0, STEPS], "val_loss")


@pytest.mark.slow
def test_aux_free_balancing_in_an_interleaved_pipeline_equals_single_process(tmp_path,
                                                                          pipe_overrides):
    """expert=aux_free: each rank nudges the biases of its own MoE layers (rank 0: layer 2,
    rank 1: layers 1 and 3) from the whole model's loads, and rank 0 logs every layer's bias."""
    overrides = [*pipe_overrides, "model.n_layers=4", "expert=aux_free", "loss=aux_free"]
    train_in_process(tmp_path / "single", overrides)
    _torchrun(tmp_path / "pp2", [*overrides, "parallel.pp=2",
                                 "parallel.pp_schedule=Interleaved1F1B"])
    _assert_same_run(tmp_path / "pp2", tmp_path / "single", what="pp=2 aux_free")

    def biases(run):
        return {r["step"]: {k: v for k, v in r.items() if k.endswith("score_bias")}
                for r in read_metrics(run) if "loss" in r}

    got, want = biases(tmp_path / "pp2"), biases(tmp_path / "single")
    assert len(want[STEPS]) == 3 and any(b != [0.0] * 4 for b in want[STEPS].values())
    assert got.keys() == want.keys()
    for step in want:
        for key, bias in want[step].items():
            assert got[step][key] == pytest.approx(bias, rel=REL_TOL, abs=1e-9), (step, key)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["InterleavedZeroBubble", "ZBVZeroBubble"])
def test_zero_bubble_pipeline_equals_single_process(tmp_path, pipe_overrides, schedule):
    """4 stages of one block, 2 per rank (looped, or V: rank 0 holds stages 0 and 3), the
    backward split into input- and weight-gradient passes on FSDP2 stages (their blocks kept
    gathered from forward to backward: resharded ones lost their weight gradients); the
    validation runs the schedule's forward actions only."""
    overrides = [*pipe_overrides, "model.n_layers=4"]
    train_in_process(tmp_path / "single", overrides)
    _torchrun(tmp_path / "pp2", [*overrides, "parallel.pp=2",
                                 f"parallel.pp_schedule={schedule}"])
    _assert_same_run(tmp_path / "pp2", tmp_path / "single", what=f"pp=2 {schedule}")
    assert _routing(tmp_path / "pp2") == _routing(tmp_path / "single")
    val, want = _val(tmp_path / "pp2"), _val(tmp_path / "single")
    assert sorted(val) == sorted(want) == [0, STEPS]
    assert_losses_close(val, want, [0, STEPS], "val_loss")


@pytest.mark.slow
def test_zero_bubble_pipeline_with_fsdp_shards_equals_fsdp(tmp_path, pipe_overrides):
    """4 processes, ZBVZeroBubble over 2 stages per rank, each stage FSDP2-sharded over 2 ranks
    that read half the batch each: the split backward's weight gradients reach FSDP's
    reduce-scatter. Against dp_shard=2 without a pipeline (the same ranks' batches; 2-rank data
    parallelism itself differs from one process, see the pp=2 x ep=2 test)."""
    overrides = [o for o in pipe_overrides if not o.startswith("data.batch_size")]
    per_rank = [*overrides, "data.batch_size=4", "parallel.dp_shard=2", "model.n_layers=4"]
    _torchrun(tmp_path / "dp2", per_rank)
    _torchrun(tmp_path / "pp2dp2", [*per_rank, "parallel.pp=2",
                                    "parallel.pp_schedule=ZBVZeroBubble"], nproc=4)
    _assert_same_run(tmp_path / "pp2dp2", tmp_path / "dp2", what="pp=2 ZBV x dp_shard=2")
    val, want = _val(tmp_path / "pp2dp2"), _val(tmp_path / "dp2")
    assert_losses_close(val, want, [0, STEPS], "val_loss")


@pytest.mark.slow
def test_pipeline_2_with_expert_parallel_2_equals_single_process(tmp_path, pipe_overrides):
    """4 processes: 2 stages, each split over 2 EP ranks that read half the batch each (dense
    weights FSDP-sharded over them); full activation checkpointing on the way (it changes
    memory, never the numbers). Losses and routing equal one process; the gradient norm equals
    that of ep=2 without a pipeline (the same ranks' batches): 2 data-parallel ranks (ep=2 or
    dp_shard=2 alike) differ from one process by up to ~3e-5 (relative) in the gradient norm
    here (experiments/results/pipeline_training_2026-12-02.md)."""
    overrides = [o for o in pipe_overrides if not o.startswith("data.batch_size")]
    train_in_process(tmp_path / "single", [*overrides, "data.batch_size=8"])
    per_rank = [*overrides, "data.batch_size=4", "parallel.ep=2"]
    _torchrun(tmp_path / "ep2", per_rank)
    _torchrun(tmp_path / "pp2ep2", [*per_rank, "parallel.pp=2",
                                    "trainer.activation_checkpointing=full"], nproc=4)
    got, single, ep2 = (tmp_path / "pp2ep2", tmp_path / "single", tmp_path / "ep2")
    assert_losses_close(train_losses(got), train_losses(single), range(1, STEPS + 1))
    assert _routing(got) == _routing(single)
    _assert_same_run(got, ep2, what="pp=2 x ep=2 vs ep=2")
    norms, want = grad_norms(got), grad_norms(single)
    print("pp=2 x ep=2 vs one process: max |grad norm diff|",
          max(abs(norms[s] - want[s]) for s in want))


@pytest.mark.slow
def test_pipeline_nan_on_the_last_stage_stops_both_before_the_step(tmp_path, pipe_overrides):
    run = tmp_path / "run"
    ranks = spawn_ranks(train_rank, (str(run), [*pipe_overrides, "parallel.pp=2"],
                                     "pipeline_nan", 3), tmp_path / "out", timeout=300)
    assert_stopped_before_step(ranks, run, 3)


@pytest.mark.slow
def test_pipeline_sigterm_on_one_rank_checkpoints_once_and_exits(tmp_path, pipe_overrides):
    run = tmp_path / "run"
    ranks = spawn_ranks(train_rank, (str(run), [*pipe_overrides, "parallel.pp=2"],
                                     "pipeline_sigterm", 2), tmp_path / "out", timeout=300)
    assert all(r["ok"] for r in ranks), ranks
    assert [c.step for c in list_checkpoints(run)] == [2]
    assert max(row["step"] for row in read_metrics(run)) == 2


@pytest.mark.parametrize("change, match", [
    (["parallel.pp=4"], r"parallel.pp=4 with parallel.pp_schedule=1F1B makes 4 stages, more "
                        r"than model.n_layers=2"),
    (["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B"], r"makes 4 stages, more than"),
    (["parallel.pp=2", "trainer.grad_accum=1"], r"parallel.pp_microbatches=1 is fewer than "
                                                r"the 2 pipeline ranks"),
    (["parallel.pp=2", "parallel.pp_microbatches=3"], r"parallel.pp_microbatches=3 does not "
                                                      r"divide"),
    (["parallel.pp=2", "parallel.tp=2"], r"parallel.pp=2 with parallel.tp=2 is not supported"),
    (["parallel.pp=2", "model.tie_embeddings=true"], r"needs model.tie_embeddings=false"),
    (["parallel.pp=2", "trainer.compile=true"], r"trainer.compile=true with parallel.pp > 1"),
])
def test_impossible_pipelines_fail_before_the_model(tmp_path, tiny_overrides, change, match,
                                                    no_model_allocation):  # noqa: F811
    keys = {c.split("=")[0] for c in change}
    base = [o for o in PIPE if o.split("=")[0] not in keys]
    with pytest.raises(ConfigError, match=match):
        train_in_process(tmp_path, [*tiny_overrides, *base, *change])
