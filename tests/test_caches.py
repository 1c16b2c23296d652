"""Shared caches in --data_dir: an image folder's decode cache and CIFAR's download are built by
one process under a lock while the others wait and then read them; a failed download removes
only what it created."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torchvision

from conftest import class_folders
from vitprune.data import cifar
from vitprune.errors import ConfigError


def write_tree(root):
    return class_folders(root)


# One process of the race: waits at a start line until both are ready, then asks for the decoded
# folder. A pause before the cache's rename holds the writer back, so that without a lock the
# other process finds no cache and decodes too.
DECODE = r"""
import hashlib, os, sys, time
from pathlib import Path
from vitprune.data import folder
root, data_dir, start = sys.argv[1], sys.argv[2], Path(sys.argv[3])
real_replace = os.replace
def paused_replace(src, dst):  # os.replace is what files.write_atomic renames with
    if Path(dst).parent.name == "decoded":
        time.sleep(1.0)
    real_replace(src, dst)
os.replace = paused_replace
(start / f"ready.{os.getpid()}").touch()
deadline = time.time() + 120
while len(list(start.glob("ready.*"))) < 2 and time.time() < deadline:
    time.sleep(0.005)
images = folder.decoded(folder.scan(root), 16, data_dir)
print("sha256", hashlib.sha256(images["all"].numpy().tobytes()).hexdigest())
"""


def test_two_processes_on_a_fresh_folder_decode_it_once(tmp_path):
    root, data_dir, start = write_tree(tmp_path / "tree"), tmp_path / "data", tmp_path / "start"
    start.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", DECODE, str(root), str(data_dir), str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("decoded 30 images at 16 px") == 1, stdout  # one process decoded ...
    assert stdout.count("read 30 decoded images at 16 px") == 1, stdout  # ... the other waited and read
    assert len({line for line in stdout.splitlines() if line.startswith("sha256 ")}) == 1  # the same images
    assert [p.suffix for p in (data_dir / "decoded").iterdir()] == [".pt"]  # no temp file, no lock file left


# ---- CIFAR: one download, and a failed one removes only its own files ----------------------------

class FakeCIFAR10:
    """torchvision's CIFAR10 as _cifar uses it: raises RuntimeError when its folder is not there,
    and download=True fetches it (slowly: the other loader arrives meanwhile)."""
    base_folder, filename = torchvision.datasets.CIFAR10.base_folder, torchvision.datasets.CIFAR10.filename
    downloads = []

    def __init__(self, root, train=True, download=False):
        folder = Path(root) / self.base_folder
        if download and not (folder / "complete").exists():
            self.downloads.append(threading.get_ident())
            time.sleep(0.5)
            folder.mkdir(parents=True)
            (folder / "complete").touch()
        if not (folder / "complete").exists():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.data, self.targets = np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, 3]


def test_two_loaders_download_cifar_once(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    monkeypatch.setattr(FakeCIFAR10, "downloads", [])
    errors = []

    def load():
        try:
            cifar._cifar("cifar10", str(tmp_path / "data"))
        except Exception as e:  # noqa: BLE001: reported below
            errors.append(e)
    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(FakeCIFAR10.downloads) == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [FakeCIFAR10.base_folder]  # lock file gone


@pytest.mark.parametrize("data_dir_existed", [True, False])
def test_a_failed_download_removes_only_what_it_created(tmp_path, monkeypatch, data_dir_existed):
    """While the download runs, another process creates data/decoded/: it survives the failure;
    the partial archive and folder of this download do not, nor a data folder this process made."""
    data_dir = tmp_path / "parent" / "data"
    if data_dir_existed:
        data_dir.mkdir(parents=True)
        (data_dir / "mine.txt").write_text("keep")

    def failing_download(self):
        (data_dir / "decoded").mkdir(exist_ok=True)  # the other process
        (data_dir / "decoded" / "set_32px_0123.pt").write_bytes(b"another process's cache")
        (data_dir / self.filename).write_bytes(b"partial")  # this download
        (data_dir / self.base_folder).mkdir()
        (data_dir / self.base_folder / "data_batch_1").write_bytes(b"partial")
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", failing_download)
    with pytest.raises(ConfigError, match="could not be downloaded"):
        cifar._cifar("cifar10", str(data_dir))
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    expected = ["parent", "parent/data", "parent/data/decoded", "parent/data/decoded/set_32px_0123.pt"]
    assert left == sorted(expected + ["parent/data/mine.txt"] * data_dir_existed)
