"""Image files -> uint8 tensors: the one way image folders are decoded, whether once into the
cache (folder.py) or batch by batch in DataLoader workers (stream.py)."""
import os
import re
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from vitprune.config import ConfigError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # what torchvision.io decodes (PIL-only formats are skipped)


def decode(path: str, size: int) -> torch.Tensor:
    """One image file -> uint8 [3, size, size]: RGB, EXIF orientation applied, the shorter
    side resized to `size` (bilinear, antialiased), the centre square kept."""
    img = decode_image(path, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = TF.to_dtype(img, torch.uint8, scale=True)
    return TF.center_crop(TF.resize(img, [size], antialias=True), [size, size])


def _decode_or_fail(path: str, size: int) -> torch.Tensor:
    try:
        return decode(path, size)
    except Exception as e:  # torchvision says "decode_image, .../decode_image.cpp:61, Unsupported ..."
        reason = re.sub(r"^.*?\.cpp:\d+, ", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise ConfigError(f"--dataset: cannot decode {path} ({reason[:120]})") from None


def decode_all(files: list, size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size], decoded by a thread pool (torchvision's decoders and resize
    release the GIL); ConfigError naming the first file that fails."""
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1))
    try:
        for i, img in enumerate(pool.map(lambda f: _decode_or_fail(f, size), files)):
            out[i] = img
    finally:
        pool.shutdown(cancel_futures=True)
    return out
