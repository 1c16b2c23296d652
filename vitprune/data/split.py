"""The validation split: --val_size as a number of images, checked against the pool, and the
seeded draw of which images it takes (CIFAR, the synthetic set and image folders alike)."""
import torch

from vitprune.errors import ConfigError


def val_count(val_size: float, pool: int) -> int:
    """--val_size as images out of `pool`: below 1 a fraction (rounded), else a count."""
    return round(val_size * pool) if val_size < 1 else int(val_size)


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
