"""Writing files safely: atomic replace, appends, fsync, and a full disk said in one line.

Every file vitprune writes (checkpoints, metrics, summaries, caches, exports) goes through
`write_atomic` or `append_line`, so a crash never leaves a torn file and a full disk is
caught in one place (`DiskFull`, exit code 75).
"""
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from vitprune.errors import ConfigError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left, quota exceeded


class DiskFull(Exception):
    """A write found the disk full. The file it was writing is left as it was (a rename
    never happened; an append is cut back), so the run resumes once space is freed."""
    EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: try again later

    def __init__(self, path, needed: int):
        self.path, self.needed = Path(path), needed
        try:
            free = f", {shutil.disk_usage(self.path.parent).free:,} free"
        except OSError:
            free = ""
        super().__init__(f"disk full: writing {path} needs {needed:,} bytes{free}; free some space and "
                         f"run the command again (a run: with --resume; every earlier file is intact)")


class Writer:
    """A binary file open for writing, counting and hashing what goes through it. Every file
    of a run folder is written through one, so a full disk is caught in one place."""

    def __init__(self, f):
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < view.nbytes:  # an unbuffered file may take part of it
            done += self.f.write(view[done:])
        self.sha.update(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self):
        self.f.flush()


class _Counter:
    """A sink that only counts: the size a write would have had (to say how much a full disk lacked)."""
    size = 0

    def write(self, data) -> int:
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    def flush(self):
        pass


def _size_of(content) -> int:
    if callable(content):
        counter = _Counter()
        content(counter)
        return counter.size
    return len(content.encode() if isinstance(content, str) else content)


def write_atomic(path, content, before_replace=None):
    """Write a file through a temp file, fsync and rename, so that a crash never leaves it
    torn. content: str, bytes, or a callable that writes into the open binary file (e.g.
    `lambda f: torch.save(obj, f)`). before_replace(tmp, size, sha256) runs between the fsync
    and the rename (to verify the new file while the old one stands). Returns (size, sha256);
    raises DiskFull, the old file untouched, when the disk is full."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            w = Writer(f)
            if callable(content):
                content(w)
            else:
                w.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        if before_replace:
            before_replace(tmp, w.size, w.sha.hexdigest())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in FULL_ERRNOS:
            tmp.unlink(missing_ok=True)
            raise DiskFull(path, _size_of(content)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)  # only there when the write failed
    return w.size, w.sha.hexdigest()


def append_line(path, line: str):
    """Append one line; on a full disk cut the file back to what it was and raise DiskFull."""
    data = line.encode()
    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush at close
        size = f.tell()
        try:
            Writer(f).write(data)
        except OSError as e:
            if e.errno not in FULL_ERRNOS:
                raise
            f.truncate(size)
            raise DiskFull(path, len(data)) from None


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def check_folder(flag: str, path: str, writable: bool):
    """A folder flag must name a folder, or a place one can be made: no file on the way, and
    (`writable`) the nearest existing folder writable."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == os.path.abspath(path) else f"lies under the file {existing!r}"
        raise ConfigError(f"--{flag}: {path!r} {what}, not a folder; give a folder path")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--{flag}: cannot write in {existing!r}; give a folder you can write to")
