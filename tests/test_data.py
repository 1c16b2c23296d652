"""CIFAR through torchvision on files written in its own format; the tensor loader."""
import json
import pickle

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF

from conftest import run_cli
from vitprune.config import from_flags
from vitprune.data import load_data
from vitprune.data.core import Data, normalize, train_batches
from vitprune.data.synth import synthetic


def cifar(data_dir, seed=0, **flags):
    return load_data(from_flags({"dataset": "cifar10", "data_dir": str(data_dir), "seed": seed, **flags}))


def write_cifar10(root, n_train_per_batch=1200, n_test=500):
    """The python-pickle layout torchvision reads: cifar-10-batches-py/data_batch_1..5, test_batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in files:
        n = n_test if name == "test_batch" else n_train_per_batch
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return folder


def test_cifar10_from_torchvision_files(tmp_path, monkeypatch):
    folder = write_cifar10(tmp_path)
    # Our files are not the real ones, so their MD5 sums differ: skip only that check.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    d = cifar(tmp_path, val_size=5000)
    assert d.num_classes == 10
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (6000 - 5000, 5000, 500)
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape[1:] == (3, 32, 32)
    # Image 0 of data_batch_1 is its first row, channel-major (R plane, G plane, B plane).
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f)
    first = torch.from_numpy(raw["data"][0].reshape(3, 32, 32))
    all_x = torch.cat([d.train_x, d.val_x])
    assert (all_x == first).flatten(1).all(1).any()
    # The val split is drawn with the seed: another seed, another split; same seed, same split.
    assert not torch.equal(cifar(tmp_path, seed=1, val_size=5000).val_y, d.val_y)
    assert torch.equal(cifar(tmp_path, seed=0, val_size=5000).val_x, d.val_x)


def random_data(n, size, classes=4):
    g = torch.Generator().manual_seed(size)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    return Data(x, y, x[:8], y[:8], x[:8], y[:8], classes, img_size=size)


@pytest.mark.parametrize("size", [32, 24])
def test_augmentation_is_crop_of_padded_image_and_flip(size):
    """A random crop of the image zero-padded by 1/8 of its side (4 px at 32, 3 at 24), maybe flipped."""
    d = synthetic(0, sizes=(64, 8, 8)) if size == 32 else random_data(64, size)
    x, y = next(train_batches(d, 64, seed=3, state=1, epoch=2))
    g_x, g_y = next(train_batches(d, 64, seed=3, state=1, epoch=2))
    assert torch.equal(x, g_x) and torch.equal(y, g_y)  # same (seed, state, epoch): same batch
    x2, _ = next(train_batches(d, 64, seed=3, state=1, epoch=3))
    assert not torch.equal(x, x2)
    pad = size // 8
    offsets = range(2 * pad + 1)
    for k in range(8):
        img = x[k]
        found = False
        for i in (i for i in range(64) if d.train_y[i] == y[k]):
            padded = normalize(torch.nn.functional.pad(d.train_x[i], (pad, pad, pad, pad)))
            for dy in offsets:
                for dx in offsets:
                    crop = padded[:, dy:dy + size, dx:dx + size]
                    if torch.equal(crop, img) or torch.equal(crop.flip(2), img):
                        found = True
        assert found


def seed_train_batches(data, batch_size, seed, state, epoch):
    """The 32-px augmentation as it was before other sizes existed, verbatim: the oracle that
    keeps the default runs bit-identical to the earlier ones."""
    n = len(data.train_y)
    g = torch.Generator().manual_seed(((seed * 1009 + state) * 100003 + epoch) % (2 ** 63))
    perm = torch.randperm(n, generator=g)
    shifts = torch.randint(0, 9, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    ar = torch.arange(32)
    for start in range(0, n - batch_size + 1, batch_size):
        sl = slice(start, start + batch_size)
        idx = perm[sl]
        x = torch.nn.functional.pad(data.train_x[idx], (4, 4, 4, 4))
        rows = (shifts[sl, 0, None] + ar)[:, None, :, None]
        cols = shifts[sl, 1, None] + ar
        cols = torch.where(flips[sl, None], cols.flip(1), cols)[:, None, None, :]
        b = torch.arange(batch_size)[:, None, None, None]
        c = torch.arange(3)[None, :, None, None]
        yield normalize(x[b, c, rows, cols]), data.train_y[idx]


def test_default_augmentation_is_bit_identical_to_the_seed_pipeline():
    d = synthetic(0, sizes=(300, 8, 8))
    for (x, y), (sx, sy) in zip(train_batches(d, 64, seed=2, state=3, epoch=4),
                                seed_train_batches(d, 64, seed=2, state=3, epoch=4), strict=True):
        assert torch.equal(x, sx) and torch.equal(y, sy)


def test_start_step_yields_the_rest_of_the_epoch():
    d = synthetic(0, sizes=(300, 8, 8))
    full = list(train_batches(d, 32, seed=1, state=2, epoch=5))
    rest = list(train_batches(d, 32, seed=1, state=2, epoch=5, start_step=6))
    assert len(full) == 9 and len(rest) == 3
    assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(rest, full[6:]))


def test_cifar_resized_on_the_device_after_augmentation():
    """--img_size=64 on 32-px CIFAR/synthetic: the 32-px batch, augmented, then resized
    (bilinear, antialiased); evaluation batches too. The stored set stays 32 px."""
    d = synthetic(0, sizes=(64, 8, 8))
    big = Data(*(getattr(d, k) for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")), 10,
               img_size=64)
    resize = lambda x: TF.resize(x, [64, 64], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    (x32, y32), (x64, y64) = (next(train_batches(data, 32, seed=0, state=0, epoch=0)) for data in (d, big))
    assert x64.shape == (32, 3, 64, 64) and torch.equal(y32, y64)
    assert torch.allclose(x64, resize(x32), atol=1e-6)
    (v32, _), (v64, _) = next(d.batches("val")), next(big.batches("val"))
    assert v64.shape == (8, 3, 64, 64) and torch.allclose(v64, resize(v32), atol=1e-6)
    assert big.train_x.shape[-1] == 32


def test_cifar_default_val_size_is_a_tenth(tmp_path, monkeypatch, capsys):
    """A CIFAR-format set of 1,500 training images: 1,350 / 150 by default; --val_size=150 is
    the same split; --val_size=5000 fails in one line naming the flag and creates nothing."""
    write_cifar10(tmp_path, n_train_per_batch=300)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    d = cifar(tmp_path)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (1350, 150, 500)
    assert torch.equal(cifar(tmp_path, val_size=150).val_x, d.val_x)
    cfg = from_flags({"dataset": "cifar10", "val_size": 5000})  # Fire gives an int; stored as a float
    assert from_flags(json.loads(json.dumps(cfg.to_dict()))).val_size == 5000
    out = tmp_path / "runs"
    code = run_cli(monkeypatch, "run", "--dataset=cifar10", "--val_size=5000", f"--data_dir={tmp_path}",
                   f"--out_dir={out}", "--wandb=disabled")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --val_size: 5000 out of 1500 training images leaves none to train on"), err
    assert not out.exists()


def test_synthetic_is_deterministic_and_balanced():
    a, b = synthetic(0), synthetic(0)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    counts = torch.bincount(a.test_y, minlength=10)
    assert counts.min() > 70 and a.num_classes == 10
