"""Image files -> uint8 tensors: the one way image folders are decoded, whether once into the
cache (folder.py) or batch by batch in DataLoader workers (stream.py)."""
import os
import re
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from vitprune.errors import ConfigError

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


def _header_error(path: str):
    """Why `path` is not an image torchvision can decode, from its header (PIL reads the
    header and checks the file's structure, e.g. PNG chunk checksums, without decoding
    pixels); None when it looks fine."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            if img.format not in ("JPEG", "PNG", "WEBP"):
                return f"{img.format} data, not JPEG, PNG or WebP"
            if min(img.size) < 1:
                return f"{img.size[0]}x{img.size[1]} pixels"
            img.verify()
    except Exception as e:  # PIL.UnidentifiedImageError, truncated header, bad chunk
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    return None


def check_headers(files: list):
    """ConfigError naming the first file whose header is not a decodable image: the streaming
    path decodes a file only when a batch needs it, so it checks every file before training."""
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for path, error in zip(files, pool.map(_header_error, files)):
            if error:
                raise ConfigError(f"--dataset: cannot decode {path} ({error}); remove or replace it")
