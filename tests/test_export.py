"""export / load_exported / bench_export on checkpoints of real (tiny) runs of every method.

The runs go through the CLI's entry point in this process, on vit_micro and a small
synthetic set (2 states × 1 epoch, ratio 0.5), so the whole module takes seconds.
"""
import errno
import json
import sys
from pathlib import Path

import pytest
import torch

from vitprune import deploy, files, runtime
from vitprune.errors import ConfigError
from vitprune.bench import bench_export
from vitprune.deploy import compact_model, export, load_checkpoint, load_exported
from vitprune.model import build_model
from vitprune.structure import Structure, apply_structure, count

from conftest import run_cli, small_data

METHODS = ("refill", "rsst", "imp")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{method: RUN/checkpoints/state_01.pt} of a refill, an rsst and an imp run."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "load_data", small_data((64, 16, 16)))
        for method in METHODS:
            assert run_cli(mp, "run", f"--method={method}", "--dataset=synthetic", "--model=vit_micro",
                           "--ratio=0.5", "--states=2", "--epochs=1", "--batch_size=32", "--optimizer=adamw",
                           "--lr=1e-3", f"--out_dir={out}", f"--name={method}",
                           "--wandb=disabled") == 0
    return {method: out / method / "checkpoints" / "state_01.pt" for method in METHODS}


def pruned_network(ck: dict):
    """(model, structure): the network training evaluated, rebuilt without vitprune.deploy."""
    model = build_model(ck["config"]["model"], num_classes=10)
    model.load_state_dict(ck["model"])
    structure = Structure.from_state_dict(ck["structure"])
    apply_structure(model, structure)
    return model.eval(), structure


def outputs(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["refill", "rsst"])
def test_export_computes_the_pruned_network(checkpoints, method, monkeypatch, tmp_path):
    ck = load_checkpoint(checkpoints[method])
    masked, structure = pruned_network(ck)
    assert not structure.heads.all() and not structure.neurons.all()
    assert run_cli(monkeypatch, "export", checkpoints[method], "--out", tmp_path / "export") == 0
    exported = load_exported(tmp_path / "export")
    x = torch.randn(16, 3, 32, 32)
    assert (outputs(exported, x) - outputs(masked, x)).abs().max() <= 1e-5
    assert sum(p.numel() for p in exported.parameters()) == ck["record"]["params_alive"]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["num_heads"] == structure.heads.sum(1).tolist() == [b.attn.num_heads for b in exported.blocks]
    assert config["mlp_hidden"] == structure.neurons.sum(1).tolist()
    assert config["source"]["method"] == method and config["source"]["state"] == 1
    assert not exported.training and type(exported.blocks[0].attn).__module__.startswith("timm.")
    # the saved model is the in-memory one
    assert torch.equal(outputs(exported, x), outputs(compact_model(masked, structure), x))


@pytest.mark.slow
def test_imp_export_keeps_dense_shapes(checkpoints, tmp_path, capsys):
    ck = load_checkpoint(checkpoints["imp"])
    masked, structure = pruned_network(ck)
    export(checkpoints["imp"], tmp_path)
    assert "unstructured (imp)" in capsys.readouterr().out
    exported = load_exported(tmp_path)
    shapes = lambda model: {k: v.shape for k, v in model.state_dict().items()}
    assert shapes(exported) == shapes(masked)
    zeros = sum(int((exported.get_parameter(name) == 0).sum()) for name in structure.elements)
    assert zeros >= sum(int((~m).sum()) for m in structure.elements.values()) > 0
    x = torch.randn(4, 3, 32, 32)
    assert (outputs(exported, x) - outputs(masked, x)).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_blocks_with_nothing_alive_export_exactly():
    """min_keep >= 1 prevents it in runs, but a block without heads or neurons still exports."""
    torch.manual_seed(0)
    model = build_model("vit_micro", 10).eval()
    structure = Structure.full(model)
    structure.heads[0] = False
    structure.neurons[1] = False
    structure.heads[2, 1:] = False
    apply_structure(model, structure)
    compact = compact_model(model, structure)
    x = torch.randn(4, 3, 32, 32)
    assert (outputs(compact, x) - outputs(model, x)).abs().max() <= 1e-5
    assert [b.attn.num_heads for b in compact.blocks] == [0, 4, 1, 4]
    # the block without neurons keeps one zero neuron (timm's Mlp cannot be 0 wide)
    assert sum(p.numel() for p in compact.parameters()) == count(model, structure)["params_alive"] + 2 * 64 + 1


@pytest.mark.slow
def test_bad_checkpoint_and_out_fail_in_one_line(checkpoints, monkeypatch, tmp_path, capsys):
    run_dir = checkpoints["refill"].parent.parent
    with pytest.raises(ConfigError, match="rewind.pt holds weights only"):
        export(run_dir / "checkpoints" / "rewind.pt", tmp_path / "x")
    with pytest.raises(ConfigError, match="cannot read"):
        export(tmp_path / "missing.pt", tmp_path / "x")
    config = (run_dir / "config.json").read_text()
    assert run_cli(monkeypatch, "export", checkpoints["refill"], "--out", run_dir) == 2
    assert capsys.readouterr().err.strip().startswith("error: --out: ")
    assert (run_dir / "config.json").read_text() == config


@pytest.mark.slow
def test_bench_export_smoke(checkpoints, capsys):
    result = bench_export(checkpoints["refill"], batches=(1, 4), iters=2, warmup=0, compile=False)
    table = capsys.readouterr().out
    dense, exported = result["dense"], result["exported"]
    ck = load_checkpoint(checkpoints["refill"])
    assert exported["params"] == ck["record"]["params_alive"] and dense["params"] == ck["record"]["params_total"]
    assert exported["flops_per_image"] == ck["record"]["flops_alive"] < dense["flops_per_image"]
    assert set(dense["latency_s"]) == set(exported["peak_memory_bytes"]) == {1, 4}
    assert all(t > 0 for t in [*dense["latency_s"].values(), *exported["latency_s"].values()])
    assert table.startswith("# vitprune export benchmark — ") and result["date"] in table
    assert "| parameters (M) | 0.142 |" in table and "| latency, batch 4 (ms) |" in table
    # the rounding rows come from the same checkpoint: its widths, rounded
    variants = result["variants"]
    assert variants["pruned"]["mlp_widths"] == ck["structure"]["neurons"].sum(1).tolist()
    assert all(w % 8 == 0 for w in variants["pruned, round_to 8"]["mlp_widths"])
    assert result["engines"] == ["eager", "onnxruntime"] and "torch.compile: not measured (compile=False)." in table
    for v in variants.values():
        assert all(t > 0 for engine in v["latency_s"].values() for t in engine.values())
        assert set(v["latency_s"]["onnxruntime"]) == {1, 4}
    assert "| batch 4 | eager torch (ms) | ps / FLOP | ONNX Runtime (ms) | ps / FLOP |" in table


# Runs in a fresh interpreter, where importing vitprune fails: torch and onnxruntime alone.
DEPLOY = """
import sys
sys.modules["vitprune"] = None  # any import of vitprune now raises ImportError
import numpy as np, onnxruntime, torch
program = torch.export.load("model.pt2").module()
session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
for b in (1, 5):
    x = torch.from_numpy(np.load(f"x{b}.npy"))
    with torch.no_grad():
        np.save(f"pt2_{b}.npy", program(x).numpy())
    np.save(f"onnx_{b}.npy", session.run(None, {"images": x.numpy()})[0])
assert not [m for m in sys.modules if m.startswith("vitprune") and sys.modules[m] is not None]
"""


@pytest.mark.slow
def test_deploy_formats_run_without_vitprune(checkpoints, monkeypatch, tmp_path):
    """model.pt2 (torch.export.load) and model.onnx (ONNX Runtime), in an interpreter that
    never imports vitprune, compute the checkpoint's masked network at two batch sizes."""
    import subprocess
    import sys

    import numpy as np
    assert run_cli(monkeypatch, "export", checkpoints["refill"], "--out", tmp_path) == 0
    masked, _ = pruned_network(load_checkpoint(checkpoints["refill"]))
    expected = {}
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        np.save(tmp_path / f"x{b}.npy", x.numpy())
        expected[b] = outputs(masked, x).numpy()
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", DEPLOY], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    for b in (1, 5):
        for kind in ("pt2", "onnx"):
            got = np.load(tmp_path / f"{kind}_{b}.npy")
            assert got.shape == (b, 10) and np.abs(got - expected[b]).max() <= 1e-4, (kind, b)


def card_value(card: str, label: str) -> str:
    """The value cell of the model card's row `label`."""
    return next(line.split(" | ")[1].rstrip(" |") for line in card.splitlines() if line.startswith(f"| {label} |"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["refill", "rsst"])
def test_model_card_reports_the_state_record(checkpoints, method, tmp_path):
    """The card's accuracy and size are the state record's in the run's metrics.jsonl."""
    export(checkpoints[method], tmp_path)
    card = (tmp_path / "README.md").read_text()
    run_dir = checkpoints[method].parent.parent
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = next(r for r in records if r.get("kind") == "state" and r["state"] == 1)
    assert card_value(card, "val accuracy (pruned network)") == f"{state['final_val_acc']:.2f}%"
    assert card_value(card, "test accuracy (pruned network)") == f"{state['final_test_acc']:.2f}%"
    assert card_value(card, "parameters").startswith(f"{state['params_alive']:,} ")
    assert card_value(card, "FLOPs per image").startswith(f"{state['flops_alive']:,} ")
    structure = Structure.from_state_dict(load_checkpoint(checkpoints[method])["structure"])
    rows = [line for line in card.splitlines() if line[:4] in {f"| {l} " for l in range(len(structure.heads))}]
    assert [line.split(" | ")[1:3] for line in rows] == [
        [str(int(h)), f"{int(n)} |"] for h, n in zip(structure.heads.sum(1), structure.neurons.sum(1))]
    assert "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in card and "32×32" in card


# ---- an export is written as one set --------------------------------------------------------

def listing(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.slow
def test_an_export_replaces_the_earlier_one_whole(checkpoints, monkeypatch, tmp_path, capsys):
    """Nothing of an earlier export survives: re-exported without onnx, the old model.onnx is
    gone and the card does not offer it."""
    out = tmp_path / "export"
    out.mkdir()  # an empty folder is fine
    assert run_cli(monkeypatch, "export", checkpoints["refill"], "--out", out) == 0
    assert "model.onnx" in listing(out) and "model.onnx" in (out / "README.md").read_text()
    state_0 = checkpoints["refill"].parent / "state_00.pt"
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
        assert run_cli(mp, "export", state_0, "--out", out) == 0
    assert "model.onnx not written" in capsys.readouterr().out
    assert sorted(listing(out)) == ["README.md", "config.json", "model.pt2", "model.safetensors"]
    assert "model.onnx" not in (out / "README.md").read_text()
    ck = load_checkpoint(state_0)
    masked, _ = pruned_network(ck)
    x = torch.randn(4, 3, 32, 32)
    assert (outputs(load_exported(out), x) - outputs(masked, x)).abs().max() <= 1e-5  # state 0's network
    assert json.loads((out / "config.json").read_text())["source"]["state"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp folder left beside it


def fill_disk(monkeypatch, name: str):
    """ENOSPC half-way through writing `name` (through files.write_atomic: its temp file
    NAME.PID.RANDOM.tmp; model.onnx, which the ONNX exporter writes itself: there)."""
    real_write, real_save_onnx = files.Writer.write, deploy.save_onnx

    def write(self, data):
        if Path(self.f.name).name.startswith(name + "."):
            self.f.write(bytes(memoryview(data).cast("B")[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    def save_onnx(program, path, img_size):
        real_save_onnx(program, path, img_size)
        path.write_bytes(path.read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.Writer, "write", write)
    if name == "model.onnx":
        monkeypatch.setattr(deploy, "save_onnx", save_onnx)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model.pt2", "model.onnx", "README.md"])
def test_a_full_disk_anywhere_in_an_export_keeps_the_earlier_one_whole(checkpoints, monkeypatch, tmp_path,
                                                                       capsys, name):
    out = tmp_path / "export"
    assert run_cli(monkeypatch, "export", checkpoints["refill"], "--out", out) == 0
    before = listing(out)
    capsys.readouterr()
    with monkeypatch.context() as mp:
        fill_disk(mp, name)
        assert run_cli(mp, "export", checkpoints["refill"].parent / "state_00.pt", "--out", out) == 75
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: disk full: writing {out / name} needs "), err
    assert listing(out) == before and [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("contents", ["a thesis", "an export and notes", "a file", "the current folder"])
def test_an_out_that_is_not_an_earlier_export_is_refused(tmp_path, monkeypatch, capsys, contents):
    """--out is replaced whole, so it must be new, empty, or an earlier export: anything else
    is refused in one line before the checkpoint is even read, and left as it was."""
    out = tmp_path / "out"
    if contents == "a file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        (out / "thesis.tex").write_text("\\documentclass{article}")
    if contents == "an export and notes":
        (out / "thesis.tex").rename(out / "notes.txt")
        (out / "config.json").write_text(json.dumps({"format": deploy.EXPORT_FORMAT}))
        (out / "README.md").write_text("# the card")
    if contents == "the current folder":
        (out / "README.md").write_text("# my project")
        monkeypatch.chdir(out)
    before = listing(out) if out.is_dir() else out.read_bytes()
    target = "." if contents == "the current folder" else out
    assert run_cli(monkeypatch, "export", tmp_path / "missing.pt", "--out", target) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --out: {out} "), err
    assert (listing(out) if out.is_dir() else out.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_the_export_holds_no_absolute_path(checkpoints, monkeypatch, tmp_path):
    """The card and config.json name the checkpoint as RUN/checkpoints/state_XX.pt, a folder
    data set and a local weights file by their names: nothing of the machine they were made on."""
    ck = torch.load(checkpoints["refill"], weights_only=True)
    ck["config"].update(dataset=f"folder:{tmp_path}/images/flowers", pretrained=f"{tmp_path}/weights/vit.safetensors")
    source = tmp_path / "my_run" / "checkpoints" / "state_01.pt"
    source.parent.mkdir(parents=True)
    torch.save(ck, source)
    assert run_cli(monkeypatch, "export", source, "--out", tmp_path / "export") == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    card = (tmp_path / "export" / "README.md").read_text()
    assert config["source"]["checkpoint"] == "my_run/checkpoints/state_01.pt"
    assert config["source"]["dataset"] == "folder:flowers" and config["source"]["pretrained"] == "vit.safetensors"
    assert "`my_run/checkpoints/state_01.pt` (run folder `my_run`)" in card and "folder:flowers" in card
    for text in (json.dumps(config), card):
        assert "/tmp" not in text and str(tmp_path) not in text and str(Path.home()) not in text
