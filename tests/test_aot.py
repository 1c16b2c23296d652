"""Every Triton kernel compiled ahead of time for sm_80 and sm_90 by Triton's own compiler, no
GPU needed (kernels/aot.py): each variant must compile and fit the target's shared memory.

The compile runs in a subprocess with TRITON_INTERPRET=0: this process may hold interpreted
kernels (conftest.py), and those cannot be compiled. By default a representative subset (see
aot.py); VITPRUNE_AOT_FULL=1 compiles the full matrix (every precision × launch × flag
combination × autotune config × shape kind, ~2200 variants: long, give it many cores).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).parents[1]
FULL = os.environ.get("VITPRUNE_AOT_FULL", "0") not in ("", "0")
ARCHS = (80, 90)
KERNELS = ("gather_matmul", "weight_grad", "group_reg")
CONFIGS = {"gather_matmul": 5, "weight_grad": 4, "group_reg": 1}  # autotune configs per kernel


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The JSON result of every compiled variant (and the process, for its exit code)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vitprune.kernels.aot", f"--archs={','.join(map(str, ARCHS))}",
           f"--jobs={os.cpu_count()}", f"--cache_dir={tmp_path_factory.mktemp('triton_cache')}"]
    proc = subprocess.run(cmd + (["--full"] if FULL else []), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=None if FULL else 600)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results, f"no variant was compiled:\n{proc.stderr[-3000:]}"
    return proc, results


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_every_variant_compiles_and_fits(compiled, arch, kernel):
    _, results = compiled
    mine = [r for r in results if r["arch"] == arch and r["kernel"] == kernel]
    assert mine, f"no {kernel} variant was compiled for sm_{arch}"
    failed = [f"{r['name']}: {r['error']}" for r in mine if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(mine)} variants failed:\n" + "\n".join(failed[:20])
    for r in mine:
        assert 0 <= r["shared"] <= r["limit"], r["name"]


def test_exit_code_says_whether_all_compiled(compiled):
    proc, results = compiled
    assert proc.returncode == (0 if all(r["ok"] for r in results) else 1), proc.stderr[-2000:]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_subset_covers_configs_precisions_and_flags(compiled, arch):
    """Per kernel: every autotune config, both float precisions with fp32 both ways (IEEE and
    TF32 dots, as fp32 runs on CUDA), every launch (forward, dx, dW) and every flag on and off."""
    _, results = compiled
    for kernel in KERNELS:
        mine = [r for r in results if r["arch"] == arch and r["kernel"] == kernel]
        assert {r["config_index"] for r in mine} == set(range(CONFIGS[kernel])), kernel
        precisions = {r["precision"] for r in mine}
        assert precisions >= ({"fp32", "bf16"} if kernel == "group_reg" else {"fp32", "tf32", "bf16"}), kernel
        for flag in mine[0]["flags"]:
            values = {r["flags"][flag] for r in mine}
            assert flag.endswith("DTYPE") or flag == "DOT_PRECISION" or values == {True, False}, (kernel, flag)
    calls = {r["call"] for r in results if r["arch"] == arch}
    assert calls == {"forward", "dx", "dW", "l2", "group_lasso"}


def test_configs_that_cannot_fit_are_never_tried():
    """masked_linear's prune: 128×128×64 × 3 stages of fp32 tiles (and the mask) is more shared
    memory than sm_80 has, not than sm_90 has; in bf16 it fits both. Nothing fits 1 KB: the
    smallest config is kept, so the autotuner always has one."""
    import torch
    from vitprune.kernels import masked_linear as ml
    tiles = ml.PIPELINED_TILES["_gather_matmul_kernel"]
    configs, big = ml._FWD_CONFIGS, ml._FWD_CONFIGS[4]
    args = lambda dt: dict(a_ptr=torch.zeros(1, dtype=dt), w_ptr=torch.zeros(1, dtype=dt),
                           mask_ptr=torch.zeros(1, dtype=torch.bool))
    fits = lambda dt, mask, limit: ml.fitting_configs(configs, args(dt), dict(HAS_MASK=mask), tiles, limit)
    assert big not in fits(torch.float32, True, 163 * 1024) and big in fits(torch.float32, True, 227 * 1024)
    assert big in fits(torch.bfloat16, True, 163 * 1024) and len(fits(torch.bfloat16, True, 163 * 1024)) == 5
    assert fits(torch.float32, False, 1024) == [configs[3]]  # 64×64×32: the smallest
