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
DECODE_THREADS = min(16, os.cpu_count() or 1)  # decoding releases the GIL: threads, at most 16


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
    except Exception as e:
        raise ConfigError(f"--dataset: cannot decode {path} ({_reason(e)}); remove or replace it") from None


def _reason(e: Exception) -> str:
    """An exception's first line, short; torchvision's without its source location ("decode_image,
    .../decode_image.cpp:61, Unsupported ...")."""
    return re.sub(r"^.*?\.cpp:\d+, ", "", (str(e).strip().splitlines() or [type(e).__name__])[0])[:120]


def decode_all(files: list, size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size], decoded by a thread pool (torchvision's decoders and resize
    release the GIL); ConfigError naming the first file that fails."""
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    pool = ThreadPoolExecutor(DECODE_THREADS)
    try:
        for i, img in enumerate(pool.map(lambda f: _decode_or_fail(f, size), files)):
            out[i] = img
    finally:
        pool.shutdown(cancel_futures=True)
    return out


def _image_error(path: str, max_pixels: int):
    """Why `path` cannot be trained on, found without decoding its pixels; None when it looks
    fine. PIL reads the header (format, size: the pixel limit applies before any decoding) and
    checks the file's structure (PNG: every chunk's checksum, to the end; WebP: the whole
    stream); a JPEG must end in its end-of-image marker, and one that does not (a truncated
    file, or data appended after the image) is decoded to decide."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            fmt, (w, h) = img.format, img.size
            if fmt not in ("JPEG", "PNG", "WEBP"):
                return f"--dataset: cannot decode {path} ({fmt} data, not JPEG, PNG or WebP); remove or replace it"
            if w * h > max_pixels:
                return (f"--max_image_pixels: {path} is {w}x{h} = {w * h:,} pixels, more than {max_pixels:,} (a "
                        f"decompression bomb?); remove it, or raise --max_image_pixels if you trust it")
            if min(w, h) < 1:
                return f"--dataset: cannot decode {path} ({w}x{h} pixels); remove or replace it"
            img.verify()
        if fmt == "JPEG" and not _ends_with_eoi(path):
            decode_image(path, mode=ImageReadMode.RGB)
    except Exception as e:  # PIL.UnidentifiedImageError, a truncated header or file, a bad chunk
        return f"--dataset: cannot decode {path} ({_reason(e)}); remove or replace it"
    return None


def _ends_with_eoi(path: str) -> bool:
    """Whether a JPEG file ends in its end-of-image marker (FF D9), trailing zero padding aside."""
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
        return f.read().rstrip(b"\0").endswith(b"\xff\xd9")


def check_images(files: list, max_pixels: int):
    """ConfigError naming the first file that is not a whole JPEG, PNG or WebP image of at most
    `max_pixels` pixels (_image_error). Run before anything is decoded: the tensor path before
    it decodes the set, the streaming path (which decodes a file only when a batch needs it)
    before training."""
    from PIL import Image
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # max_pixels is the limit, said in one line
    try:
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            for error in pool.map(lambda path: _image_error(path, max_pixels), files):
                if error:
                    raise ConfigError(error)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
