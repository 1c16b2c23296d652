"""`bench images`: what checking an image folder before training costs, beside decoding it.

A streamed run decodes a file only when a batch needs it, so it checks every file first
(images.check_images: the header, the pixel limit, the file's structure and end); the tensor
path decodes the whole set once (images.decode_all). This times the two on one folder, side by
side: a folder you give, or one generated here (half JPEG, half PNG).
"""
import datetime
import os
import tempfile

import numpy as np
import torch

from vitprune import fmt
from vitprune.bench.timing import device_name, time_side_by_side
from vitprune.data.checks import MAX_IMAGE_PIXELS
from vitprune.data.images import DECODE_THREADS, EXTENSIONS, check_images, decode_all


def bench_images(folder=None, n=10000, width=160, height=120, img_size=32, iters=3, warmup=1):
    """Time the pre-training check of every image (check_images) against a full decode pass
    (decode_all at img_size) on `folder`'s images, or, without a folder, on `n` generated
    images of width × height (half JPEG at quality 90, half PNG). Prints a Markdown table
    (median of `iters` passes after `warmup`, the two alternating; both use the same thread
    pool) with the device and the date; returns the numbers as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            folder = os.path.join(tmp, "images")
            _generate(folder, n, width, height)
            what = f"{n:,} generated images of {width}×{height} (half JPEG at quality 90, half PNG)"
        else:
            what = str(folder)
        files = sorted(os.path.join(here, name) for here, _, names in os.walk(folder, followlinks=True)
                       for name in names if name.lower().endswith(EXTENSIONS))
        size = sum(os.path.getsize(f) for f in files)
        fns = {"check": lambda: check_images(files, MAX_IMAGE_PIXELS), "decode": lambda: decode_all(files, img_size)}
        times = time_side_by_side(fns, warmup, iters, torch.device("cpu"))
    result = {"folder": what, "images": len(files), "bytes": size, "device": _cpu(), "date": str(datetime.date.today()),
              "img_size": img_size, "seconds": times}
    print(_table(result, iters))
    return result


def _generate(folder: str, n: int, width: int, height: int):
    """n images of smooth colour gradients under mild noise (they compress as photos do)."""
    from PIL import Image
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0, 1, height)[:, None, None]
    for i in range(n):
        base = rng.uniform(0, 255, 3) * (1 - ramp) + rng.uniform(0, 255, 3) * ramp
        img = Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
        if i % 2:
            img.save(os.path.join(folder, f"img_{i:05d}.png"))
        else:
            img.save(os.path.join(folder, f"img_{i:05d}.jpg"), quality=90)


def _cpu() -> str:
    """The CPU and the threads both passes use (their pool: data.images.DECODE_THREADS)."""
    threads = DECODE_THREADS
    return device_name(torch.device("cpu")).split(", ")[0] + f", {threads} decoding thread{'s' * (threads > 1)}"


def _table(r: dict, iters: int) -> str:
    n, check, decode = r["images"], r["seconds"]["check"], r["seconds"]["decode"]
    return "\n".join([
        f"# vitprune image check benchmark — {r['device']} — {r['date']}", "",
        f"{r['folder']}: {n:,} files, {fmt.size(r['bytes'])}. Median of {iters} passes after warm-up, the two "
        f"alternating (files in the page cache).", "",
        "| pass | seconds | µs per image | / decode |", "|---|---|---|---|",
        f"| check (header, pixel limit, structure, JPEG end marker) | {check:.2f} | {check / n * 1e6:.0f} | "
        f"{fmt.ratio(check, decode)} |",
        f"| full decode at {r['img_size']} px (what the tensor path caches) | {decode:.2f} | "
        f"{decode / n * 1e6:.0f} | {fmt.ratio(decode, decode)} |"])
