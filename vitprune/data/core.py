"""The in-memory core: what the loop needs from any data (LoopData), a dataset as uint8 tensors
on the training device (Data), and the seeded order, augmentation and batching of both paths.

A whole dataset is one [N, 3, S, S] uint8 tensor (CIFAR and synthetic: S = 32; image
folders: decoded once at --img_size, see folder.py); an epoch is a seeded permutation, and
augmentation (random crop with zero padding of S/8 pixels, 4 at 32, and a horizontal flip)
is a few tensor ops per batch, followed by a resize on the device when the model wants
another size than S (resize.py: the rule of training crops and evaluation alike). The order
and the augmentation of every batch depend only on (seed, state, epoch), so a run is
reproducible and resumes at any epoch, or at any step of one.
"""
import functools
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Protocol, runtime_checkable

import torch

from vitprune.data.augment import finetune_draws, resized_crop
from vitprune.data.resize import resize_whole

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # timm's augreg ViTs; from scratch too (else the weights' own)
EVAL_BATCH = 1000


@runtime_checkable
class LoopData(Protocol):
    """What the training loop, evaluation and calibration read from a run's data: Data (tensors on
    the device) and stream.StreamData (image files decoded by DataLoader workers) both provide it."""
    num_classes: int
    train_y: torch.Tensor  # int64 labels of a split: its size, and the calibration draw
    val_y: torch.Tensor
    test_y: torch.Tensor

    def train_batches(self, batch_size: int, seed: int, state: int, epoch: int, rank: int = 0, world: int = 1,
                      start_step: int = 0) -> Iterator[tuple]:
        """One epoch's augmented, normalised (x, y) batches from `start_step` on."""

    def batches(self, split: str, batch_size: int = EVAL_BATCH, rank: int = 0, world: int = 1,
                index=None) -> Iterator[tuple]:
        """A split's normalised (x, y) batches, not augmented: this process's share, or the images `index`."""


@dataclass
class Data:
    """LoopData held as uint8 tensors, one (images, labels) pair per split, on one device."""
    train_x: torch.Tensor  # uint8 [N, 3, S, S]
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    img_size: int = 32     # the side the model sees; batches are resized to it when S differs
    classes: tuple = ()    # class names, by label (image folders)
    crop: Optional[tuple] = None  # --aug=finetune: ((scale min, max), (ratio min, max)) of the resized crop
    mean: tuple = MEAN     # normalisation and resize of model_input: the model's preprocessing
    std: tuple = STD
    interpolation: str = "bilinear"
    split_fingerprint: str = ""  # fingerprint.split_fingerprint of the val and test images

    def to(self, device) -> "Data":
        return replace(self, **{k: getattr(self, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y",
                                                                          "test_x", "test_y")})

    def train_batches(self, batch_size, seed, state, epoch, rank=0, world=1, start_step=0):
        """The epoch's augmented, normalised training batches from `start_step` on (see train_batches)."""
        device = self.train_x.device
        if self.crop is not None:
            perm, boxes, flips = (t.to(device) for t in finetune_epoch(len(self.train_y), self.train_x.shape[-1],
                                                                       seed, state, epoch, self.crop))
            for sl in global_batches(len(self.train_y), batch_size, rank, world, start_step):
                idx = perm[sl]
                yield finetune_input(self.train_x[idx], boxes[sl], flips[sl], self), self.train_y[idx]
            return
        perm, shifts, flips = (t.to(device) for t in epoch_draws(len(self.train_y), self.train_x.shape[-1],
                                                                 seed, state, epoch))
        for sl in global_batches(len(self.train_y), batch_size, rank, world, start_step):
            idx = perm[sl]
            yield model_input(augment(self.train_x[idx], shifts[sl], flips[sl]), self), self.train_y[idx]

    def batches(self, split: str, batch_size: int = EVAL_BATCH, rank: int = 0, world: int = 1, index=None):
        """Normalised batches of a split, not augmented: this process's share (every world-th
        image), or the images `index` (calibration batches)."""
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        if index is not None:
            x, y = x[index.to(x.device)], y[index.to(y.device)]
        return eval_batches(x[rank::world], y[rank::world], batch_size, self)


def normalize(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """Images in 0..255 (uint8, or float after a resize) -> float, (x/255 - mean) / std per channel."""
    # One multiply-add pass over the batch (x · 1/(255 std) − mean/std), not three: at 224 px
    # on a CPU this is a memory-bound pass over the whole batch.
    shift, scale = _affine(tuple(mean), tuple(std), x.device)
    return torch.addcmul(shift, x.float(), scale)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple, std: tuple, device: torch.device):
    """normalize's constants, made once per preprocessing and device rather than per batch."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(-1, 1, 1) for v in (mean, std))
    return (-mean / std).float().to(device), (1 / (255 * std)).float().to(device)


def model_input(x: torch.Tensor, prep) -> torch.Tensor:
    """uint8 images -> what the model takes: resized to prep.img_size when stored at another size
    (CIFAR for a 224-px ViT: the set stays small in memory whatever --img_size is) by resize.py's
    rule, with prep.interpolation, as training crops are; normalised with prep.mean/std."""
    if x.shape[-1] != prep.img_size:
        x = resize_whole(x, prep.img_size, prep.interpolation)
    return normalize(x, prep.mean, prep.std)


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


def finetune_epoch(n: int, size: int, seed: int, state: int, epoch: int, crop: tuple):
    """The epoch's order and --aug=finetune draws (permutation, crop boxes [n, 4], flips [n]),
    from its own stream as epoch_draws."""
    g = epoch_generator(seed, state, epoch)
    return (torch.randperm(n, generator=g), *finetune_draws(n, size, g, *crop))


def finetune_input(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, prep) -> torch.Tensor:
    """uint8 images -> random-resized crops at prep.img_size, flipped where `flips`, normalised
    with prep.mean/std (the model's preprocessing, as model_input)."""
    return normalize(resized_crop(x, boxes, flips, prep.img_size, prep.interpolation), prep.mean, prep.std)


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


def train_batches(data: LoopData, batch_size: int, seed: int, state: int, epoch: int, rank: int = 0,
                  world: int = 1, start_step: int = 0):
    """Yield augmented, normalised training batches (x float [B, 3, img_size, img_size], y) of
    one epoch, from step `start_step` on: exactly the batches an uninterrupted epoch yields there.

    The last incomplete batch is dropped so every step has the same shape. With `world`
    processes (DDP), every process draws the same global batch and takes its 1/world share,
    so the global batch, and the run, do not depend on the number of processes.
    """
    return data.train_batches(batch_size, seed, state, epoch, rank, world, start_step)


def steps_per_epoch(data: LoopData, batch_size: int) -> int:
    return len(data.train_y) // batch_size


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, prep):
    """Batches of x, y as the model takes them (model_input with `prep`'s preprocessing)."""
    for start in range(0, len(y), batch_size):
        yield model_input(x[start:start + batch_size], prep), y[start:start + batch_size]
