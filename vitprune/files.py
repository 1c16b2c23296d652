"""Writing files safely: atomic replace, appends, fsync, locks, and a full disk said in one line.

Every file vitprune writes (checkpoints, metrics, summaries, caches, exports) goes through
`write_atomic` or `append_line`, so a crash never leaves a torn file and a full disk is
caught in one place (`DiskFull`, exit code 75). Temp files have names of their own (pid and
random), so two processes writing one file never rename each other's. What must be done by
one process at a time (a run folder, a shared cache) takes an `exclusive_lock`.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
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
    tmp = temp_name(path)
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
        fsync_dir(path.parent)  # the rename itself survives a power loss
    except OSError as e:
        if e.errno in FULL_ERRNOS:
            tmp.unlink(missing_ok=True)
            raise DiskFull(path, _size_of(content)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)  # only there when the write failed
    return w.size, w.sha.hexdigest()


def temp_name(path: Path) -> Path:
    """A temp file beside `path` that no other process (or call) uses."""
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(folder) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path, line: str):
    """Append one line and fsync it (a checkpoint written after it never runs ahead of the
    records); on a full disk cut the file back to what it was and raise DiskFull."""
    data = line.encode()
    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush at close
        size = f.tell()
        try:
            Writer(f).write(data)
            os.fsync(f.fileno())
        except OSError as e:
            if e.errno not in FULL_ERRNOS:
                raise
            f.truncate(size)
            raise DiskFull(path, len(data)) from None


@contextlib.contextmanager
def made_folders(path):
    """Folder `path`, created with its missing parents for the block; when the block fails, the
    folders it created are removed again, deepest first, as far as they are empty (another
    process may have put files there meanwhile): bad input leaves nothing behind."""
    missing, folder = [], Path(os.path.abspath(path))
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    Path(path).mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:  # not empty: it and its parents stay
                break
        raise


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


class Locked(Exception):
    """Another process holds the lock; str(): who (host, pid, since when), as it wrote."""


class Lock:
    """An exclusive lock on a lock file (fcntl.flock), released by the OS when the process dies,
    so a killed holder leaves no stale lock. The holder writes who it is into the file and
    removes it on release; a process that locked a file already removed (or replaced) by the
    time it got the lock tries again, so there are never two holders. On a filesystem without
    locks (ENOLCK: some NFS and Lustre mounts) `acquire` says so in one line on stderr and goes
    on unlocked (`self.locked` False)."""

    def __init__(self, path):
        self.path, self.fd, self.locked = Path(path), None, False

    def acquire(self, blocking: bool = True) -> "Lock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise Locked(self.holder()) from None
                if e.errno != errno.ENOLCK:
                    raise
                print(f"warning: {self.path.parent} does not support file locks (ENOLCK); going on without "
                      f"{self.path.name}: nothing stops another process from doing the same at the same time",
                      file=sys.stderr)
                return self
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder before us removed the file while we waited: lock the current one
        self.fd, self.locked = fd, True
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": stamp}).encode(), 0)
        return self

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it: 'host HOST, pid PID, since TIME'."""
        try:
            who = json.loads(self.path.read_text())
            return f"host {who['host']}, pid {who['pid']}, since {who['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (it has not said who yet)"

    def release(self):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: see the class docstring
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd, self.locked = None, False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def exclusive_lock(path):
    """Hold an exclusive lock on the lock file `path` for the block, waiting for it if another
    process holds it (a shared cache: one process builds it, the others then read it)."""
    with Lock(path):
        yield

