"""The delta store: one `NAME.delta.safetensors` file per variant in one directory.

Uploads land in a hidden temporary file in the same directory and are committed
with an atomic rename after validation, so a failed or interrupted upload never
leaves a partial variant. The file is fsynced before the rename and the directory
after it (and after a delete), so what was committed survives a crash or power loss.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from deltastore import faults
from deltastore.format import DeltaMeta, fsync_path, read_meta

SUFFIX = ".delta.safetensors"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UPLOAD_PREFIX = ".upload-"


class InvalidName(ValueError):
    """An invalid variant name (empty, too long, path-like, odd characters)."""


def check_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not _NAME.fullmatch(name)
        or ".." in name
        or name.endswith(SUFFIX)
    ):
        raise InvalidName(
            f"invalid variant name {name!r}: 1-64 characters of letters, digits, '.', '_' "
            "and '-', starting with a letter or digit, no '..'"
        )
    return name


@dataclass(frozen=True)
class StoredDelta:
    name: str
    path: Path
    size: int
    sha256: str
    meta: DeltaMeta


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DeltaStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_UPLOAD_PREFIX}*"):
            stale.unlink(missing_ok=True)  # an upload interrupted by a crash
        self._lock = threading.Lock()
        self._info: dict[str, tuple[tuple[int, int, int], StoredDelta]] = {}
        self._meta: dict[str, tuple[tuple[int, int, int], DeltaMeta]] = {}

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}"))

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def stamp(self, name: str) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of the committed file; None if there is none. A replace
        is a new inode, so a cached decode can tell the file it came from is gone."""
        try:
            st = self.path(name).stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def info(self, name: str) -> StoredDelta:
        """Size, sha256 and metadata; cached per (size, mtime)."""
        path = self.path(name)
        stamp = self.stamp(name)
        if stamp is None:
            raise KeyError(name)
        with self._lock:
            cached = self._info.get(name)
            if cached and cached[0] == stamp:
                return cached[1]
        entry = StoredDelta(name, path, stamp[1], sha256_file(path), read_meta(path))
        with self._lock:
            self._info[name] = (stamp, entry)
        return entry

    def meta(self, name: str) -> DeltaMeta:
        """The metadata alone (no checksum of the file); cached per stamp."""
        stamp = self.stamp(name)
        if stamp is None:
            raise KeyError(name)
        with self._lock:
            cached = self._meta.get(name)
            if cached and cached[0] == stamp:
                return cached[1]
        meta = read_meta(self.path(name))
        with self._lock:
            self._meta[name] = (stamp, meta)
        return meta

    def new_upload(self) -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=_UPLOAD_PREFIX, suffix=".tmp")
        os.close(fd)
        return Path(tmp)

    def commit(self, name: str, upload: Path, replace: bool) -> Path:
        """Atomically move a validated upload into place."""
        dest = self.path(name)
        fsync_path(upload)
        faults.point("commit.synced")
        with self._lock:
            if dest.exists() and not replace:
                raise FileExistsError(f"variant {name!r} exists (use replace=true)")
            os.replace(upload, dest)
            self._info.pop(name, None)
        faults.point("commit.renamed")
        fsync_path(self.root)
        return dest

    def delete(self, name: str) -> None:
        faults.point("delete.unlinking")
        with self._lock:
            self.path(name).unlink()
            self._info.pop(name, None)
        faults.point("delete.unlinked")
        fsync_path(self.root)
