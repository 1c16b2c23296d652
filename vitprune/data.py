"""Datasets as uint8 tensors on the training device, and batched augmentation.

A whole dataset is one [N, 3, 32, 32] uint8 tensor; an epoch is a seeded permutation, and
augmentation (random crop with 4-pixel zero padding, horizontal flip) is a few tensor ops
per batch. The order and the augmentation of every batch depend only on (seed, state,
epoch), so a run is reproducible and resumes at any epoch.
"""
import math
from dataclasses import dataclass

import torch

from vitprune.config import ConfigError

MEAN, STD = 0.5, 0.5  # the normalisation of timm's augreg ViTs; fine from scratch too
CIFAR_VAL = 5000
SYNTHETIC_SIZES = (4000, 500, 1000)  # train, val, test


@dataclass
class Data:
    train_x: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def to(self, device) -> "Data":
        return Data(*(t.to(device) for t in (self.train_x, self.train_y, self.val_x, self.val_y,
                                             self.test_x, self.test_y)), self.num_classes)


def load_data(name: str, data_dir: str, seed: int) -> Data:
    """CIFAR-10/100 (45k train / 5k val drawn with `seed` / 10k test) or the synthetic set."""
    if name == "synthetic":
        return synthetic(seed)
    train_x, train_y, test_x, test_y, classes = _cifar(name, data_dir)
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:CIFAR_VAL], perm[CIFAR_VAL:]
    return Data(train_x[train], train_y[train], train_x[val], train_y[val], test_x, test_y, classes)


def _cifar(name, data_dir):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    sets = []
    for train in (True, False):
        try:
            ds = cls(data_dir, train=train, download=False)
        except RuntimeError:  # not there (or corrupt): try to fetch it
            try:
                ds = cls(data_dir, train=train, download=True)
            except Exception as e:
                raise ConfigError(
                    f"--data_dir: {name} is not in {data_dir!r} and could not be downloaded "
                    f"({type(e).__name__}); put torchvision's {name} files there or use --dataset=synthetic"
                ) from None
        sets.append((torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                     torch.tensor(ds.targets, dtype=torch.int64)))
    (train_x, train_y), (test_x, test_y) = sets
    return train_x, train_y, test_x, test_y, 10 if name == "cifar10" else 100


def synthetic(seed: int, sizes=SYNTHETIC_SIZES, num_classes: int = 10) -> Data:
    """A generated, learnable 32x32 RGB set of 10 classes: each class has its own pattern
    (horizontal, vertical or diagonal stripes, checkerboard, rings; random frequency and
    phase) and its own foreground hue (jittered, so neighbouring hues overlap), with
    Gaussian noise on top. The images are fixed (generator seed 0); only the val split uses `seed`.
    """
    n_train, n_val, n_test = sizes
    g = torch.Generator().manual_seed(0)
    x, y = _synthetic_images(n_train + n_val + n_test, num_classes, g)
    pool = n_train + n_val
    perm = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))
    train, val = perm[n_val:], perm[:n_val]
    return Data(x[train], y[train], x[val], y[val], x[pool:], y[pool:], num_classes)


def _synthetic_images(n, num_classes, g):
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    pattern = y % 5
    r = torch.arange(32.0)
    yy, xx = r[:, None], r[None, :]
    freq = (0.35 + 0.35 * torch.rand(n, generator=g))[:, None, None]
    phase = (2 * math.pi * torch.rand(n, generator=g))[:, None, None]
    cx, cy = (8 + 16 * torch.rand(2, n, generator=g))[:, :, None, None]
    waves = torch.stack([
        torch.sin(freq * yy + phase).expand(n, 32, 32),
        torch.sin(freq * xx + phase).expand(n, 32, 32),
        torch.sin(freq * (xx + yy) / 1.4 + phase),
        torch.sin(freq * xx + phase) * torch.sin(freq * yy + phase) * 2,
        torch.sin(freq * torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) + phase),
    ])
    p = waves[pattern, torch.arange(n)].clamp(-1, 1)[:, None]  # [n, 1, 32, 32]
    # Foreground hue by class (10 hues around the wheel, neighbours overlap under jitter),
    # dark or light background by pattern parity: colour alone does not give the class.
    hue = 2 * math.pi * (y.float() / num_classes + 0.09 * torch.randn(n, generator=g))
    fg = 0.5 + 0.4 * torch.stack([torch.cos(hue), torch.cos(hue - 2.094), torch.cos(hue + 2.094)], 1)
    bg = (0.15 + 0.7 * (pattern % 2)).float()[:, None].expand(n, 3) + 0.1 * torch.randn(n, 3, generator=g)
    colors = torch.stack([fg, bg], 1)  # [n, 2, 3]
    fg, bg = colors[:, 0, :, None, None], colors[:, 1, :, None, None]
    img = bg + (fg - bg) * (p + 1) / 2 + 0.15 * torch.randn(n, 3, 32, 32, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - MEAN) / STD


def epoch_generator(seed: int, state: int, epoch: int) -> torch.Generator:
    # One independent stream per (seed, state, epoch): resuming at any epoch replays it.
    return torch.Generator().manual_seed(((seed * 1009 + state) * 100003 + epoch) % (2 ** 63))


def train_batches(data: Data, batch_size: int, seed: int, state: int, epoch: int, rank: int = 0, world: int = 1):
    """Yield augmented, normalised training batches (x float [B, 3, 32, 32], y) of one epoch.

    The last incomplete batch is dropped so every step has the same shape. With `world`
    processes (DDP), every process draws the same global batch and takes its 1/world share,
    so the global batch, and the run, do not depend on the number of processes.
    """
    n = len(data.train_y)
    g = epoch_generator(seed, state, epoch)
    device = data.train_x.device
    perm = torch.randperm(n, generator=g).to(device)
    shifts = torch.randint(0, 9, (n, 2), generator=g).to(device)
    flips = (torch.rand(n, generator=g) < 0.5).to(device)
    size = data.train_x.shape[-1]
    ar = torch.arange(size, device=device)
    share = batch_size // world
    for start in range(0, n - batch_size + 1, batch_size):
        sl = slice(start + rank * share, start + (rank + 1) * share)
        idx = perm[sl]
        x = torch.nn.functional.pad(data.train_x[idx], (4, 4, 4, 4))  # zeros, like RandomCrop(padding=4)
        rows = (shifts[sl, 0, None] + ar)[:, None, :, None]
        cols = shifts[sl, 1, None] + ar
        cols = torch.where(flips[sl, None], cols.flip(1), cols)[:, None, None, :]
        b = torch.arange(share, device=device)[:, None, None, None]
        c = torch.arange(3, device=device)[None, :, None, None]
        yield normalize(x[b, c, rows, cols]), data.train_y[idx]


def steps_per_epoch(data: Data, batch_size: int) -> int:
    return len(data.train_y) // batch_size


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000):
    for start in range(0, len(y), batch_size):
        yield normalize(x[start:start + batch_size]), y[start:start + batch_size]
