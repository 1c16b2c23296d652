"""Checkpoints that verify themselves: every NAME.pt has a sidecar NAME.pt.json with its size
and SHA-256, written before the rename that replaces the previous NAME.pt. The sidecar also
lists the previous file's size and checksum, so whichever of the two a crash leaves in
place, it verifies; a torn, truncated or bit-flipped file does not. A checkpoint without a
sidecar (a run folder from before sidecars) is verified by loading it.
"""
import hashlib
import json
from pathlib import Path

import torch

from vitprune.files import write_atomic, write_json


class Damaged(Exception):
    """A checkpoint that cannot be used; str(): why, in a few words."""


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
    """The verified checkpoint at `path`; raises Damaged (missing, checksum, unreadable)."""
    path = Path(path)
    verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torn zip, pickle error: say what, not the traceback
        raise Damaged(f"unreadable ({(str(e).strip().splitlines() or [type(e).__name__])[0][:100]})") from None


def remove(path: Path):
    """A checkpoint and its sidecar."""
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)
