"""Datasets as uint8 tensors on the training device, and batched augmentation.

A whole dataset is one [N, 3, S, S] uint8 tensor (CIFAR and synthetic: S = 32; image
folders: decoded once at --img_size, see folder.py); an epoch is a seeded permutation, and
augmentation (random crop with zero padding of S/8 pixels, 4 at 32, and a horizontal flip)
is a few tensor ops per batch, followed by a resize on the device when the model wants
another size than S. The order and the augmentation of every batch depend only on (seed,
state, epoch), so a run is reproducible and resumes at any epoch, or at any step of one.
"""
import contextlib
import math
import os
import shutil
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from vitprune.config import Config, ConfigError, val_count

MEAN, STD = 0.5, 0.5  # the normalisation of timm's augreg ViTs; fine from scratch too
EVAL_BATCH = 1000
SYNTHETIC_SIZES = (4050, 450, 1000)  # train, val (10% of the 4,500-image pool), test


@dataclass
class Data:
    train_x: torch.Tensor  # uint8 [N, 3, S, S]
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    img_size: int = 32     # the side the model sees; batches are resized to it when S differs
    classes: tuple = ()    # class names, by label (image folders)

    def to(self, device) -> "Data":
        return Data(*(t.to(device) for t in (self.train_x, self.train_y, self.val_x, self.val_y,
                                             self.test_x, self.test_y)), self.num_classes, self.img_size,
                    self.classes)

    def train_batches(self, batch_size, seed, state, epoch, rank=0, world=1, start_step=0):
        """The epoch's augmented, normalised training batches from `start_step` on (see train_batches)."""
        device = self.train_x.device
        perm, shifts, flips = (t.to(device) for t in epoch_draws(len(self.train_y), self.train_x.shape[-1],
                                                                 seed, state, epoch))
        for sl in global_batches(len(self.train_y), batch_size, rank, world, start_step):
            idx = perm[sl]
            yield model_input(augment(self.train_x[idx], shifts[sl], flips[sl]), self.img_size), self.train_y[idx]

    def batches(self, split: str, batch_size: int = EVAL_BATCH, rank: int = 0, world: int = 1, index=None):
        """Normalised batches of a split, not augmented: this process's share (every world-th
        image), or the images `index` (calibration batches)."""
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        if index is not None:
            x, y = x[index.to(x.device)], y[index.to(y.device)]
        return eval_batches(x[rank::world], y[rank::world], batch_size, self.img_size)


def load_data(cfg: Config, device="cpu", world: int = 1):
    """The data of a run: a Data (one tensor per split), or for image folders too large to
    hold a stream.StreamData with the same methods. CIFAR-10/100 (50k train minus --val_size
    drawn with the seed / 10k test) and the synthetic set (4,500 minus --val_size / 1,000)."""
    if cfg.dataset.startswith("folder:"):
        from vitprune.folder import load_folder
        return load_folder(cfg, device, world)
    if cfg.dataset == "synthetic":
        pool, test = SYNTHETIC_SIZES[0] + SYNTHETIC_SIZES[1], SYNTHETIC_SIZES[2]
        n_val = check_split(pool, cfg.val_size, cfg.batch_size)
        d = synthetic(cfg.seed, sizes=(pool - n_val, n_val, test))
    else:
        train_x, train_y, test_x, test_y, classes = _cifar(cfg.dataset, cfg.data_dir)
        n_val = check_split(len(train_y), cfg.val_size, cfg.batch_size)
        train, val = seeded_split(len(train_y), n_val, cfg.seed)
        d = Data(train_x[train], train_y[train], train_x[val], train_y[val], test_x, test_y, classes)
    d.img_size = cfg.img_size
    return d.to(device)


def check_split(pool: int, val_size: float, batch_size: int, carved: int = 1) -> int:
    """Validation images taken out of `pool` training images (`carved` such splits: a single
    image folder gives a test split of the same size); raises ConfigError naming --val_size
    when the validation set would be empty or less than one batch would be left to train on."""
    n_val = val_count(val_size, pool)
    given = f"{val_size:g}" if val_size >= 1 else f"{val_size:g} ({n_val} images)"
    each = " per split (val and test)" if carved > 1 else ""
    left = pool - carved * n_val
    if n_val < 1:
        raise ConfigError(f"--val_size: {given} of the {pool} training images leaves the validation set empty; "
                          f"give a larger fraction or a count")
    if left <= 0:
        raise ConfigError(f"--val_size: {given}{each} out of {pool} training images leaves none to train on; "
                          f"give a count below {(pool - 1) // carved} or a fraction such as 0.1")
    if left < batch_size:
        raise ConfigError(f"--val_size: {given}{each} out of {pool} training images leaves {left} to train on, "
                          f"fewer than one batch (--batch_size={batch_size}); lower --val_size or --batch_size")
    return n_val


def seeded_split(pool: int, n_val: int, seed: int):
    """(train, val) indices: the first n_val of a permutation drawn with the seed are val."""
    perm = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def _cifar(name, data_dir):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    sets = []
    for train in (True, False):
        try:
            ds = cls(data_dir, train=train, download=False)
        except RuntimeError:  # not there (or corrupt): try to fetch it
            try:
                with _removed_on_failure(data_dir):
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


@contextlib.contextmanager
def _removed_on_failure(folder: str):
    """What a failed download creates (the folder itself, its parents, partial files) is removed
    again: bad input leaves nothing on disk."""
    top = os.path.abspath(folder)
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    existed = os.path.exists(top)
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(top, ignore_errors=True)
        elif os.path.isdir(folder):
            for entry in set(os.listdir(folder)) - before:
                path = os.path.join(folder, entry)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        raise


def synthetic(seed: int, sizes=SYNTHETIC_SIZES, num_classes: int = 10) -> Data:
    """A generated, learnable 32x32 RGB set of 10 classes: each class has its own pattern
    (horizontal, vertical or diagonal stripes, checkerboard, rings; random frequency and
    phase) and its own foreground hue (jittered, so neighbouring hues overlap), with
    Gaussian noise on top. The images are fixed (generator seed 0, for a given total size);
    only the val split uses `seed`.
    """
    n_train, n_val, n_test = sizes
    g = torch.Generator().manual_seed(0)
    x, y = _synthetic_images(n_train + n_val + n_test, num_classes, g)
    pool = n_train + n_val
    train, val = seeded_split(pool, n_val, seed)
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


def model_input(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 images -> what the model takes: normalised, and resized to img_size (bilinear,
    antialiased, as torchvision resizes) when stored at another size (CIFAR for a 224-px ViT):
    the set stays small in memory whatever --img_size is."""
    x = normalize(x)
    if x.shape[-1] != img_size:
        x = TF.resize(x, [img_size, img_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return x


def epoch_generator(seed: int, state: int, epoch: int) -> torch.Generator:
    # One independent stream per (seed, state, epoch): resuming at any epoch replays it.
    return torch.Generator().manual_seed(((seed * 1009 + state) * 100003 + epoch) % (2 ** 63))


def epoch_draws(n: int, size: int, seed: int, state: int, epoch: int):
    """The epoch's order and augmentation of n images of side `size`, all drawn at once from
    its own stream: (permutation, crop offsets [n, 2] in [0, 2·pad], flips [n])."""
    g = epoch_generator(seed, state, epoch)
    pad = size // 8
    return (torch.randperm(n, generator=g), torch.randint(0, 2 * pad + 1, (n, 2), generator=g),
            torch.rand(n, generator=g) < 0.5)


def global_batches(n: int, batch_size: int, rank: int = 0, world: int = 1, start_step: int = 0):
    """Slices of the epoch order: this process's 1/world share of every full global batch,
    from step `start_step` on (the last incomplete batch is dropped)."""
    share = batch_size // world
    for start in range(start_step * batch_size, n - batch_size + 1, batch_size):
        yield slice(start + rank * share, start + (rank + 1) * share)


def augment(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Random crop of the zero-padded images (like RandomCrop(S, padding=S/8)) at `shifts`,
    then a horizontal flip where `flips`: uint8 [B, 3, S, S] in and out, one gather."""
    size, pad = x.shape[-1], x.shape[-1] // 8
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ar = torch.arange(size, device=x.device)
    rows = (shifts[:, 0, None] + ar)[:, None, :, None]
    cols = shifts[:, 1, None] + ar
    cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, None, :]
    b = torch.arange(len(x), device=x.device)[:, None, None, None]
    c = torch.arange(3, device=x.device)[None, :, None, None]
    return x[b, c, rows, cols]


def train_batches(data, batch_size: int, seed: int, state: int, epoch: int, rank: int = 0, world: int = 1,
                  start_step: int = 0):
    """Yield augmented, normalised training batches (x float [B, 3, img_size, img_size], y) of
    one epoch, from step `start_step` on: exactly the batches an uninterrupted epoch yields there.

    The last incomplete batch is dropped so every step has the same shape. With `world`
    processes (DDP), every process draws the same global batch and takes its 1/world share,
    so the global batch, and the run, do not depend on the number of processes.
    """
    return data.train_batches(batch_size, seed, state, epoch, rank, world, start_step)


def steps_per_epoch(data, batch_size: int) -> int:
    return len(data.train_y) // batch_size


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH, img_size: int = None):
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size]
        yield model_input(xb, img_size or xb.shape[-1]), y[start:start + batch_size]
