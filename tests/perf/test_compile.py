"""`trainer.compile=true`: the compiled blocks compute the eager model's loss and gradients."""

import pytest
import torch

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig
from moe_lm.model import Transformer
from moe_lm.training.compile import compile_blocks


def _model(backend: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      n_dense_layers=1, vocab_size=97)
    model = Transformer(cfg, ExpertConfig(num_experts=4, top_k=2, hidden_size=32,
                                          backend=backend), LossConfig())
    model.init_weights()
    return model


def _loss_and_grads(model, tokens, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(tokens[:, :-1], tokens[:, 1:], return_logits=False)
        loss = out.lm_loss + 0.01 * sum(s.terms["aux_loss"].value for s in out.moe_stats)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_blocks_match_eager_loss_and_gradients(autocast):
    torch._dynamo.reset()
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    eager = _model("torch")
    compiled = compile_blocks(_model("torch"), torch.device("cpu"), backend="aot_eager")
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    for _ in range(2):  # the second call runs the cached graphs
        ref_loss, ref_grads = _loss_and_grads(eager, tokens, autocast)
        loss, grads = _loss_and_grads(compiled, tokens, autocast)
        tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss, ref_loss, **tol)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, **tol, msg=name)
