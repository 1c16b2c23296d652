"""Ahead-of-time compilation of every Triton kernel for a GPU that is not here.

    python -m vitprune.kernels.aot [--archs=80,90] [--full] [--jobs=N]

prints one JSON line per compiled variant (kernel, launch, precision, flags, autotune config,
target, shared memory against the target's limit, error) and exits 1 if any variant fails to
compile or needs more shared memory than its target has.

The launches are not written out by hand: the kernels' own launchers (`masked_linear` forward
and backward, `group_reg`) run on small CPU tensors with a recorder in place of each kernel,
so what gets compiled is exactly what a CUDA run launches (arguments, strides, constexpr
flags). Triton's launch-time binder turns each recorded launch into the signature, constexprs
and specialisation attributes, and `triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))` runs the whole pipeline down to a cubin with every autotune config (ptxas ships
with the triton wheel). No GPU is needed, but the kernels must be compiled ones: import this
with TRITON_INTERPRET unset.

Only the configs the autotuner would try on the target are compiled: masked_linear prunes
those whose pipelined tiles cannot fit the GPU's shared memory (its own estimate, which the
compiled kernels then check). The default set is a representative subset: per kernel and
target, every autotune config in the target's critical precision (CRITICAL_PRECISION) on the
launch that needs the most shared memory, and every config, precision, flag value, launch and
shape kind at least once; --full compiles the whole matrix.
"""
import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import group_reg as gr
from .interpret import interpret_mode
from . import masked_linear as ml
from .reference import PrunableParams

# Shared memory one block may use (opt-in maximum), bytes, from the compute-capability table of
# the CUDA C++ Programming Guide: 163 KB on sm_80 (A100), 227 KB on sm_90 (H100/H200).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Activations of (tokens, out, in): ragged (nothing a multiple of 16, as with pruned layers)
# and aligned (what Triton specialises on: multiples of 16).
LINEAR_SHAPES = {"ragged": (195, 70, 50), "aligned": (256, 64, 96)}
# Per target, the precision every autotune config is compiled in by the default subset: sm_80
# has the least shared memory and 4-byte tiles need the most; on sm_90 (a CUDA run's bf16
# autocast) 16-bit dots have the largest minimum block sizes (K >= 16).
CRITICAL_PRECISION = {80: "tf32", 90: "bf16"}
# group_reg's tile sizes follow the model's width and head size.
REG_MODELS = {"default": ("vit_small",), "full": ("vit_micro", "vit_tiny", "vit_small", "vit_base")}


@dataclass
class Launch:
    """One kernel launch as the package makes it, and the configs the autotuner tries on it."""
    kernel: str
    call: str           # forward / dx / dW of masked_linear, or group_reg
    precision: str      # fp32, tf32 (fp32 with TF32 dots) or bf16
    shapes: str
    fn: object          # the JITFunction
    args: tuple
    kwargs: dict
    configs: list       # triton.Config list, or [None] for a kernel without autotuning

    def flags(self) -> dict:
        return {k: v if isinstance(v, (bool, str)) else str(v) for k, v in self.kwargs.items()
                if k.isupper() and not k.startswith("BLOCK")}


@dataclass
class Variant:
    launch: Launch
    config_index: int
    arch: int

    @property
    def config(self) -> Optional[triton.Config]:
        return self.launch.configs[self.config_index]

    def describe(self) -> dict:
        c, l = self.config, self.launch
        meta = {} if c is None else {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        return {"kernel": l.kernel, "call": l.call, "precision": l.precision, "shapes": l.shapes,
                "flags": l.flags(), "config": meta, "config_index": self.config_index, "arch": self.arch,
                "name": f"{l.kernel}/{l.call} {l.precision} {l.shapes} "
                        f"{','.join(f'{k}={v}' for k, v in l.flags().items())} "
                        f"cfg{self.config_index} sm_{self.arch}"}

    def features(self) -> set:
        """What the default subset must cover, per kernel and target: every precision, launch,
        shape kind and flag value, every autotune config, and every config again in the
        target's critical precision (where it fits)."""
        l = self.launch
        found = {("precision", l.precision), ("call", l.call), ("shapes", l.shapes), ("config", self.config_index)}
        found |= {("flag", k, v) for k, v in l.flags().items()}
        if l.precision == CRITICAL_PRECISION[self.arch]:
            found.add(("config in critical precision", self.config_index))
        return found

    def shared_memory_weight(self) -> int:
        """How many flags make this launch stage more tiles in shared memory: the element mask
        is one more pipelined tile, gathered (indexed) rows and columns are not pipelined."""
        f = self.launch.flags()
        return (f.get("HAS_MASK") is True) + (f.get("HAS_IDX_N") is False) + (f.get("HAS_IDX_K") is False)


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, configs, launches: list):
        self.fn, self.configs, self.launches = fn, configs, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, self.configs, args, kwargs))


@contextlib.contextmanager
def _recording():
    """Every launch of masked_linear and group_reg is recorded instead of run."""
    if interpret_mode():
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1 (interpreted, not "
                           "compilable): run with TRITON_INTERPRET unset")
    launches = []
    saved = ml._GATHER_MATMUL, ml._WEIGHT_GRAD, ml._INTERPRET, gr._group_reg_kernel, gr._INTERPRET
    fwd, wgrad = ml._GATHER_MATMUL[0], ml._WEIGHT_GRAD[0]  # the autotuners
    ml._GATHER_MATMUL = (_Recorder(fwd.fn, fwd.configs, launches), {})
    ml._WEIGHT_GRAD = (_Recorder(wgrad.fn, wgrad.configs, launches), {})
    gr._group_reg_kernel = _Recorder(gr._group_reg_kernel, [None], launches)
    # The launchers refuse CPU tensors outside the interpreter; nothing runs here.
    ml._INTERPRET = gr._INTERPRET = True
    try:
        yield launches
    finally:
        ml._GATHER_MATMUL, ml._WEIGHT_GRAD, ml._INTERPRET, gr._group_reg_kernel, gr._INTERPRET = saved


@contextlib.contextmanager
def _fp32_dots(precision: str):
    """fp32 dots as training on CUDA sets them (allow_tf32, read by masked_linear)."""
    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32 = False


def _linear_launches(precision: str, shapes: str) -> list:
    """masked_linear forward, dx and dW for every combination of live_out, live_in, mask, bias."""
    tokens, n_out, n_in = LINEAR_SHAPES[shapes]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = []
    for has_out, has_in, has_mask, has_bias in itertools.product((False, True), repeat=4):
        live_out = torch.arange(0, n_out, 2) if has_out else None
        live_in = torch.arange(0, n_in, 2) if has_in else None
        x = torch.zeros(tokens, n_in if live_in is None else len(live_in), dtype=dtype, requires_grad=True)
        w = torch.zeros(n_out, n_in, dtype=dtype, requires_grad=True)
        b = torch.zeros(n_out, dtype=dtype, requires_grad=True) if has_bias else None
        mask = torch.ones(n_out, n_in, dtype=torch.bool) if has_mask else None
        with _recording() as launches, _fp32_dots(precision):
            y = ml.masked_linear(x, w, b, live_out=live_out, live_in=live_in, mask=mask)
            y.backward(torch.zeros_like(y))
        for call, (fn, configs, args, kwargs) in zip(("forward", "dx", "dW"), launches):
            out.append(Launch(fn.__name__.strip("_").removesuffix("_kernel"), call, precision, shapes,
                              fn, args, kwargs, configs))
    return out


def _group_reg_launches(precision: str, model: str) -> list:
    """group_reg (l2 and group_lasso) over two blocks of `model`'s shapes."""
    from vitprune.model import build_model
    from vitprune.structure import dims
    with torch.device("meta"):  # the shapes only
        _, heads, _, dim, hidden = dims(build_model(model, 10))
    dtype, L = getattr(torch, "bfloat16" if precision == "bf16" else "float32"), 2
    shapes = [(3 * dim, dim), (3 * dim,), (dim, dim), (hidden, dim), (hidden,), (dim, hidden)]
    params = PrunableParams(*[[torch.zeros(s, dtype=dtype) for _ in range(L)] for s in shapes])
    out = []
    for kind in ("l2", "group_lasso"):
        with _recording() as launches:
            gr.group_reg(params, params, torch.ones(L, heads), torch.ones(L, hidden), 0.1, kind)
        (fn, configs, args, kwargs), = launches
        out.append(Launch("group_reg", kind, precision, model, fn, args, kwargs, configs))
    return out


def launches(full: bool) -> list:
    """Every launch the package makes, over precisions and shapes (fewer shapes unless full)."""
    shapes = list(LINEAR_SHAPES) if full else ["ragged"]
    found = [l for p in ("fp32", "tf32", "bf16") for s in shapes for l in _linear_launches(p, s)]
    found += [l for p in ("fp32", "bf16") for m in REG_MODELS["full" if full else "default"]
              for l in _group_reg_launches(p, m)]
    return found


def variants(archs, full: bool) -> list:
    """(launch × autotune config × target), deduplicated by what Triton would compile; unless
    `full`, a subset covering every feature of `Variant.features` per kernel and target."""
    chosen, recorded = [], launches(full)
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        seen = set()
        per_kernel = {}
        for launch in recorded:
            for i in _tried_on(launch, arch):
                v = Variant(launch, i, arch)
                key = json.dumps([launch.fn.__name__, repr(_compile_args(v, backend)[1:]), i], default=str)
                if key not in seen:
                    seen.add(key)
                    per_kernel.setdefault(launch.kernel, []).append(v)
        for group in per_kernel.values():
            chosen += group if full else _cover(group)
    return chosen


def _tried_on(launch: Launch, arch: int) -> list:
    """Indices of the configs the autotuner tries on `arch`: those whose pipelined tiles fit its
    shared memory by masked_linear's own estimate (compiling them checks that estimate)."""
    tiles = ml.PIPELINED_TILES.get(launch.fn.__name__)
    if tiles is None:
        return list(range(len(launch.configs)))
    named = dict(zip(launch.fn.arg_names, launch.args))
    fit = ml.fitting_configs(launch.configs, named, launch.kwargs, tiles, SHARED_LIMIT[arch])
    return [i for i, c in enumerate(launch.configs) if any(c is f for f in fit)]


def _cover(group: list) -> list:
    """Greedy set cover: few variants that together have every feature any of them has; of
    equally useful ones, the one that needs the most shared memory."""
    missing = set().union(*(v.features() for v in group))
    picked = []
    while missing:
        best = max(group, key=lambda v: (len(v.features() & missing), v.shared_memory_weight()))
        picked.append(best)
        missing -= best.features()
    return picked


_BINDERS = {}  # (kernel, target) -> Triton's argument binder (built by exec: keep it)


def _compile_args(v: Variant, backend):
    """(options, signature, constexprs, attrs) exactly as Triton's launcher derives them."""
    fn, l = v.launch.fn, v.launch
    kwargs = dict(l.kwargs, debug=fn.debug or triton.knobs.runtime.debug,
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    if v.config is not None:
        kwargs.update(v.config.all_kwargs())
    key = (fn, backend.target)
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = _BINDERS[key](*l.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def compile_variant(v: Variant) -> dict:
    """Compile one variant for its target; its description with ok/error/shared memory."""
    target = GPUTarget("cuda", v.arch, 32)
    result = {**v.describe(), "limit": SHARED_LIMIT[v.arch], "shared": None, "error": None}
    t0 = time.perf_counter()
    try:
        options, signature, constexprs, attrs = _compile_args(v, make_backend(target))
        kernel = triton.compile(ASTSource(v.launch.fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        result["shared"] = kernel.metadata.shared
        if result["shared"] > result["limit"]:
            result["error"] = f"needs {result['shared']} bytes of shared memory, sm_{v.arch} has {result['limit']}"
    except Exception as e:  # a compile error of any kind is the finding
        lines = [s for s in str(e).splitlines() if s.strip()] or [""]
        result["error"] = f"{type(e).__name__}: {lines[-1].strip()[:300]}"
    result["ok"] = result["error"] is None
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


_VARIANTS = []  # what the forked workers compile, by index


def _compile_index(i: int) -> dict:
    return compile_variant(_VARIANTS[i])


def compile_all(archs, full: bool, jobs: int):
    """Yield the result of every variant, compiled by `jobs` processes (forked)."""
    _VARIANTS[:] = variants(archs, full)
    if jobs <= 1:
        yield from map(compile_variant, _VARIANTS)
        return
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_compile_index, range(len(_VARIANTS)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitprune.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,90", help="CUDA compute capabilities, e.g. 80,90")
    parser.add_argument("--full", action="store_true", help="the whole matrix, not the representative subset")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiling processes")
    parser.add_argument("--cache_dir", help="Triton cache to compile into (default: a fresh temporary one)")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        parser.error(f"--archs: unknown {unknown}; choose from {sorted(SHARED_LIMIT)}")
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh cache by default, so every variant is really compiled.
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir or tmp
        t0, failed, n = time.perf_counter(), 0, 0
        for result in compile_all(archs, args.full, args.jobs):
            print(json.dumps(result), flush=True)
            n, failed = n + 1, failed + (not result["ok"])
    print(f"{n - failed}/{n} variants compiled for sm_{', sm_'.join(map(str, archs))} "
          f"in {time.perf_counter() - t0:.0f} s" + (f"; {failed} FAILED" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
