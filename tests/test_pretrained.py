"""--pretrained: transfer of timm ViT weights (files saved here; no network) and its errors.

The runs go through the CLI's entry point (vitprune.__main__.main) in this process, on a
small synthetic set: vit_small on the full one would take minutes on a CPU.
"""

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

from vitprune import train
from vitprune.model import build_model, load_pretrained

from conftest import run_cli, small_data


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random timm vit_small_patch16_224 (224 px, patch 16, 1000 classes), saved as
    .safetensors, as a {"state_dict": ...} .pth checkpoint, and with one mis-shaped tensor."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    weights = timm.create_model("vit_small_patch16_224", pretrained=False).state_dict()
    save_file(weights, folder / "vit_small.safetensors")
    torch.save({"state_dict": weights, "epoch": 300}, folder / "vit_small.pth")
    save_file({**weights, "blocks.2.mlp.fc1.weight": torch.zeros(100, 384)}, folder / "misshaped.safetensors")
    return weights, folder


@pytest.fixture
def tiny_set(monkeypatch):
    monkeypatch.setattr(train, "load_data", small_data((8, 4, 4)))


def assert_transferred(model_state: dict, weights: dict):
    """Blocks, norms and class token equal the source; the embeddings are resampled to
    patch 4 on the 8×8 grid; the classifier is new (10 classes)."""
    for key, value in weights.items():
        if key.startswith(("blocks.", "norm.", "cls_token", "patch_embed.proj.bias")):
            assert torch.equal(model_state[key], value), key
    assert model_state["patch_embed.proj.weight"].shape == (384, 3, 4, 4)
    assert model_state["pos_embed"].shape == (1, 65, 384)
    assert torch.equal(model_state["pos_embed"][:, 0], weights["pos_embed"][:, 0])  # the class token's
    assert model_state["head.weight"].shape == (10, 384)


@pytest.mark.slow
def test_run_starts_from_the_pretrained_weights(source, tiny_set, monkeypatch, tmp_path, capsys):
    weights, folder = source
    assert run_cli(monkeypatch, "run", "--method=dense", "--dataset=synthetic", "--model=vit_small",
                   f"--pretrained={folder / 'vit_small.safetensors'}", "--states=1", "--epochs=1",
                   "--batch_size=8", "--optimizer=adamw", "--lr=1e-4", f"--out_dir={tmp_path}", "--name=p",
                   "--wandb=disabled") == 0
    out = capsys.readouterr().out
    assert "148 tensors transferred, 2 resampled (position grid 14×14 → 8×8, patch 16×16 → 4×4), " \
           "2 newly initialised (head.weight, head.bias)" in out
    # θ0, the rewind point, is the loaded model.
    theta0 = torch.load(tmp_path / "p" / "checkpoints" / "rewind.pt", weights_only=True)["model"]
    assert_transferred(theta0, weights)


def test_pth_checkpoint_loads_like_safetensors(source):
    weights, folder = source
    from_pth, from_safetensors = build_model("vit_small", 10), build_model("vit_small", 10)
    summary = load_pretrained(from_pth, str(folder / "vit_small.pth"))
    load_pretrained(from_safetensors, str(folder / "vit_small.safetensors"))
    assert summary.startswith(f"--pretrained {folder / 'vit_small.pth'}: 148 tensors transferred, 2 resampled")
    assert_transferred(from_pth.state_dict(), weights)
    for key, value in from_safetensors.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(from_pth.state_dict()[key], value), key


@pytest.mark.parametrize("model,spec,message", [
    ("vit_small", "misshaped.safetensors", "--pretrained: blocks.2.mlp.fc1.weight is 100×384 in "),
    ("vit_micro", "vit_small.safetensors", "does not match --model=vit_micro (64)"),
    ("vit_small", "vit_no_such_model", "is neither a file nor a timm model name"),
    ("vit_small", "vit_small_patch16_224.augreg_in21k_ft_in1k", "are not in the Hugging Face cache and the Hub "
                                                                 "cannot be reached"),
], ids=["misshaped", "wrong-width", "unknown-name", "offline-uncached"])
def test_bad_pretrained_fails_in_one_line(source, tiny_set, monkeypatch, tmp_path, capsys, model, spec, message):
    # offline and an empty cache: timm's download fails at once instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    path = source[1] / spec
    code = run_cli(monkeypatch, "run", "--dataset=synthetic", f"--model={model}",
                   f"--pretrained={path if path.exists() else spec}", "--states=1", "--epochs=1", "--batch_size=8",
                   f"--out_dir={tmp_path}", "--name=bad", "--wandb=disabled")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: --pretrained: ") and message in err, err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_224_px_patch_16_transfers_without_resampling(source, tiny_set, monkeypatch, tmp_path, capsys):
    """--img_size=224 --patch_size=16: timm's vit_small_patch16_224 weights load as they are
    (nothing resampled), and the model computes what timm's own model computes on them."""
    weights, folder = source
    assert run_cli(monkeypatch, "run", "--method=dense", "--dataset=synthetic", "--model=vit_small",
                   "--img_size=224", "--patch_size=16", f"--pretrained={folder / 'vit_small.safetensors'}",
                   "--states=1", "--epochs=1", "--batch_size=8", "--optimizer=adamw", "--lr=1e-4",
                   f"--out_dir={tmp_path}", "--name=p224", "--wandb=disabled") == 0
    out = capsys.readouterr().out
    assert "150 tensors transferred, 0 resampled (none), 2 newly initialised (head.weight, head.bias)" in out
    theta0 = torch.load(tmp_path / "p224" / "checkpoints" / "rewind.pt", weights_only=True)["model"]
    assert all(torch.equal(theta0[k], v) for k, v in weights.items() if not k.startswith("head."))
    # One forward of a 224-px batch against timm's model holding the same weights (our classifier).
    model = build_model("vit_small", 10, img_size=224, patch_size=16)
    model.load_state_dict(theta0)
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)
    reference.load_state_dict(theta0)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(x), reference.eval()(x)
    assert ours.shape == (2, 10) and torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
