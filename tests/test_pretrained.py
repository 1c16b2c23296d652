"""--pretrained through timm (weight files saved here; no network) and the preprocessing that
follows the weights' pretrained_cfg; bad and unreachable weights fail in one line."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

from vitprune import train
from vitprune import runtime
from vitprune.config import from_flags
from vitprune.model import build_model

from conftest import run_cli, small_data

ROOT = Path(__file__).resolve().parent.parent
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # DeiT's pretrained_cfg
AUGREG = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's augreg ViTs
DEIT, AUGREG_NAME = "deit_small_patch16_224", "vit_small_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random timm ViT-S/16 at 224 px with 1000 classes (DeiT-S and augreg ViT-S share it),
    saved as .safetensors and as a {"state_dict": ...} .pth checkpoint."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    weights = timm.create_model(DEIT, pretrained=False).state_dict()
    save_file(weights, folder / "vit_s16.safetensors")
    torch.save({"state_dict": weights, "epoch": 300}, folder / "vit_s16.pth")
    return weights, folder


@pytest.fixture
def tiny_set(monkeypatch):
    monkeypatch.setattr(runtime, "load_data", small_data((8, 4, 4)))


def flags(model, weights, tmp_path, **more):
    return {"model": model, "pretrained": str(weights), "dataset": "synthetic", "img_size": 32, "states": 1,
            "epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 1e-4, "method": "dense",
            "out_dir": str(tmp_path), "name": "p", "wandb": "disabled", **more}


@pytest.mark.parametrize("file", ["vit_s16.safetensors", "vit_s16.pth"])
def test_weights_load_as_timm_loads_them(source, file):
    """Blocks and norms are the file's; the position embedding is resampled to the 2×2 grid
    of 32 px / patch 16 as timm's own loader resamples it; the classifier is new (10 classes)."""
    weights, folder = source
    model = build_model(DEIT, 10, img_size=32, patch_size=16, pretrained=str(folder / file)).state_dict()
    for key, value in weights.items():
        if key.startswith(("blocks.", "norm.", "cls_token", "patch_embed.")):
            assert torch.equal(model[key], value), key
    expected = timm.layers.resample_abs_pos_embed(weights["pos_embed"], [2, 2], num_prefix_tokens=1)
    assert model["pos_embed"].shape == (1, 5, 384) and torch.allclose(model["pos_embed"], expected)
    assert model["head.weight"].shape == (10, 384)


@pytest.mark.parametrize("name,norm", [(DEIT, IMAGENET), (AUGREG_NAME, AUGREG)], ids=["deit", "augreg"])
def test_the_weights_pretrained_cfg_sets_the_normalisation(source, tiny_set, tmp_path, name, norm):
    """The batches the run feeds the model are (x/255 − mean)/std with the weights' mean and std."""
    cfg = from_flags(flags(name, source[1] / "vit_s16.safetensors", tmp_path))
    assert cfg.patch_size == 16  # the timm model's own
    r = train.setup(cfg)
    assert r.preprocessing == {"img_size": 32, "mean": list(norm[0]), "std": list(norm[1]),
                               "interpolation": "bicubic"}
    x, _ = next(r.data.batches("test"))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    assert torch.allclose(x, (r.data.test_x[:len(x)].float() / 255 - mean) / std, atol=1e-6)
    # From scratch: 0.5 / 0.5
    scratch = train.setup(from_flags({**flags(name, "", tmp_path, name="s"), "pretrained": None}))
    assert scratch.preprocessing["mean"] == [0.5] * 3 and scratch.preprocessing["std"] == [0.5] * 3


def test_img_size_defaults_to_the_weights_input_size(source):
    cfg = from_flags({"model": "vit_small", "pretrained": str(source[1] / "vit_s16.pth"), "dataset": "synthetic"})
    assert (cfg.img_size, cfg.patch_size) == (224, 16)
    cfg = from_flags({"model": "vit_small", "dataset": "synthetic"})
    assert (cfg.img_size, cfg.patch_size) == (32, 4)  # an alias from scratch: as before


@pytest.mark.slow
@pytest.mark.parametrize("name,norm", [(DEIT, IMAGENET), (AUGREG_NAME, AUGREG)], ids=["deit", "augreg"])
def test_run_records_the_preprocessing(source, tiny_set, monkeypatch, tmp_path, name, norm):
    weights, folder = source
    args = [f"--{k}={v}" for k, v in flags(name, folder / "vit_s16.safetensors", tmp_path).items()]
    assert run_cli(monkeypatch, "run", *args) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    ck = torch.load(tmp_path / "p" / "checkpoints" / "state_00.pt", weights_only=True)
    for prep in (summary["preprocessing"], ck["preprocessing"]):
        assert (prep["mean"], prep["std"], prep["img_size"]) == (list(norm[0]), list(norm[1]), 32)
    theta0 = torch.load(tmp_path / "p" / "checkpoints" / "rewind.pt", weights_only=True)["model"]
    assert all(torch.equal(theta0[k], v) for k, v in weights.items() if k.startswith("blocks."))


@pytest.mark.parametrize("model,spec,message", [
    ("vit_micro", "vit_s16.safetensors", "size mismatch for"),
    ("vit_small", "vit_no_such_model", "is neither a file nor a timm model name"),
    ("vit_small", "vit_small_patch16_224.no_such_tag", "Invalid pretrained tag"),
    ("vit_small", AUGREG_NAME, "the Hugging Face cache is empty and the Hub cannot be reached"),  # offline
], ids=["wrong-model", "unknown-name", "unknown-tag", "offline-empty-cache"])
def test_bad_pretrained_fails_in_one_line(source, tiny_set, monkeypatch, tmp_path, capsys, model, spec, message):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    if "cache is empty" not in message:  # a cache holding some other model: timm itself looks the name up
        (tmp_path / "hf" / "models--someone--other").mkdir(parents=True)
    path = source[1] / spec
    code = run_cli(monkeypatch, "run", "--dataset=synthetic", f"--model={model}", "--img_size=32",
                   f"--pretrained={path if path.exists() else spec}", "--states=1", "--epochs=1", "--batch_size=8",
                   f"--out_dir={tmp_path}", "--name=bad", "--wandb=disabled")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: --pretrained: ") and message in err, err
    assert not (tmp_path / "bad").exists()


def test_offline_tag_not_in_a_cache_holding_other_models(monkeypatch, tmp_path, capsys):
    """A cache with other models: timm says which file it needs, still without the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "hf" / "models--timm--vit_tiny_patch16_224.augreg_in21k").mkdir(parents=True)
    code = run_cli(monkeypatch, "run", "--dataset=synthetic", f"--pretrained={AUGREG_NAME}",
                   f"--out_dir={tmp_path}", "--name=bad", "--wandb=disabled")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "are not in the Hugging Face cache" in err, err
    assert not (tmp_path / "bad").exists()


def test_offline_tag_fails_within_seconds(tmp_path):
    """No network, no cache: exit 2, one line, in under 5 s, nothing created."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled"}
    start = time.time()
    p = subprocess.run([sys.executable, "-m", "vitprune", "run", "--dataset=synthetic", f"--pretrained={AUGREG_NAME}",
                        f"--out_dir={tmp_path / 'runs'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    elapsed = time.time() - start
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: --pretrained: ") and elapsed < 5, (elapsed, p.stderr)
    assert not (tmp_path / "runs").exists()


def test_a_tag_loads_from_the_hugging_face_cache_offline(source, monkeypatch, tmp_path):
    """The cache route: a timm name whose weights sit in the Hugging Face cache loads with no network."""
    weights, folder = source
    repo = tmp_path / "hf" / f"models--timm--{AUGREG_NAME}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "model.safetensors").write_bytes((folder / "vit_s16.safetensors").read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = from_flags({"model": "vit_small", "pretrained": AUGREG_NAME, "dataset": "synthetic", "img_size": 32})
    assert cfg.patch_size == 16
    model = build_model(cfg.model, 10, cfg.img_size, cfg.patch_size, cfg.pretrained).state_dict()
    assert all(torch.equal(model[k], v) for k, v in weights.items() if k.startswith(("blocks.", "norm.")))
