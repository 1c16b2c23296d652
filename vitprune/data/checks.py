"""The data flags checked against the filesystem before torch loads: --data_dir can hold a
folder, folder:PATH exists, and only image folders stream. (What the files hold is checked
when they are read: folder.scan, images.check_images.)"""
import os

from vitprune.errors import ConfigError
from vitprune.files import check_folder

MAX_IMAGE_PIXELS = 89_478_485  # --max_image_pixels' default: PIL's Image.MAX_IMAGE_PIXELS (a quarter GiB as RGB)


def check_data_flags(dataset: str, data_dir: str, data_loader: str):
    check_folder("data_dir", data_dir, writable=False)
    folder = dataset[len("folder:"):] if dataset.startswith("folder:") else None
    if folder is not None and not os.path.isdir(folder):
        raise ConfigError(f"--dataset: folder {folder!r} does not exist; give folder:PATH with PATH/<class>/* "
                          f"or PATH/train/<class>/* and PATH/val/<class>/* image files")
    if folder is None and data_loader == "stream":
        raise ConfigError(f"--data_loader: stream reads image folders (--dataset=folder:PATH); {dataset} is "
                          f"held in memory: choose auto or tensor")
