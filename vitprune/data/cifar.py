"""CIFAR-10/100 through torchvision: read from --data_dir (downloaded there when missing), 50k
training images minus --val_size drawn with the seed, 10k test."""
import contextlib
import os
import shutil

import torch
import torchvision

from vitprune.config import Config
from vitprune.errors import ConfigError
from vitprune.data.core import Data
from vitprune.data.split import check_split, seeded_split
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
