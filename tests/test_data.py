"""CIFAR through torchvision on files written in its own format; the tensor loader."""
import pickle

import numpy as np
import torch
import torchvision

from vitprune.data import load_data, normalize, synthetic, train_batches


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
    d = load_data("cifar10", str(tmp_path), seed=0)
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
    assert not torch.equal(load_data("cifar10", str(tmp_path), seed=1).val_y, d.val_y)
    assert torch.equal(load_data("cifar10", str(tmp_path), seed=0).val_x, d.val_x)


def test_augmentation_is_crop_of_padded_image_and_flip():
    d = synthetic(0, sizes=(64, 8, 8))
    x, y = next(train_batches(d, 64, seed=3, state=1, epoch=2))
    g_x, g_y = next(train_batches(d, 64, seed=3, state=1, epoch=2))
    assert torch.equal(x, g_x) and torch.equal(y, g_y)  # same (seed, state, epoch): same batch
    x2, _ = next(train_batches(d, 64, seed=3, state=1, epoch=3))
    assert not torch.equal(x, x2)
    # Every augmented image is one of the 9x9 crops of its zero-padded source, maybe flipped.
    src = {int(i): d.train_x[i] for i in range(64)}
    for k in range(8):
        img = x[k]
        candidates = [i for i in range(64) if d.train_y[i] == y[k]]
        found = False
        for i in candidates:
            padded = normalize(torch.nn.functional.pad(src[i], (4, 4, 4, 4)))
            for dy in range(9):
                for dx in range(9):
                    crop = padded[:, dy:dy + 32, dx:dx + 32]
                    if torch.equal(crop, img) or torch.equal(crop.flip(2), img):
                        found = True
        assert found


def test_synthetic_is_deterministic_and_balanced():
    a, b = synthetic(0), synthetic(0)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    counts = torch.bincount(a.test_y, minlength=10)
    assert counts.min() > 70 and a.num_classes == 10
