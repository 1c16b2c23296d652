"""The model's prunable linears and RSST's penalty through the Triton backend (CPU: Triton's
interpreter) give the same training steps as the PyTorch reference."""
import contextlib

import pytest
import torch

from vitprune import kernels
from vitprune.config import Config
from vitprune.methods import RsstRegularizer
from vitprune.model import build_model, set_kernels
from vitprune.structure import Structure, apply_structure
from vitprune.train import make_optimizer, train_step

pytestmark = pytest.mark.skipif(not kernels.triton_importable(), reason="triton is not installed")


def pruned_micro(backend):
    torch.manual_seed(0)
    model = build_model("vit_micro", 10)
    g = torch.Generator().manual_seed(1)
    heads = torch.rand(4, 4, generator=g) < 0.6
    heads[:, 0] = True
    neurons = torch.rand(4, 128, generator=g) < 0.4
    neurons[:, 0] = True
    apply_structure(model, Structure(heads, neurons))
    masked_linear, group_reg = kernels.get_ops(backend)
    set_kernels(model, masked_linear)
    return model, group_reg


@pytest.mark.slow
@pytest.mark.parametrize("method", ["refill", "rsst"])
def test_triton_backend_trains_like_reference(method, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = Config(method=method, optimizer="sgd", lr=0.05, epochs=1, reg_granularity_prune=5.0)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(2)]
    results = {}
    for backend in ("torch", "triton"):
        model, group_reg = pruned_micro(backend)
        opt, sched = make_optimizer(cfg, model, 2, torch.device("cpu"))
        rsst = None
        if method == "rsst":
            head_t = torch.zeros(4, 4, dtype=torch.bool)
            head_t[:, 0] = True  # regularise one alive head per layer and the first neuron
            neuron_t = torch.zeros(4, 128, dtype=torch.bool)
            neuron_t[:, 0] = True
            rsst = RsstRegularizer(model, head_t, neuron_t, 2, group_reg, formula="seed", schedule=cfg.reg_schedule,
                                   k=cfg.exponents, kind=cfg.reg_kind, residual=1.0, g=cfg.reg_granularity_prune,
                                   optimizer="sgd", lr=cfg.lr)
        losses = [train_step(model, opt, sched, x, y, i + 1, contextlib.nullcontext, 0.0, rsst)[0]
                  for i, (x, y) in enumerate(batches)]
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[backend] = (torch.stack(losses), grads, {n: p.detach().clone() for n, p in model.named_parameters()})
    (l_ref, g_ref, w_ref), (l_tri, g_tri, w_tri) = results["torch"], results["triton"]
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-4, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=name)
        torch.testing.assert_close(w_tri[name], w_ref[name], rtol=1e-4, atol=1e-5, msg=name)
