"""CIFAR-10/100 through torchvision: read from --data_dir (downloaded there when missing, by one
process while the others wait), 50k training images minus --val_size drawn with the seed, 10k test."""
import os
import shutil
from pathlib import Path

import torch
import torchvision

from vitprune.config import Config
from vitprune.errors import ConfigError
from vitprune.data.core import Data
from vitprune.data.split import check_split, seeded_split
from vitprune.files import exclusive_lock, made_folders
from vitprune.fingerprint import split_fingerprint


def load_cifar(cfg: Config) -> Data:
    """The run's CIFAR splits, on the CPU."""
    train_x, train_y, test_x, test_y, classes = _cifar(cfg.dataset, cfg.data_dir)
    n_val = check_split(len(train_y), cfg.val_size, cfg.batch_size)
    train, val = seeded_split(len(train_y), n_val, cfg.seed)
    return Data(train_x[train], train_y[train], train_x[val], train_y[val], test_x, test_y, classes,
                split_fingerprint=split_fingerprint(val, range(len(test_y))))


def _cifar(name, data_dir):
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    sets = []
    for train in (True, False):
        try:
            ds = cls(data_dir, train=train, download=False)
        except RuntimeError:  # not there (or corrupt, or being downloaded by another process): fetch it
            try:
                ds = _fetched(cls, data_dir, train)
            except Exception as e:
                raise ConfigError(
                    f"--data_dir: {name} is not in {data_dir!r} and could not be downloaded "
                    f"({type(e).__name__}); put torchvision's {name} files there or use --dataset=synthetic"
                ) from None
        sets.append((torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                     torch.tensor(ds.targets, dtype=torch.int64)))
    (train_x, train_y), (test_x, test_y) = sets
    return train_x, train_y, test_x, test_y, 10 if name == "cifar10" else 100


def _fetched(cls, data_dir: str, train: bool):
    """The set, downloaded and extracted under a lock in data_dir: one process fetches it, the
    others wait and then read it. A failed download removes what it created (its archive, its
    extracted folder, and data_dir and parents that this process made) and nothing else: the
    folder may hold other processes' files, created meanwhile."""
    with made_folders(data_dir), exclusive_lock(os.path.join(data_dir, cls.filename + ".lock")):
        try:
            return cls(data_dir, train=train, download=False)  # fetched by another process while we waited
        except RuntimeError:
            pass
        ours = [path for path in (Path(data_dir) / cls.filename, Path(data_dir) / cls.base_folder) if not path.exists()]
        try:
            return cls(data_dir, train=train, download=True)
        except BaseException:
            for path in ours:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            raise
