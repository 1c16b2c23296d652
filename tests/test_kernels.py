"""Triton kernels against kernels/reference.py, and the kernel benchmark.

Without a GPU the kernels run in Triton's CPU interpreter (the `*_interpreted` tests, CPU
tensors); with one they are compiled and the `gpu` tests (`pytest -m gpu`) compare them on
CUDA, fp32 and bf16. The interpreter must be chosen before triton is first imported: see
conftest.py, which does it for the whole session; the same line here covers running this file
on its own.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from conftest import INTERPRET, compiled_cuda, interpreted  # noqa: E402
from vitprune.bench.kernels import bench_kernels, group_reg_loop  # noqa: E402
from vitprune.kernels import PrunableParams, reference  # noqa: E402
from vitprune.kernels.group_reg import _table, group_reg  # noqa: E402
from vitprune.kernels.masked_linear import masked_linear  # noqa: E402

FP32_TOL = dict(rtol=1e-4, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=5e-2)

# ---------------------------------------------------------------- masked_linear
# W is 70 × 50 and x has 3 × 37 tokens: none a multiple of the block sizes, several tiles.
OUT, IN, LEAD = 70, 50, (3, 37)
LINEAR_CASES = ["dense", "live_out_bool", "live_out_index", "all_rows_dead", "no_row_dead",
                "live_in", "live_out_live_in", "mask", "mask_live_out_live_in",
                "all_inputs_dead", "strided_2d", "strided_batched", "no_bias"]


def _linear_case(name, device, dtype):
    """(x, weight, bias, kwargs) of a named case; x is compact when the case has live_in."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    rand = lambda *s: torch.randn(*s, generator=gen)
    w, b = rand(OUT, IN), rand(OUT)
    live_out = torch.rand(OUT, generator=gen) < 0.6
    live_in = torch.rand(IN, generator=gen) < 0.6
    kw = {
        "live_out_bool": dict(live_out=live_out),
        "live_out_index": dict(live_out=live_out.nonzero().flatten()),
        "all_rows_dead": dict(live_out=torch.zeros(OUT, dtype=torch.bool)),
        "no_row_dead": dict(live_out=torch.ones(OUT, dtype=torch.bool)),
        "live_in": dict(live_in=live_in),
        "live_out_live_in": dict(live_out=live_out.nonzero().flatten(), live_in=live_in),
        "mask": dict(mask=torch.rand(OUT, IN, generator=gen) < 0.5),
        "mask_live_out_live_in": dict(mask=torch.rand(OUT, IN, generator=gen), live_out=live_out,
                                      live_in=live_in.nonzero().flatten()),
        "all_inputs_dead": dict(live_in=torch.zeros(IN, dtype=torch.bool)),
        "strided_batched": dict(live_out=live_out),
    }.get(name, {})
    n_in = IN if "live_in" not in kw else reference.as_index(kw["live_in"], IN).numel()
    if name == "strided_2d":  # a transposed view: flattened without a copy, read by strides
        x = rand(n_in, LEAD[0] * LEAD[1]).t()
    elif name == "strided_batched":  # leading dims that cannot be flattened as a view
        x = rand(n_in, *LEAD).permute(1, 2, 0)
    else:
        x = rand(*LEAD, n_in)
    if name in ("mask", "no_bias"):
        b = None
    to = lambda t: None if t is None else t.to(device, dtype if t.is_floating_point() else None)
    return to(x), to(w), to(b), {k: to(v) for k, v in kw.items()}


def _run_linear(fn, x, w, b, kw):
    """[y, dx, dW(, db)] of one forward/backward, with a strided upstream gradient."""
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, **kw)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(*y.shape[:-1], 2 * y.shape[-1], generator=gen).to(y)[..., ::2]
    y.backward(dy)
    return [y] + [t.grad for t in leaves]


def _check_linear(name, device, dtype, tol):
    x, w, b, kw = _linear_case(name, device, dtype)
    got = _run_linear(masked_linear, x, w, b, kw)
    want = _run_linear(reference.masked_linear, x, w, b, kw)
    for what, g, r in zip(("y", "dx", "dW", "db"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, f"{name} {what}"
        torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{name} {what}: {m}")


@interpreted
@pytest.mark.parametrize("name", LINEAR_CASES)
def test_masked_linear_interpreted(name):
    _check_linear(name, "cpu", torch.float32, FP32_TOL)


@pytest.mark.gpu
@compiled_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", LINEAR_CASES)
def test_masked_linear_cuda(name, dtype):
    _check_linear(name, "cuda", dtype, FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.gpu
@compiled_cuda
def test_masked_linear_cuda_autocast():
    """Under bf16 autocast, fp32 weights: like F.linear, computed in bf16, fp32 gradients."""
    x, w, b, kw = _linear_case("live_out_live_in", "cuda", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _run_linear(masked_linear, x, w, b, kw)
        want = _run_linear(reference.masked_linear, x, w, b, kw)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **BF16_TOL)


@pytest.mark.parametrize("args, match", [
    (dict(x=torch.zeros(4, 7)), "expected \\[..., 8\\]"),
    (dict(live_in=torch.ones(8, dtype=torch.bool), x=torch.zeros(4, 5)), "len\\(live_in\\)"),
    (dict(live_out=torch.ones(5, dtype=torch.bool)), "bool live mask"),
    (dict(bias=torch.zeros(5)), "bias has shape"),
    (dict(mask=torch.ones(8, 6)), "mask has shape"),
    (dict(x=torch.zeros(4, 8, dtype=torch.float64)), "share one dtype"),
])
def test_masked_linear_rejects_bad_input(args, match):
    call = {"x": torch.zeros(4, 8), "weight": torch.zeros(6, 8), **args}
    with pytest.raises(ValueError, match=match):
        masked_linear(**call)


# ---------------------------------------------------------------- group_reg
# 3 blocks, 3 heads of 6 dims over D = 20, 40 neurons: no power of two, a ragged neuron block.
L, H, HD, D, M = 3, 3, 6, 20, 40


def _prunable(device, dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3 * H * HD, D), (3 * H * HD,), (D, H * HD), (M, D), (M,), (D, M)]
    p = PrunableParams(*[[torch.randn(*s, generator=gen) for _ in range(L)] for s in shapes])
    # Zero groups (group lasso must leave them alone): head 1 of block 0, neuron 5 of block 2.
    p.qkv_w[0].view(3, H, HD, D)[:, 1] = 0
    p.qkv_b[0].view(3, H, HD)[:, 1] = 0
    p.proj_w[0].view(D, H, HD)[:, 1] = 0
    p.fc1_w[2][5], p.fc1_b[2][5], p.fc2_w[2][:, 5] = 0, 0, 0
    head_t = torch.rand(L, H, generator=gen) < 0.5
    neuron_t = (torch.rand(L, M, generator=gen) < 0.5).float()
    head_t[0, 1], neuron_t[2, 5] = True, 1  # the zero groups are targets
    to = lambda t: t.to(device, dtype if t.is_floating_point() else None)
    return PrunableParams(*[[to(t) for t in kind] for kind in p]), to(head_t), neuron_t.to(device)


def _clone(p):
    return PrunableParams(*[[t.clone() for t in kind] for kind in p])


def _check_group_reg(fn, device, dtype, kind, alias, tol):
    params, head_t, neuron_t = _prunable(device, dtype)
    grads = params if alias else PrunableParams(*[[torch.randn_like(t) for t in k] for k in params])
    params2 = _clone(params)
    grads2 = params2 if alias else _clone(grads)
    got = fn(params, grads, head_t, neuron_t, 0.3, kind)
    want = reference.group_reg(params2, grads2, head_t, neuron_t, 0.3, kind)
    torch.testing.assert_close(got, want, **tol)
    assert want[0][0, 1] == 0 and want[1][2, 5] == 0
    for name, g, r in zip(PrunableParams._fields, grads, grads2):
        torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{name}: {m}")


@interpreted
@pytest.mark.parametrize("alias", [False, True], ids=["grads", "decoupled"])
@pytest.mark.parametrize("kind", ["l2", "group_lasso"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_reg_interpreted(dtype, kind, alias):
    _check_group_reg(group_reg, "cpu", dtype, kind, alias,
                     FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.gpu
@compiled_cuda
@pytest.mark.parametrize("alias", [False, True], ids=["grads", "decoupled"])
@pytest.mark.parametrize("kind", ["l2", "group_lasso"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_reg_cuda(dtype, kind, alias):
    _check_group_reg(group_reg, "cuda", dtype, kind, alias,
                     FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_group_lasso_proximal_step_lands_on_zero(impl):
    """w_g ← w_g·max(0, 1 − step/‖w_g‖): a target group whose norm is below the step ends
    exactly at zero (no sign flip), a larger one shrinks by exactly the step."""
    if impl == "triton" and not INTERPRET:
        pytest.skip("the compiled twin runs in test_group_reg_cuda")
    fn = reference.group_reg if impl == "reference" else group_reg
    params, _, _ = _prunable("cpu", torch.float32)
    heads_sq, neurons_sq = reference.group_sq_norms(params, H)
    small, big = int(neurons_sq[0].argmin()), int(neurons_sq[1].argmax())
    head_t = torch.zeros(L, H)
    neuron_t = torch.zeros(L, M)
    head_t[1, 2] = neuron_t[0, small] = neuron_t[1, big] = 1.0
    step = (neurons_sq[0, small].sqrt() + neurons_sq[1, big].sqrt()).item() / 2  # between the two
    assert step < float(heads_sq[1, 2].sqrt())
    before = _clone(params)
    fn(params, params, head_t, neuron_t, -step, "group_lasso")
    assert params.fc1_w[0][small].abs().sum() == 0 and params.fc1_b[0][small] == 0
    assert params.fc2_w[0][:, small].abs().sum() == 0
    after_h, after_n = reference.group_sq_norms(params, H)
    torch.testing.assert_close(after_h[1, 2].sqrt(), heads_sq[1, 2].sqrt() - step)
    torch.testing.assert_close(after_n[1, big].sqrt(), neurons_sq[1, big].sqrt() - step)
    # direction kept: the shrunk head is a positive multiple of what it was
    assert (params.qkv_w[1] * before.qkv_w[1] >= 0).all()
    untouched = torch.ones(L, M, dtype=torch.bool)
    untouched[0, small] = untouched[1, big] = False
    torch.testing.assert_close(after_n[untouched], neurons_sq[untouched])


def test_group_reg_pointer_table_is_cached():
    params, _, _ = _prunable("cpu", torch.float32)
    grads = _clone(params)
    assert _table(params, grads) is _table(params, grads)
    assert _table(params, _clone(params)) is not _table(params, grads)


def test_group_reg_rejects_bad_input():
    params, head_t, neuron_t = _prunable("cpu", torch.float32)
    with pytest.raises(ValueError, match="kind"):
        group_reg(params, params, head_t, neuron_t, 0.1, kind="l1")
    with pytest.raises(ValueError, match="do not match"):
        group_reg(params, params, head_t[:2], neuron_t, 0.1)
    with pytest.raises(ValueError, match="do not match"):
        group_reg(params, params, head_t, neuron_t[:, 1:], 0.1)
    bad = params._replace(fc2_w=[t.t() for t in params.fc2_w])
    with pytest.raises(ValueError, match="fc2_w: shape"):
        group_reg(bad, bad, head_t, neuron_t, 0.1)
    bad = params._replace(fc2_w=[t.t().contiguous().t() for t in params.fc2_w])
    with pytest.raises(ValueError, match="contiguous"):
        group_reg(params, bad, head_t, neuron_t, 0.1)


# ---------------------------------------------------------------- benchmark
@pytest.mark.parametrize("kind", ["l2", "group_lasso"])
def test_group_reg_loop_matches_reference(kind):
    params, head_t, neuron_t = _prunable("cpu", torch.float32)
    grads, grads2 = _clone(params), _clone(params)
    got = group_reg_loop(params, grads, head_t, neuron_t, 0.3, kind)
    want = reference.group_reg(params, grads2, head_t, neuron_t, 0.3, kind)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads, grads2)


def test_bench_kernels_small(capsys):
    rows = bench_kernels(batches=(1,), alive=(1.0, 0.5), device="cpu", iters=1, small=True)
    out = capsys.readouterr().out
    assert "| batch | alive | heads | layer | dense |" in out and "| alive | loop |" in out
    assert "Triton kernels need CUDA" in out
    linear = [r for r in rows if r["kernel"] == "masked_linear"]
    assert len(linear) == 2 * 5  # 2 alive fractions × (4 linears + the block total)
    for r in linear:
        for path in ("dense", "W⊙M", "reference"):
            assert 0 < r[path] < 60 and 0 < r["dense"] / r[path] < 1e3
        assert r["triton"] is None
    reg = [r for r in rows if r["kernel"] == "group_reg"]
    assert len(reg) == 2 and all(r["loop"] > 0 and r["reference"] > 0 for r in reg)
