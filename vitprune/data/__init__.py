"""A run's data: load_data picks the source (CIFAR, synthetic, image folders) for --dataset.

Layers, each importing only those below it: core.py (LoopData, Data, order, augmentation,
batching) and split.py (the seeded validation split); images.py (decoding image files);
the sources cifar.py, synth.py, stream.py and folder.py; this module on top.
"""
from vitprune.config import Config
from vitprune.data.cifar import load_cifar
from vitprune.data.core import Data, LoopData, normalize, steps_per_epoch, train_batches
from vitprune.data.folder import load_folder
from vitprune.data.stream import StreamData
from vitprune.data.synth import load_synthetic, synthetic

__all__ = ["Data", "LoopData", "StreamData", "load_data", "normalize", "steps_per_epoch", "synthetic",
           "train_batches"]


def load_data(cfg: Config, device="cpu", world: int = 1) -> LoopData:
    """The data of a run: a Data (one tensor per split), or for image folders too large to
    hold a stream.StreamData with the same methods. CIFAR-10/100 (50k train minus --val_size
    drawn with the seed / 10k test) and the synthetic set (4,500 minus --val_size / 1,000)."""
    if cfg.dataset.startswith("folder:"):
        return load_folder(cfg, device, world)
    d = load_synthetic(cfg) if cfg.dataset == "synthetic" else load_cifar(cfg)
    d.img_size = cfg.img_size
    return d.to(device)
