"""`model.share_layers`: one tensor per shared weight, counted and stored once, the same function
as an unshared model whose layers hold identical copies, and bad values refused up front."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from moe_lm.compress.prune import expert_usage, prune_model
from moe_lm.config import ExpertConfig, LossConfig, ModelConfig, TrainConfig, validate
from moe_lm.errors import ConfigError
from moe_lm.model import Transformer, count_params
from moe_lm.parallel import apply_activation_checkpointing
from moe_lm.planning.counting import build_meta_model, count_by_component, totals
from moe_lm.training.checkpoint import list_checkpoints
from tests.conftest import train_losses
from tests.training.helpers import train_in_process

EXPERT = ExpertConfig(num_experts=4, top_k=2, hidden_size=16)


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layers": 4, "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
                          "ffn_hidden": 48, "vocab_size": 97, "n_dense_layers": 2,
                          "share_layers": 2, **kw})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    net = Transformer(cfg, EXPERT, LossConfig())
    torch.manual_seed(seed)
    net.init_weights()
    return net


def test_a_shared_block_is_one_set_of_parameters():
    net = build(model_cfg())
    applied = net.applied_layers()
    assert len(net.layers) == 2 and len(applied) == 4
    assert applied[0] is applied[1] and applied[2] is applied[3] and applied[1] is not applied[2]
    assert applied[0].attn.wq.weight.data_ptr() == applied[1].attn.wq.weight.data_ptr()
    names = [n for n, _ in net.named_parameters()]
    assert not any(n.startswith(("layers.2.", "layers.3.")) for n in names)
    ptrs = [p.data_ptr() for p in net.parameters()]
    assert len(ptrs) == len(set(ptrs))  # no parameter appears twice
    assert set(net.state_dict()) == {*names, *(n for n, _ in net.named_buffers())}


@pytest.mark.parametrize("kw", [{}, {"n_dense_layers": 0, "share_layers": 4},
                                {"n_dense_layers": 4, "moe_every": 3, "tie_embeddings": False}])
def test_parameter_count_and_plan_count_a_shared_block_once(kw):
    cfg = model_cfg(**kw)
    real = build(cfg)
    n_real = sum(p.numel() for p in real.parameters())
    # the same distinct blocks, unshared: n_layers / share_layers layers of one application each
    N = cfg.share_layers
    distinct = dataclasses.replace(cfg, n_layers=cfg.n_layers // N, share_layers=1,
                                   n_dense_layers=min(cfg.n_dense_layers, cfg.n_layers) // N)
    assert n_real == sum(p.numel() for p in build(distinct).parameters())
    assert count_params(cfg, EXPERT) == count_params(distinct, EXPERT)
    assert count_params(cfg, EXPERT)["total"] == n_real
    train = TrainConfig(model=cfg, expert=EXPERT)
    table = count_by_component(build_meta_model(train), EXPERT.top_k, EXPERT.num_experts)
    assert totals(table)["total"] == n_real


def test_logits_and_gradients_equal_an_unshared_model_with_identical_layer_copies():
    shared = build(model_cfg(), seed=1)
    plain = build(model_cfg(share_layers=1), seed=2)
    for i, block in enumerate(plain.layers):
        block.load_state_dict(shared.layers[i // 2].state_dict())
    for name in ("embed", "norm"):
        getattr(plain, name).load_state_dict(getattr(shared, name).state_dict())
    tokens = torch.randint(0, 97, (2, 10))
    out_s, out_p = shared(tokens[:, :-1], tokens[:, 1:]), plain(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(out_s.logits, out_p.logits, rtol=1e-5, atol=1e-6)
    assert len(out_s.moe_stats) == len(out_p.moe_stats) == 2  # routing stats per applied layer
    out_s.lm_loss.backward()
    out_p.lm_loss.backward()
    # a shared weight's gradient is the sum of its copies' gradients
    for j, block in enumerate(shared.layers):
        for name, p in block.named_parameters():
            want = sum(dict(plain.layers[i].named_parameters())[name].grad for i in (2 * j, 2 * j + 1))
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw, words", [
    ({"share_layers": 3}, "divisor of model.n_layers=4"),
    ({"share_layers": 0}, "divisor of model.n_layers=4"),
    ({"n_dense_layers": 1}, "n_dense_layers a multiple of 2"),
    ({"n_dense_layers": 0, "moe_every": 2}, "model.moe_every=1"),
])
def test_bad_sharing_is_refused_before_anything_is_built(kw, words):
    cfg = TrainConfig(model=model_cfg(**kw), expert=EXPERT)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        validate(cfg)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        Transformer(cfg.model, EXPERT, LossConfig())


def test_sharing_with_pipeline_stages_is_refused():
    cfg = TrainConfig(model=model_cfg(), expert=EXPERT)
    cfg.parallel.pp = 2
    with pytest.raises(ConfigError, match="parallel.pp=1"):
        validate(cfg)


SHARED_RUN = ["model.n_layers=4", "model.n_dense_layers=2", "model.share_layers=2",
              "trainer.max_steps=5", "trainer.ckpt_every=3"]


@pytest.mark.slow
def test_checkpoint_stores_a_shared_weight_once_and_resume_equals_an_uninterrupted_run(
        tiny_overrides, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_in_process(whole, [*tiny_overrides, *SHARED_RUN])
    train_in_process(split, [*tiny_overrides, *SHARED_RUN, "trainer.stop_at=3"])
    saved = FileSystemReader(str(list_checkpoints(split)[-1].path)).read_metadata()
    keys = [k for k in saved.state_dict_metadata if k.startswith("model.layers.")]
    assert {k.split(".")[2] for k in keys} == {"0", "1"}  # 2 distinct blocks of 4 layers
    assert sum(k.startswith("optim.state.layers.") for k in saved.state_dict_metadata) > 0
    assert not any(k.startswith(("optim.state.layers.2.", "optim.state.layers.3."))
                   for k in saved.state_dict_metadata)
    train_in_process(split, [*tiny_overrides, *SHARED_RUN])  # resumes from step 3
    summary = next(line for line in (split / "train.log").read_text().splitlines()
                   if "model:" in line)
    assert "4 layers (2 distinct blocks, each applied 2 times)" in summary
    want, got = train_losses(whole), train_losses(split)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0)


def test_pruning_counts_a_shared_blocks_tokens_over_all_its_applied_layers():
    cfg = model_cfg(n_dense_layers=0)  # 2 shared MoE blocks, 4 applied MoE layers
    net = build(cfg).eval()
    batch = torch.randint(0, 97, (2, 13))
    usage = expert_usage(net, [batch])
    with torch.no_grad():
        stats = net(batch[:, :-1], batch[:, 1:], return_logits=False).moe_stats
    assert len(stats) == 4 and len(usage) == 2
    for j in range(2):
        want = stats[2 * j].tokens_per_expert.float() + stats[2 * j + 1].tokens_per_expert.float()
        torch.testing.assert_close(usage[j], want)
    train = TrainConfig(model=cfg, expert=EXPERT)
    pruned, new_cfg, kept = prune_model(net, train, usage, keep=2)
    assert len(kept) == 2 and new_cfg.expert.num_experts == 2
    assert len(pruned.layers) == 2 and pruned.layers[0].mlp.experts.w1_EDF.shape[0] == 2


def test_activation_checkpointing_of_a_shared_block_gives_the_same_gradients():
    plain, ckpt = build(model_cfg(), seed=3), build(model_cfg(), seed=3)
    apply_activation_checkpointing(ckpt, "full")  # per distinct block, recomputed per use
    tokens = torch.randint(0, 97, (2, 10))
    for net in (plain, ckpt):
        net(tokens[:, :-1], tokens[:, 1:]).lm_loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
