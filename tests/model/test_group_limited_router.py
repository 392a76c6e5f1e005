"""Group-limited (node-limited) routing against a plain per-token reference, its config errors,
and a tiny training run of the `expert=group_limited` preset from the CLI."""

from __future__ import annotations

import pytest
import torch

from moe_lm.config import ExpertConfig, LossConfig, TrainConfig, validate
from moe_lm.errors import ConfigError
from moe_lm.model.routers import GroupLimitedTopK, SigmoidTopK, build_router
from tests.conftest import read_metrics
from tests.training.helpers import train_cli


def reference_selection(biased_TE: torch.Tensor, num_groups: int, topk_groups: int,
                        top_k: int) -> list[set[int]]:
    """Per token, in plain Python: score each group by the sum of its two best biased scores,
    keep the `topk_groups` best groups, then the `top_k` best experts among theirs."""
    T, E = biased_TE.shape
    size = E // num_groups
    chosen = []
    for t in range(T):
        s = biased_TE[t].tolist()
        group_score = [sum(sorted(s[g * size:(g + 1) * size], reverse=True)[:2])
                       for g in range(num_groups)]
        groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
        candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen.append(set(sorted(candidates, key=lambda e: -s[e])[:top_k]))
    return chosen


@pytest.mark.parametrize("E, G, g, k", [(8, 4, 2, 2), (16, 4, 1, 3), (12, 3, 2, 4), (8, 2, 2, 2)])
def test_selection_matches_the_plain_reference_with_and_without_bias(E, G, g, k):
    torch.manual_seed(E + G + g + k)
    cfg = ExpertConfig(num_experts=E, top_k=k, router="group_limited", num_groups=G,
                       topk_groups=g)
    router = build_router(16, cfg, LossConfig())
    assert isinstance(router, GroupLimitedTopK)
    x_TD = torch.randn(64, 16)
    for bias in (torch.zeros(E), torch.randn(E) * 0.3):
        router.score_bias.copy_(bias)
        r = router(x_TD)
        scores_TE = torch.sigmoid(router.gate(x_TD).float())
        want = reference_selection(scores_TE + bias, G, g, k)
        assert [set(row) for row in r.expert_idx_Tk.tolist()] == want
        groups_used = (r.expert_idx_Tk // (E // G)).tolist()
        assert all(len(set(row)) <= g for row in groups_used)
        top_Tk = scores_TE.gather(-1, r.expert_idx_Tk)  # weights: unbiased scores, normalised
        torch.testing.assert_close(r.weights_Tk, top_Tk / top_Tk.sum(-1, keepdim=True))
        torch.testing.assert_close(r.probs_TE, scores_TE / scores_TE.sum(-1, keepdim=True))


def test_group_limit_changes_the_choice_of_some_tokens():
    # the same gate as a plain sigmoid router: with one group of four kept, some tokens whose
    # two best experts sit in different groups must get another pair
    torch.manual_seed(0)
    limited = build_router(16, ExpertConfig(num_experts=8, top_k=2, router="group_limited",
                                            num_groups=2, topk_groups=1), LossConfig())
    plain = build_router(16, ExpertConfig(num_experts=8, top_k=2, router="sigmoid"),
                         LossConfig())
    assert type(plain) is SigmoidTopK
    plain.gate.load_state_dict(limited.gate.state_dict())
    x_TD = torch.randn(128, 16)
    a, b = limited(x_TD).expert_idx_Tk.sort(-1).values, plain(x_TD).expert_idx_Tk.sort(-1).values
    differs = (a != b).any(-1)
    spans_groups = (b // 4)[:, 0] != (b // 4)[:, 1]
    assert differs.any() and torch.equal(differs, spans_groups)


@pytest.mark.parametrize("expert, words", [
    (dict(router="group_limited", num_experts=8, num_groups=3), "divide expert.num_experts=8"),
    (dict(router="group_limited", num_experts=8, num_groups=8), "at least 2"),
    (dict(router="group_limited", num_experts=8, num_groups=4, topk_groups=5),
     "expert.topk_groups=5"),
    (dict(router="group_limited", num_experts=8, top_k=3, num_groups=4, topk_groups=1),
     "raise expert.topk_groups"),
    (dict(router="softmax", num_groups=4, topk_groups=2), "expert.router=group_limited only"),
])
def test_impossible_group_settings_raise_config_error_saying_what_to_change(expert, words):
    with pytest.raises(ConfigError, match=words):
        validate(TrainConfig(expert=ExpertConfig(**expert)))


def test_group_limited_preset_trains_from_the_cli(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    steps = ["trainer.max_steps=6", "trainer.eval_every=6", "trainer.ckpt_every=6",
             "optim.lr=3e-3"]
    # the tiny model has 4 experts: two groups of two, one kept per token
    proc = train_cli(run, [*tiny_overrides, *steps, "expert=group_limited",
                           "expert.num_groups=2", "expert.topk_groups=1"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    rows = read_metrics(run)
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    train = [r for r in rows if "loss" in r]
    assert train[-1]["step"] == 6 and all(r["moe/dropped_frac"] == 0 for r in train)
    assert all(r["aux_loss"] > 0 for r in train)
