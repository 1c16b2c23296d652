"""Image folders too large to hold decoded (--data_loader=stream): DataLoader workers decode
every batch with torchvision, as folder.py decodes the cached set (images.decode).

The epoch's order and augmentation are drawn exactly as the tensor path draws them (from
(seed, state, epoch) only), the workers only decode, and the crop, flip and normalisation
run on the training device with the tensor path's own functions: a streamed run computes
what a tensor run computes, and resumes the same way. Under torchrun every process reads
only its share of each global batch. That is DistributedSampler's job, but DistributedSampler
would shuffle with its own seed and deal the images out rank by rank, so that the global
batch depended on the number of processes; here each process's batches are index lists of
the shared global order.
"""
import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from vitprune.data.core import (EVAL_BATCH, MEAN, STD, augment, epoch_draws, finetune_epoch, finetune_input,
                                global_batches, model_input)
from vitprune.data.images import decode


class FolderImages(Dataset):
    """Image files and labels -> (uint8 [3, size, size], label), decoded on demand."""

    def __init__(self, files: list, labels: list, size: int):
        self.files, self.labels, self.size = files, labels, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return decode(self.files[i], self.size), self.labels[i]
        except Exception as e:  # name the file: the worker's traceback would not
            raise RuntimeError(f"cannot decode {self.files[i]}: {e}") from e


@dataclass
class StreamData:
    """core.LoopData over image files, as core.Data provides it (and `to`, `classes`)."""
    train: FolderImages
    val: FolderImages
    test: FolderImages
    num_classes: int
    img_size: int
    classes: tuple = ()
    workers: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    crop: Optional[tuple] = None  # --aug=finetune (core.Data.crop)
    mean: tuple = MEAN  # the model's preprocessing (core.Data)
    std: tuple = STD
    interpolation: str = "bilinear"
    split_fingerprint: str = ""  # core.Data.split_fingerprint

    @classmethod
    def from_layout(cls, layout, parts: dict, size: int, world: int = 1, fingerprint: str = "") -> "StreamData":
        """parts: split -> (source, indices), as folder.splits gives them; fingerprint: theirs."""
        sets = []
        for split in ("train", "val", "test"):
            source, idx = parts[split]
            files, labels = layout.sources[source]
            sets.append(FolderImages([files[i] for i in idx.tolist()], [labels[i] for i in idx.tolist()], size))
        workers = min(8, max(1, (os.cpu_count() or 1) // world))  # the machine's cores, shared by its processes
        return cls(*sets, len(layout.classes), size, tuple(layout.classes), workers, split_fingerprint=fingerprint)

    def to(self, device) -> "StreamData":
        return replace(self, device=torch.device(device))

    @property
    def train_y(self):
        return torch.tensor(self.train.labels)

    @property
    def val_y(self):
        return torch.tensor(self.val.labels)

    @property
    def test_y(self):
        return torch.tensor(self.test.labels)

    def _load(self, split: str, index_batches: list):
        """(uint8 images, labels) on the device for each list of indices, decoded by the workers."""
        loader = DataLoader(getattr(self, split), batch_sampler=index_batches, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, batch_size, seed, state, epoch, rank=0, world=1, start_step=0):
        """The tensor path's batches (core.Data.train_batches), decoded from the files."""
        if self.crop is not None:
            perm, boxes, flips = finetune_epoch(len(self.train), self.img_size, seed, state, epoch, self.crop)
            slices = list(global_batches(len(self.train), batch_size, rank, world, start_step))
            for sl, (x, y) in zip(slices, self._load("train", [perm[sl].tolist() for sl in slices])):
                yield finetune_input(x, boxes[sl], flips[sl], self), y
            return
        perm, shifts, flips = epoch_draws(len(self.train), self.img_size, seed, state, epoch)
        slices = list(global_batches(len(self.train), batch_size, rank, world, start_step))
        batches = self._load("train", [perm[sl].tolist() for sl in slices])
        for sl, (x, y) in zip(slices, batches):
            yield model_input(augment(x, shifts[sl].to(self.device), flips[sl].to(self.device)), self), y

    def batches(self, split: str, batch_size: int = EVAL_BATCH, rank: int = 0, world: int = 1, index=None):
        """Normalised batches of a split, not augmented (core.Data.batches)."""
        index = (torch.arange(len(getattr(self, split))) if index is None else index.cpu())[rank::world].tolist()
        chunks = [index[i:i + batch_size] for i in range(0, len(index), batch_size)]
        for x, y in self._load(split, chunks):
            yield model_input(x, self), y
