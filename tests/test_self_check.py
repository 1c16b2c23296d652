"""The Triton kernels' self-check and what a run does with it: --kernels=auto falls back to
the PyTorch kernels with one warning line and records the backend that ran; --kernels=triton
stops with one line. CPU twin: the kernels in Triton's interpreter; `gpu`: compiled, on CUDA.

A deliberately wrong kernel goes in through the module attribute the self-check reads.
"""
import json

import pytest
import torch

from conftest import compiled_cuda, interpreted, run_cli
from vitprune import kernels
from vitprune.config import Config

pytestmark = pytest.mark.skipif(not kernels.triton_importable(), reason="triton is not installed")
DEVICES = [pytest.param("cpu", marks=interpreted, id="cpu-interpreted"),
           pytest.param("cuda", marks=[pytest.mark.gpu, compiled_cuda], id="cuda")]
RUN = ["run", "--method=refill", "--dataset=synthetic", "--model=vit_micro", "--states=1", "--epochs=1",
       "--batch_size=256", "--wandb=disabled", "--name=r"]


@pytest.fixture(autouse=True)
def fresh_self_check(monkeypatch):
    """Every test starts as a new process would: nothing checked, nothing warned."""
    from vitprune.kernels import self_check
    monkeypatch.setattr(self_check, "_RESULTS", {})
    monkeypatch.setattr(kernels, "_WARNED", set())


def break_kernel(monkeypatch, how: str):
    """Replace a Triton kernel by a wrong one: masked_linear without its bias, group_reg with a
    50% stronger penalty, or a group_reg that fails to compile."""
    from vitprune.kernels import group_reg as gr
    from vitprune.kernels import masked_linear as ml
    if how == "masked_linear":
        real = ml.masked_linear
        monkeypatch.setattr(ml, "masked_linear", lambda x, w, b=None, **kw: real(x, w, None, **kw))
    elif how == "group_reg":
        real_reg = gr.group_reg
        monkeypatch.setattr(gr, "group_reg", lambda p, g, h, n, lam, kind: real_reg(p, g, h, n, 1.5 * lam, kind))
    else:
        def compile_error(*args, **kwargs):
            raise RuntimeError("PTXAS error: Internal Triton PTX codegen error\nptxas fatal   : "
                               "Entry function '_group_reg_kernel' uses too much shared data")
        monkeypatch.setattr(gr, "group_reg", compile_error)


@pytest.mark.parametrize("device", DEVICES)
def test_real_kernels_pass(device):
    assert kernels.self_check.self_check(device, torch.float32) is None
    if device == "cuda":  # bf16 as CUDA runs use it (the interpreter cannot: triton-lang/triton#11584)
        assert kernels.self_check.self_check(device, torch.bfloat16) is None
    assert kernels.resolve_backend("triton", device) == "triton"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how, says", [
    ("masked_linear", "masked_linear failed its self-check on {device} (fp32): live_out+bias y differs"),
    ("group_reg", "group_reg failed its self-check on {device} (fp32): l2 "),
    ("compile error", "group_reg failed its self-check on {device} (fp32): RuntimeError: PTXAS error: "
                      "Internal Triton PTX codegen error | ptxas fatal"),
], ids=["masked_linear", "group_reg", "compile_error"])
def test_wrong_kernel_is_named_in_one_line(device, how, says, monkeypatch):
    break_kernel(monkeypatch, how)
    error = kernels.self_check.self_check(device, torch.float32)
    assert error.startswith("the Triton kernel ") and says.format(device=device) in error
    assert "\n" not in error


@pytest.mark.parametrize("device", DEVICES)
def test_auto_falls_back_with_one_warning(device, monkeypatch, capsys):
    monkeypatch.setattr(kernels, "auto_backend", lambda d: "triton")  # on CPU, as on CUDA
    break_kernel(monkeypatch, "masked_linear")
    assert kernels.resolve_backend("auto", device) == "torch"
    assert kernels.resolve_backend("auto", device) == "torch"  # checked and warned once
    err = capsys.readouterr().err
    assert err.startswith("warning: the Triton kernel masked_linear failed its self-check")
    assert err.endswith("; falling back to --kernels=torch\n") and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_run_falls_back_and_records_the_backend(device, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(kernels, "auto_backend", lambda d: "triton")
    break_kernel(monkeypatch, "masked_linear")
    assert kernels.self_check.self_check(device) is not None  # else the run would be interpreted: hours
    assert run_cli(monkeypatch, *RUN, f"--device={device}", f"--out_dir={tmp_path}") == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "self-check" in line] == [
        line for line in err.splitlines() if line.startswith("warning: the Triton kernel masked_linear")]
    assert len([line for line in err.splitlines() if "self-check" in line]) == 1
    assert f"{device} fp32, kernels=torch" in out or f"{device} bf16, kernels=torch" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["kernels_backend"] == "torch" and summary["config"]["kernels"] == "auto"


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_triton_fails_in_one_line(device, monkeypatch, tmp_path, capsys):
    break_kernel(monkeypatch, "group_reg")
    assert kernels.self_check.self_check(device) is not None  # else the run would be interpreted: hours
    assert run_cli(monkeypatch, *RUN, "--kernels=triton", f"--device={device}", f"--out_dir={tmp_path}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --kernels=triton: the Triton kernel group_reg failed its self-check on ")
    assert err.endswith("; use --kernels=torch or auto\n") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("device", DEVICES)
def test_setup_records_triton_when_it_passes(device, tmp_path, capsys):
    """The start-up line and the run's log name the backend that passed (setup only: a whole
    run in the interpreter would be slow)."""
    from vitprune.runtime import setup
    r = setup(Config(dataset="synthetic", model="vit_micro", kernels="triton", device=device, wandb="disabled",
                     out_dir=str(tmp_path), name="r", states=1, epochs=1))
    assert "kernels=triton" in capsys.readouterr().out
    assert r.log.runtime["kernels_backend"] == "triton"
    r.log.summary({"status": "running"})
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["kernels_backend"] == "triton"
