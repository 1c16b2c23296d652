"""The model's prunable linears and RSST's penalty through the Triton backend give the same
training steps as the PyTorch reference: on CPU in Triton's interpreter (CPU twin), on CUDA
with the compiled kernels (`gpu`)."""
import ast
import contextlib
from pathlib import Path

import pytest
import torch

from conftest import compiled_cuda, interpreted
from vitprune import kernels
from vitprune.config import Config
from vitprune.methods import RsstRegularizer
from vitprune.model import build_model, set_kernels
from vitprune.structure import Structure, apply_structure
from vitprune.step import make_optimizer, train_step

pytestmark = pytest.mark.skipif(not kernels.triton_importable(), reason="triton is not installed")
DEVICES = [pytest.param("cpu", marks=interpreted, id="cpu-interpreted"),
           pytest.param("cuda", marks=[pytest.mark.gpu, compiled_cuda], id="cuda")]


def pruned_micro(backend, device):
    torch.manual_seed(0)
    model = build_model("vit_micro", 10).to(device)
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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["refill", "rsst"])
def test_triton_backend_trains_like_reference(method, device):
    cfg = Config(method=method, optimizer="sgd", lr=0.05, epochs=1, reg_granularity_prune=5.0)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (2,), generator=g).to(device))
               for _ in range(2)]
    results = {}
    for backend in ("torch", "triton"):
        model, group_reg = pruned_micro(backend, device)
        opt, sched = make_optimizer(cfg, model, 2, torch.device(device))
        rsst = None
        if method == "rsst":
            keep = Structure.live(model)
            keep.heads[:, 0] = keep.neurons[:, 0] = False  # regularise one alive head per layer and the first neuron
            rsst = RsstRegularizer(model, keep, 2, reg_formula="seed", reg_schedule=cfg.reg_schedule,
                                   exponents=cfg.exponents, reg_kind=cfg.reg_kind, reg_residual=1.0,
                                   reg_granularity_prune=cfg.reg_granularity_prune, optimizer="sgd", lr=cfg.lr,
                                   group_reg=group_reg)
        losses = [train_step(model, opt, sched, x, y, i + 1, contextlib.nullcontext, 0.0, rsst)[0]
                  for i, (x, y) in enumerate(batches)]
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[backend] = (torch.stack(losses), grads, {n: p.detach().clone() for n, p in model.named_parameters()})
    (l_ref, g_ref, w_ref), (l_tri, g_tri, w_tri) = results["torch"], results["triton"]
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-4, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=name)
        torch.testing.assert_close(w_tri[name], w_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def _sets_triton_interpret(node) -> bool:
    """Whether an AST node writes TRITON_INTERPRET: setenv/setdefault/putenv/environ[...] = ."""
    if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value == "TRITON_INTERPRET"
                                          for a in node.args[:1]):
        return getattr(node.func, "attr", getattr(node.func, "id", "")) in ("setenv", "setdefault", "putenv",
                                                                            "__setitem__", "update")
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                   and t.slice.value == "TRITON_INTERPRET" for t in targets)
    return False


def test_no_code_sets_triton_interpret_at_run_time():
    """triton.jit reads TRITON_INTERPRET when a kernel is defined, so setting it once the
    kernels are imported does nothing on a CUDA host (compiled kernels, CPU tensors). The only
    writes allowed are at module level, under `if not torch.cuda.is_available():`, before any
    kernel is imported (conftest.py; test_kernels.py run on its own)."""
    root = Path(__file__).parents[1]
    writes = []
    for path in [*root.glob("tests/*.py"), *root.glob("vitprune/*.py"), *root.glob("kernels/*.py"),
                 *root.glob("scripts/*.py")]:
        tree = ast.parse(path.read_text())
        guarded = {id(n) for top in tree.body if isinstance(top, ast.If)
                   and ast.unparse(top.test) == "not torch.cuda.is_available()" for n in ast.walk(top)}
        writes += [f"{path.relative_to(root)}:{n.lineno}" for n in ast.walk(tree)
                   if _sets_triton_interpret(n) and id(n) not in guarded]
    assert writes == [], f"TRITON_INTERPRET written at run time or without the CUDA guard: {writes}"
