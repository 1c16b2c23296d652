"""`bench train`: dense, pruned and the compacted twin side by side, at any input size; `bench
images`; and scripts/gpu_check.sh's CPU dry run, end to end."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitprune.bench.export import bench_export, pruned_checkpoint, variants
from vitprune.bench.images import bench_images
from vitprune.bench.timing import DATASHEET_BF16, datasheet_card
from vitprune.bench.train import _bench_models, bench_train
from vitprune.deploy import n_params

ROOT = Path(__file__).parents[1]


def test_bench_train_has_the_compacted_twin_row(capsys):
    result = bench_train(model="vit_micro", batch=4, iters=1, device="cpu", img_size=48, patch_size=8)
    out = capsys.readouterr().out
    assert "vit_micro (48 px, patch 8), batch 4, fp32, sgd, ratio 0.7, kernels=torch" in out
    for kind in ("train step", "eval forward"):
        for row in ("dense (State 0)", "pruned 0.7", "compacted twin (export, nn.Linear)"):
            assert f"| {kind}, {row} |" in out
    assert "The pruned step takes" in out and "× the time of its compacted twin" in out
    t = result["step_s"]
    assert set(t) == {"dense", "pruned", "twin", "dense_eval", "pruned_eval", "twin_eval"}
    assert result["pruned_vs_twin"] == pytest.approx(t["pruned"] / t["twin"])
    # --aug=finetune's data path against timm's DataLoader pipeline, both measured
    assert "| DataLoader + timm create_transform(is_training=True) + Mixup (0 workers) |" in out
    rates = result["finetune_img_s"]
    assert rates["tensor"] > 0 and rates["timm"] > 0
    assert f"| tensor loader on cpu | {rates['tensor']:.0f} | {rates['tensor'] / rates['timm']:.1f}× |" in out
    # MFU: the FLOPs of a training step are those FlopCounterMode counts in one (see below), per
    # second of the step's time, over the matmul peak measured in the same process
    nets, _ = _bench_models("vit_micro", 0.7, torch.device("cpu"), False, 48, 8)
    for name in ("dense", "pruned"):
        counted, patch_input_grad = counter_flops(nets[name], 4, 48)
        assert result["flops"][name] == counted["step"] + patch_input_grad
        assert result["flops"][f"{name}_eval"] == counted["forward"]
    assert result["flops"]["twin"] == result["flops"]["pruned"]
    assert 1e9 < result["peak_flops_s"] < 1e13 and result["datasheet"] is None
    for key, label in (("dense", "train step, dense (State 0)"), ("pruned_eval", "eval forward, pruned 0.7")):
        mfu = result["flops"][key] / t[key] / result["peak_flops_s"]
        assert 0 < mfu < 1
        assert f"| {label} | {result['flops'][key] / 1e9:.2f} | " in out and f" | {mfu:.1%} | n/a |" in out
    assert "matmul measured in this process with the same threads" in out


def counter_flops(model, batch: int, size: int):
    """({"forward", "step"}: FLOPs torch.utils.flop_counter counts in a forward and in a
    forward + backward of `model`, the patch embedding's input-gradient FLOPs that a step
    never computes but the 3× rule counts). The math attention, so that the counter sees its
    matmuls (it has no formula for the CPU's fused attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    counted = {}
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            model(x)
        with FlopCounterMode(display=False) as step:
            torch.nn.functional.cross_entropy(model(x), y).backward()
    counted = {"forward": forward.get_total_flops(), "step": step.get_total_flops()}
    p = model.patch_embed
    return counted, 2 * p.num_patches * p.proj.weight[0].numel() * model.embed_dim * batch


def test_the_structures_flop_count_is_flop_counter_modes():
    """structure.count's forward FLOPs are exactly the matmul and attention FLOPs FlopCounterMode
    counts (neither counts norms, softmax, GELU, bias and residual adds), dense and pruned; the
    step's 3× rule counts one thing more: the patch embedding's input gradient (1.2% of this
    half-pruned vit_micro's step, 0.03% of a dense vit_small's at 32 px)."""
    import vitprune
    from vitprune.model import build_model
    from vitprune.structure import Structure, count, step_flops
    torch.manual_seed(0)
    model = build_model("vit_micro", 10)
    for keep in (None, vitprune.select(model, ratio=0.5, round_to=8)):
        if keep is not None:
            vitprune.apply(model, keep)
        alive = Structure.live(model)
        counted, patch_input_grad = counter_flops(model, 4, 32)
        assert counted["forward"] == 4 * count(model, alive)["flops_alive"]
        assert 4 * step_flops(model, alive) == counted["step"] + patch_input_grad
        assert patch_input_grad < 0.015 * counted["step"]


@pytest.mark.parametrize("name, sms, gib, card", [
    ("NVIDIA H100 80GB HBM3", 132, 79.2, "H100 SXM"), ("NVIDIA H100 PCIe", 114, 79.2, "H100 PCIe"),
    ("NVIDIA H100", 114, 79.2, "H100 PCIe"), ("NVIDIA H100 NVL", 132, 93.6, "H100 NVL"),
    ("NVIDIA H200", 132, 139.8, "H200 SXM"), ("NVIDIA H200 NVL", 132, 139.8, "H200 NVL"),
    ("NVIDIA GH200 480GB", 132, 94.5, "GH200"), ("NVIDIA A100-SXM4-80GB", 108, 79.2, "A100"),
    ("NVIDIA L4", 58, 22.0, "L4"), ("NVIDIA L40S", 142, 44.4, "L40S"), ("NVIDIA GeForce RTX 4090", 128, 23.6, None),
    ("NVIDIA A10", 72, 22.0, None)])
def test_the_datasheet_peak_tells_the_cards_apart(name, sms, gib, card):
    assert datasheet_card(name, sms, gib) == card
    if card:
        assert 1e14 < DATASHEET_BF16[card] < 1e15
    assert DATASHEET_BF16["H100 SXM"] > DATASHEET_BF16["H100 NVL"] > DATASHEET_BF16["H100 PCIe"]


def test_bench_images_times_the_check_beside_a_full_decode(capsys):
    result = bench_images(n=12, width=40, height=30, iters=1, warmup=0)
    out = capsys.readouterr().out
    assert result["images"] == 12 and "12 generated images of 40×30 (half JPEG at quality 90, half PNG)" in out
    check, decode = result["seconds"]["check"], result["seconds"]["decode"]
    assert check > 0 and decode > 0
    assert f"| check (header, pixel limit, structure, JPEG end marker) | {check:.2f} | {check / 12 * 1e6:.0f} |" in out


def test_twin_is_the_pruned_network_with_parameters_of_its_own():
    nets, backend = _bench_models("vit_micro", 0.7, torch.device("cpu"), False, 48, 8)
    dense, pruned, twin = nets["dense"], nets["pruned"], nets["twin"]
    assert backend == "torch" and twin.training
    assert twin.patch_embed.img_size == (48, 48) and twin.patch_embed.patch_size == (8, 8)
    assert n_params(twin) < 0.5 * n_params(dense)
    assert all(p.requires_grad for p in twin.parameters())
    x = torch.randn(3, 3, 48, 48)
    pruned.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), pruned(x), rtol=1e-4, atol=1e-5)
    # A step of the twin leaves the pruned network alone (no shared storage).
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    twin.train()
    torch.optim.SGD(twin.parameters(), lr=0.1).zero_grad()
    twin(x).sum().backward()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in before.items())
    shared = {p.data_ptr() for p in pruned.parameters()} & {p.data_ptr() for p in twin.parameters()}
    assert not shared


def nearest_multiple(width: int, n: int, most: int) -> int:
    """The multiple of n in [n, most] nearest `width`, a tie going up."""
    return min(range(n, most + 1, n), key=lambda m: (abs(m - width), -m))


@pytest.mark.slow
def test_bench_export_times_rounded_widths_of_one_network_per_flop(capsys, monkeypatch):
    """Without a checkpoint: vit_micro pruned at 0.7 by select, and its widths rounded to 8, 32
    and 64, each in eager torch, torch.compile (its inductor build is most of a minute per model
    on 2 cores: stood in for here) and ONNX Runtime, with latency and time per FLOP."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from vitprune.deploy import compact_model, masked_model
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(kw) or m)
    result = bench_export(model="vit_micro", ratio=0.7, batches=(1, 3), iters=1, warmup=0, device="cpu")
    out = capsys.readouterr().out
    v = result["variants"]
    assert list(v) == ["dense", "pruned", "pruned, round_to 8", "pruned, round_to 32", "pruned, round_to 64"]
    assert result["engines"] == ["eager", "compile", "onnxruntime"] and compiled == [{"dynamic": False}] * 5
    assert v["dense"]["mlp_widths"] == [128] * 4 and sum(v["pruned"]["mlp_widths"]) == round(0.3 * 512)
    for n in (8, 32, 64):
        widths = v[f"pruned, round_to {n}"]["mlp_widths"]
        assert widths == [nearest_multiple(w, n, 128) for w in v["pruned"]["mlp_widths"]]
    # FLOPs per image: what FlopCounterMode counts in a forward of each compacted model
    net, structure = masked_model(pruned_checkpoint("vit_micro", 0.7))
    for name, kept in variants(net, structure, [8, 32, 64]).items():
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            compact_model(net, kept)(torch.randn(1, 3, 32, 32))
        assert v[name]["flops_per_image"] == counter.get_total_flops(), name
    for engine, name in (("eager", "pruned, round_to 8"), ("onnxruntime", "pruned, round_to 64"),
                         ("compile", "dense")):
        t = v[name]["latency_s"][engine][3]
        per_flop = t / (3 * v[name]["flops_per_image"]) * 1e12
        assert f"{t * 1e3:.2f} | {per_flop:.2f}" in out
    assert "| batch 3 | eager torch (ms) | ps / FLOP | torch.compile (ms) | ps / FLOP | ONNX Runtime (ms) |" in out
    assert "| pruned, round_to 32 | 32 × 4 | 75.0% |" in out


def test_rounding_up_takes_back_zero_neurons_and_down_drops_the_weakest():
    """A block rounded up keeps every neuron it had and computes the same network; one rounded
    down keeps its strongest neurons (by magnitude); heads are never touched."""
    from vitprune.deploy import compact_model, masked_model
    net, structure = masked_model(pruned_checkpoint("vit_micro", 0.7))
    found = variants(net, structure, [32, 64])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        up, same = compact_model(net, found["pruned, round_to 64"])(x), compact_model(net, structure)(x)
    torch.testing.assert_close(up, same, rtol=0, atol=1e-6)  # 64 > every pruned width: all rounded up
    down = found["pruned, round_to 32"]  # widths 36, 34, 43, 41 -> 32
    assert (down.neurons.sum(1) == 32).all() and not (down.neurons & ~structure.neurons).any()
    for l, block in enumerate(net.blocks):
        strength = block.mlp.fc1.weight.abs().sum(1) + block.mlp.fc1.bias.abs() + block.mlp.fc2.weight.abs().sum(0)
        kept, dropped = strength[down.neurons[l]], strength[structure.neurons[l] & ~down.neurons[l]]
        assert kept.min() >= dropped.max()
    assert all(s.heads.equal(structure.heads) for s in found.values() if s is not found["dense"])


def git(*args, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The GPU check's plumbing on the CPU, in a fresh clone of this repository's committed
    HEAD: every step runs, the report holds every table, and the clone is left as it was."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs git and a git checkout to clone")
    clone, out = tmp_path / "clone", tmp_path / "check"
    git("clone", "--quiet", str(ROOT), str(clone), cwd=tmp_path)
    before = git("status", "--porcelain", "--ignored", cwd=clone)
    r = subprocess.run(["bash", str(clone / "scripts" / "gpu_check.sh"), "--cpu", str(out)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    assert git("status", "--porcelain", "--ignored", cwd=clone) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", "info.txt", "tests.log", "bench_kernels.log", "runs.log", "runs_compared.log",
         "bench_train.log", "bench_export.log"])  # at most 8 files: what a lent GPU machine returns
    report = (out / "report.md").read_text()
    steps = ("device and versions", "GPU tests (pytest -m gpu)", "bench kernels", "run --kernels=auto",
             "run --kernels=torch", "runs compared", "bench train", "export", "bench export")
    for step in steps:
        assert f"| {step} | " in report and f"| {step} | " in report.split("## GPU tests")[0]
    assert report.count("| ok |") == len(steps) and "skipped on --cpu" in report
    assert "gpu tests in" in report and "0 failed" in report
    assert "| batch | alive | heads | layer |" in report
    # the legs ran --aug=finetune, --distill=state0 and --round_to=8, and agree
    assert "(ran: torch): test acc" in report and "agree" in report and ": multiples of 8" in report
    assert report.count("leg: --aug=finetune --distill=state0 --round_to=8") == 2
    assert "| train step, compacted twin (export, nn.Linear) |" in report and "| MFU (measured peak) |" in report
    assert "largest difference of the loaded export from the masked network" in report
    assert "| parameters (M) |" in report and "| pruned, round_to 64 |" in report
    assert "Total:" in report and r.stdout.count(" ok") == len(steps)


@pytest.mark.slow
def test_gpu_check_stays_within_its_time_budget(tmp_path):
    """A step gets only what is left of the budget (killed with its child processes when it
    runs out); the steps after it are skipped, and the check fails."""
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET": "25"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", str(out)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 1
    total = int(r.stdout.split("total ")[1].split(" s")[0])
    assert total <= 30
    report = (out / "report.md").read_text()
    assert "| bench export | 0 | FAILED (skipped) |" in report
    logs = [p.read_text() for p in out.glob("*.log")]  # which step runs out depends on the machine's speed
    assert any("stopped after" in log or "skipped: out of time" in log for log in logs)
