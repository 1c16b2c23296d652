"""Checkpoints that verify themselves: every NAME.pt has a sidecar NAME.pt.json with its size
and SHA-256, written before the rename that replaces the previous NAME.pt. The sidecar also
lists the previous file's size and checksum, so whichever of the two a crash leaves in
place, it verifies; a torn, truncated or bit-flipped file does not. A checkpoint without a
sidecar (a run folder from before sidecars) is verified by loading it.
"""
import hashlib
import json
import pickle
from pathlib import Path

import torch

from vitprune.errors import ConfigError
from vitprune.files import write_atomic, write_json


class Damaged(Exception):
    """A checkpoint that cannot be used; str(): why, in a few words."""


class NeedsPickle(ConfigError):
    """A checkpoint that would need pickle to load: refused in one line (exit 2)."""


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _entries(path: Path) -> list:
    """The (size, sha256) pairs the sidecar accepts; [] when there is no readable sidecar."""
    try:
        side = json.loads(sidecar(path).read_text())
        return [(e["size"], e["sha256"]) for e in (side, side.get("previous")) if e]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def save(obj, path):
    """torch.save `obj` to `path`: written to a temp file, read back and checked, then the
    sidecar (new and previous checksums), then the rename. Raises files.DiskFull on a full disk."""
    path = Path(path)
    previous = _entries(path)[:1] if path.is_file() else []

    def verify_then_record(tmp, size, sha):
        if tmp.stat().st_size != size or file_sha256(tmp) != sha:
            raise OSError(f"{tmp}: the bytes read back differ from those written")
        entry = {"size": size, "sha256": sha}
        if previous:
            entry["previous"] = {"size": previous[0][0], "sha256": previous[0][1]}
        write_json(sidecar(path), entry)
    write_atomic(path, lambda f: torch.save(obj, f), before_replace=verify_then_record)


def recorded_checksums(path: Path) -> set:
    """The SHA-256 checksums the sidecar accepts for `path` (empty without a sidecar)."""
    return {sha for _, sha in _entries(path)}


def verify(path: Path):
    """Raises Damaged unless `path` matches its sidecar (without one: nothing to check here)."""
    if not path.is_file():
        raise Damaged("missing")
    accepted = _entries(path)
    if not accepted:
        return
    size = path.stat().st_size
    if size not in {s for s, _ in accepted}:
        raise Damaged(f"truncated or extended: {size:,} bytes, {accepted[0][0]:,} written")
    if file_sha256(path) not in {h for _, h in accepted}:
        raise Damaged("checksum mismatch")


def load(path, map_location="cpu") -> dict:
    """The verified checkpoint at `path`, loaded without pickle (weights_only: tensors and plain
    data only, so a checkpoint from elsewhere cannot run code). Raises Damaged (missing,
    checksum, unreadable) and NeedsPickle (a file holding other Python objects: refused,
    never treated as damaged)."""
    path = Path(path)
    verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # what the weights-only unpickler refuses to build
        why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                   "not tensors and plain data")
        raise NeedsPickle(f"{path} holds Python objects that only pickle can load ({why[:120]}); vitprune loads "
                          f"checkpoints without pickle, so that a run folder cannot run code: refusing it") from None
    except Exception as e:  # torn zip: say what, not the traceback
        raise Damaged(f"unreadable ({_first_line(e)[:100]})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def remove(path: Path):
    """A checkpoint and its sidecar."""
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)
