"""Benchmarks, each timing its paths side by side in one process: `python -m vitprune bench
kernels|train|export|images`.

kernels.py times the Triton kernels against the PyTorch paths they replace; train.py a dense
training step against a pruned one and its compacted twin, and the tensor loader against a
DataLoader; export.py the dense model against the physically compacted export of a checkpoint;
images.py the check of an image folder before training against decoding it.
timing.py holds the helpers they share (side-by-side medians, peak memory, the device's name).
"""
from vitprune.bench.export import bench_export
from vitprune.bench.images import bench_images
from vitprune.bench.kernels import bench_kernels
from vitprune.bench.train import bench_train

__all__ = ["bench_kernels", "bench_train", "bench_export", "bench_images"]
