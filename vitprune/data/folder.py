"""Your own images (--dataset=folder:PATH): torchvision's ImageFolder layout, decoded once.

    PATH/train/<class>/*  PATH/val/<class>/*  PATH/test/<class>/*   the three splits as given
    PATH/train/<class>/*  PATH/val/<class>/* (or PATH/test/...)     val carved from train; test: that folder
    PATH/<class>/*                                                  val and test carved, --val_size each

Carving uses --val_size and the seed, as for CIFAR. Every image is decoded with torchvision
(RGB: grayscale repeated, alpha dropped), its shorter side resized to --img_size
(antialiased) and centre-cropped to a square: once. The uint8 result is cached in
--data_dir/decoded/, keyed by the folder, the size and the file list (names, byte sizes,
modification times), written by one process while runs that need it meanwhile wait (a lock
beside it), and then goes through the same device-resident tensor pipeline as CIFAR. Every
file is checked before anything is decoded (images.check_images: header, pixel limit,
structure). A set whose decoded size exceeds the memory budget streams instead (stream.py);
images.py decodes.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vitprune import fmt
from vitprune.config import Config
from vitprune.errors import ConfigError
from vitprune.data.core import Data
from vitprune.data.checks import MAX_IMAGE_PIXELS
from vitprune.data.images import EXTENSIONS, check_images, decode_all
from vitprune.data.split import check_split, seeded_split
from vitprune.data.stream import StreamData
from vitprune.files import Lock, Locked, made_folders, write_atomic
from vitprune.fingerprint import split_fingerprint

MEMORY_FRACTION = 0.5  # of the available RAM (shared by this machine's processes) and of a GPU's free memory
BUDGET_ENV = "VITPRUNE_DATA_BUDGET"  # bytes: overrides the rule above


@dataclass
class Layout:
    """What is on disk: the class names and, per source folder (train, val, test, or the
    single pool 'all'), its image files and labels in ImageFolder's order."""
    root: str
    classes: list
    sources: dict  # name -> (files, labels)

    @property
    def images(self) -> int:
        return sum(len(files) for files, _ in self.sources.values())


def scan(root: str) -> Layout:
    """The image files of an ImageFolder tree; ConfigError (naming --dataset) when it holds
    fewer than two classes, a class without images, classes that only val/test have, or a
    link to nothing. Linked folders are followed (datasets often live behind links), each real
    folder once: a link to a folder counted already (a cycle, another class's folder) or to
    one that holds class folders (up the tree) is skipped, so every image counts once, under
    its own class."""
    split = os.path.isdir(os.path.join(root, "train"))
    train_dir = os.path.join(root, "train") if split else root
    classes = _class_dirs(train_dir)
    if len(classes) < 2:
        raise ConfigError(f"--dataset: {train_dir} holds {len(classes)} class folder{'s' * (len(classes) != 1)} "
                          f"({', '.join(classes) or 'none'}); a classifier needs {train_dir}/<class>/* image files "
                          f"for at least 2 classes")
    folders = {"train" if split else "all": train_dir}
    for name in ("val", "test") if split else ():
        folder = os.path.join(root, name)
        if os.path.isdir(folder):
            extra = sorted(set(_class_dirs(folder)) - set(classes))
            if extra:
                raise ConfigError(f"--dataset: {folder} has classes that {train_dir} lacks: {', '.join(extra[:4])}")
            folders[name] = folder
    tops = {name: [(label, os.path.join(folder, c)) for label, c in enumerate(classes)
                   if os.path.isdir(os.path.join(folder, c))] for name, folder in folders.items()}
    class_dirs = {os.path.realpath(top) for pairs in tops.values() for _, top in pairs}
    seen, skipped = set(class_dirs), []
    sources = {name: _images(folders[name], tops[name], len(classes), class_dirs, seen, skipped,
                             every_class=name in ("train", "all")) for name in folders}
    if skipped:
        say(f"--dataset: {len(skipped)} linked folder{'s' * (len(skipped) > 1)} not followed: {skipped[0]} leads "
            f"to a folder counted already or up the tree")
    return Layout(root, classes, sources)


def _class_dirs(folder: str) -> list:
    """ImageFolder's classes: the sorted sub-folders (linked ones too); ConfigError for a link to nothing."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:  # none
        return []
    for entry in entries:
        _check_link(entry.path)
    return sorted(entry.name for entry in entries if entry.is_dir())


def _check_link(path: str):
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError(f"--dataset: {path} is a link to {os.readlink(path)}, which does not exist; remove the "
                          f"link or restore what it points to")


def _images(folder: str, tops: list, n_classes: int, class_dirs: set, seen: set, skipped: list, every_class: bool):
    """(files, labels) under folder/<class>/, in ImageFolder's order (tops: (label, class folder))."""
    samples = [(path, label) for label, top in tops for path in _walk(top, class_dirs, seen, skipped)]
    if not samples:
        raise ConfigError(f"--dataset: no images ({', '.join(EXTENSIONS)}) in the class folders of {folder}")
    empty = [top for label, top in tops if label not in {label for _, label in samples}]
    if every_class and empty:
        raise ConfigError(f"--dataset: class folder {empty[0]} holds no images ({', '.join(EXTENSIONS)})")
    return [path for path, _ in samples], [label for _, label in samples]


def _walk(top: str, class_dirs: set, seen: set, skipped: list) -> list:
    """The image files under `top`, sorted as ImageFolder sorts them (by folder, then name),
    following each linked folder whose real path is not in `seen` and holds no class folder;
    `seen` and `skipped` grow."""
    found = []
    for here, dirs, names in os.walk(top, followlinks=True):
        follow = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(here, d))
            if real in seen or any(c.startswith(real + os.sep) for c in class_dirs):
                skipped.append(os.path.join(here, d))
            else:
                seen.add(real)
                follow.append(d)
        dirs[:] = follow  # os.walk descends only into these
        for name in names:
            _check_link(os.path.join(here, name))
            if name.lower().endswith(EXTENSIONS):
                found.append((here, name))
    return [os.path.join(here, name) for here, name in sorted(found)]


def splits(layout: Layout, cfg: Config) -> dict:
    """split -> (source, indices into it): the folders as given, the rest carved with the seed
    (see the module's table). Raises ConfigError for a split that does not fit (--val_size,
    --batch_size) before anything is decoded."""
    s = layout.sources
    n = {name: len(files) for name, (files, _) in s.items()}
    if "val" in s and "test" in s:
        if n["train"] < cfg.batch_size:
            raise ConfigError(f"--batch_size: {cfg.batch_size} is larger than the training set "
                              f"({n['train']} images in {layout.root}/train)")
        return {split: (split, torch.arange(n[split])) for split in ("train", "val", "test")}
    pool = "train" if "train" in s else "all"
    given = next((name for name in ("test", "val") if name in s), None)  # the held-out folder, if any
    carved = 1 if given else 2  # a single folder gives its test split too
    n_val = check_split(n[pool], cfg.val_size, cfg.batch_size, carved)
    train, held = seeded_split(n[pool], carved * n_val, cfg.seed)
    test = (given, torch.arange(n[given])) if given else (pool, held[n_val:])
    return {"train": (pool, train), "val": (pool, held[:n_val]), "test": test}


def fingerprint(layout: Layout, parts: dict) -> str:
    """split_fingerprint of the val and test images: their paths relative to the folder."""
    paths = [[os.path.relpath(layout.sources[source][0][i], layout.root) for i in idx.tolist()]
             for source, idx in (parts["val"], parts["test"])]
    return split_fingerprint(*paths)


def cache_file(layout: Layout, size: int, data_dir: str) -> Path:
    """--data_dir/decoded/NAME_SIZEpx_KEY.pt, KEY a hash of the folder, the size and the file
    list with byte sizes and modification times: a changed, added or removed file re-decodes."""
    listing = []
    for name, (files, labels) in layout.sources.items():
        for f, label in zip(files, labels):
            st = os.stat(f)
            listing.append((name, os.path.relpath(f, layout.root), label, st.st_size, st.st_mtime_ns))
    key = json.dumps([os.path.abspath(layout.root), size, layout.classes, listing])
    name = os.path.basename(os.path.normpath(layout.root))
    return Path(data_dir) / "decoded" / f"{name}_{size}px_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def decoded(layout: Layout, size: int, data_dir: str, max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """source -> uint8 images: read from the cache, or decoded and cached. One process decodes
    and writes the cache while the others wait, then read it: under torchrun the first process,
    and across runs sharing --data_dir the holder of the cache's lock."""
    path, fresh = cache_file(layout, size, data_dir), None
    if (not dist.is_initialized() or dist.get_rank() == 0) and not path.is_file():
        fresh = _decode_once(layout, size, path, max_pixels)
    if dist.is_initialized():
        dist.barrier()  # the cache is written before any other process reads it
    if fresh is not None:
        return fresh
    say(f"read {layout.images} decoded images at {size} px from {path}")
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _decode_once(layout: Layout, size: int, path: Path, max_pixels: int):
    """Decode the folder and write its cache under the cache's lock; None when another process
    wrote it while this one waited for the lock."""
    check_images([f for files, _ in layout.sources.values() for f in files], max_pixels)  # before decoding
    with made_folders(path.parent):
        lock = Lock(path.with_name(path.name + ".lock"))
        try:
            lock.acquire(blocking=False)
        except Locked as holder:
            say(f"waiting for the process that decodes {layout.root} into {path} ({holder})")
            lock.acquire()
        try:
            if path.is_file():  # written while we waited
                return None
            t0 = time.time()
            fresh = {name: decode_all(files, size) for name, (files, _) in layout.sources.items()}
            write_atomic(path, lambda f: torch.save(fresh, f))
        finally:
            lock.release()
    say(f"decoded {layout.images} images at {size} px in {time.time() - t0:.1f}s; cached in {path}")
    return fresh


def memory_budget(device: torch.device) -> tuple:
    """(bytes the decoded set may take on the training device, how that was decided)."""
    if os.environ.get(BUDGET_ENV):
        return float(os.environ[BUDGET_ENV]), BUDGET_ENV
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    budget, rule = MEMORY_FRACTION * _available_ram() / processes, "half the available RAM"
    if processes > 1:
        rule += f" shared by {processes} processes"
    if device.type == "cuda":
        gpu = MEMORY_FRACTION * torch.cuda.mem_get_info(device)[0]
        if gpu < budget:
            budget, rule = gpu, f"half the free memory of {device}"
    return budget, rule


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def say(message: str):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def load_folder(cfg: Config, device, world: int = 1):
    """The run's data from folder:PATH: a Data on the device when the decoded set fits the
    memory budget (or --data_loader=tensor), else a stream.StreamData."""
    root = cfg.dataset[len("folder:"):]
    layout = scan(root)
    parts = splits(layout, cfg)
    device = torch.device(device)
    size = layout.images * 3 * cfg.img_size ** 2
    budget, rule = memory_budget(device)
    if cfg.data_loader == "tensor" and size > budget:
        raise ConfigError(f"--data_loader: {layout.images} images at {cfg.img_size} px take {fmt.size(size)} decoded, "
                          f"more than the memory budget of {fmt.size(budget)} ({rule}); use --data_loader=stream")
    shared = [source for source, _ in parts.values()]  # a source that several splits share is split with the seed
    say(f"--dataset {cfg.dataset}: {len(layout.classes)} classes; " + ", ".join(
        f"{len(idx)} {split} images ({'seeded from ' if shared.count(source) > 1 else ''}{_folder_name(source)})"
        for split, (source, idx) in parts.items()))
    if cfg.data_loader == "stream" or size > budget:
        if cfg.data_loader == "auto":
            say(f"streaming: {fmt.size(size)} decoded would exceed the memory budget of {fmt.size(budget)} ({rule})")
        check_images([f for files, _ in layout.sources.values() for f in files], cfg.max_image_pixels)
        return StreamData.from_layout(layout, parts, cfg.img_size, world, fingerprint(layout, parts)).to(device)
    images = decoded(layout, cfg.img_size, cfg.data_dir, cfg.max_image_pixels)
    tensors = []
    for split in ("train", "val", "test"):
        source, idx = parts[split]
        tensors += [images[source][idx], torch.tensor(layout.sources[source][1])[idx]]
    return Data(*tensors, len(layout.classes), cfg.img_size, tuple(layout.classes),
                split_fingerprint=fingerprint(layout, parts)).to(device)


def _folder_name(source: str) -> str:
    return "PATH" if source == "all" else f"PATH/{source}"

