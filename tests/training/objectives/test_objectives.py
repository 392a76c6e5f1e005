"""Extra objectives: distillation lowers the student's KL to its teacher; MTP trains and saves."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from moe_lm.inference import load_model
from moe_lm.inference.evaluate import val_split_batches
from moe_lm.training.objectives import MTPHeads, distill_kl
from moe_lm.training.checkpoint import list_checkpoints
from tests.conftest import read_metrics
from tests.training.helpers import train_run


@torch.no_grad()
def _val_kl(student_dir, teacher) -> float:
    student = load_model(student_dir, device="cpu")
    kls = []
    for batch in val_split_batches(student):
        s = student.model(batch[:, :-1], batch[:, 1:], return_logits=False).hidden.flatten(0, 1)
        t = teacher.model(batch[:, :-1], batch[:, 1:], return_logits=False).hidden.flatten(0, 1)
        kls.append(float(distill_kl(s, student.model.head_weight_VD, t,
                                    teacher.model.head_weight_VD, 1.0)))
    return sum(kls) / len(kls)


@pytest.mark.slow
def test_distillation_lowers_the_students_kl_to_the_teacher(tiny_run, session_overrides, tmp_path):
    teacher = load_model(tiny_run, device="cpu")
    student = [*session_overrides, "trainer.max_steps=6", "model.n_layers=1", "trainer.seed=7"]
    train_run(tmp_path / "plain", student)
    train_run(tmp_path / "distilled", [*student, "loss=distill", f"loss.distill_teacher={tiny_run}",
                                       "loss.distill_coef=2.0", "loss.distill_temperature=1.0"])
    kl_rows = [r["distill_kl"] for r in read_metrics(tmp_path / "distilled") if "distill_kl" in r]
    assert kl_rows[-1] < kl_rows[0]
    assert _val_kl(tmp_path / "distilled", teacher) < _val_kl(tmp_path / "plain", teacher)


@pytest.mark.slow
def test_mtp_heads_train_checkpoint_and_leave_the_trunk_loadable(session_overrides, tmp_path):
    run = tmp_path / "mtp"
    train_run(run, [*session_overrides, "trainer.max_steps=5", "loss=mtp", "loss.mtp_depth=2",
                    "model.n_layers=1"])
    rows = [r for r in read_metrics(run) if "mtp_loss" in r]
    assert len(rows) == 5 and all(torch.isfinite(torch.tensor(r["mtp_loss"])) for r in rows)
    assert all(r["loss"] > r["lm_loss"] for r in rows)  # the MTP term is part of the total
    saved = FileSystemReader(str(list_checkpoints(run)[0].path)).read_metadata()
    assert any(k.startswith("model.mtp.depths.1.") for k in saved.state_dict_metadata)
    loaded = load_model(run, device="cpu")  # the trunk alone
    assert not hasattr(loaded.model, "mtp")


def test_mtp_loss_targets_tokens_further_ahead():
    from moe_lm.config import ExpertConfig, LossConfig, ModelConfig
    from moe_lm.model import Transformer

    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, vocab_size=50)
    model = Transformer(cfg, ExpertConfig(num_experts=2, hidden_size=16), LossConfig())
    model.init_weights()
    heads = MTPHeads(cfg, ExpertConfig(num_experts=2, hidden_size=16), LossConfig(), depth=2)
    tokens = torch.randint(0, 50, (2, 9))
    out = model(tokens[:, :-1], tokens[:, 1:], return_logits=False)
    loss = heads.loss(model, tokens, out.hidden)
    loss.backward()
    assert torch.isfinite(loss) and heads.depths[1].proj.weight.grad is not None
    # changing the last token only changes what the deepest head is asked to predict
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50
    with torch.no_grad():
        h = model(changed[:, :-1], changed[:, 1:], return_logits=False).hidden
        assert torch.allclose(h, out.hidden)
        assert not torch.isclose(heads.loss(model, changed, h), loss.detach())
