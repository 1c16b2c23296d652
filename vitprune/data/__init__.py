"""A run's data: load_data picks the source (CIFAR, synthetic, image folders) for --dataset.

Layers, each importing only those below it: resize.py (the one resize rule of training and
evaluation), core.py (LoopData, Data, order, augmentation, batching) and split.py (the seeded
validation split); images.py (decoding image files);
the sources cifar.py, synth.py, stream.py and folder.py; this module on top. checks.py
(the data flags against the filesystem) needs no torch, so config validation imports it
before torch loads: this module imports the loaders only when asked for data.
"""
from dataclasses import replace


def load_data(cfg, device="cpu", world: int = 1, preprocessing: dict = None):
    """The data of a run, fed to the model as `preprocessing` says (img_size, mean, std,
    interpolation; default: --img_size and the from-scratch normalisation): a Data (one tensor
    per split on `device`), or for image folders too large to hold a stream.StreamData with the
    same methods. CIFAR-10/100: 50k train minus --val_size drawn with the seed, 10k test; the
    synthetic set: 4,500 minus --val_size, 1,000 test."""
    from vitprune.data.cifar import load_cifar
    from vitprune.data.folder import load_folder
    from vitprune.data.synth import load_synthetic
    if cfg.dataset.startswith("folder:"):
        data = load_folder(cfg, device, world)
    else:
        data = (load_synthetic(cfg) if cfg.dataset == "synthetic" else load_cifar(cfg)).to(device)
    return replace(data, **(preprocessing or {"img_size": cfg.img_size}))
