"""Per-user cache of converted model weights, checksummed and written atomically.

An entry is a folder ``<root>/<key>/`` holding the files and a ``manifest.json`` with each file's
SHA-256 and size. An entry is built in a temporary folder beside it and renamed into place, so an
interrupted conversion never leaves a half-written entry. On load every file is re-hashed; a
corrupt or partial entry is reported and rebuilt. A cache that cannot be written is not fatal:
callers convert in memory each time, and are told that start-up is slower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1


def default_root() -> Path:
    env = os.environ.get("DUPLEX_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "duplex" / "models"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class CacheUnwritable(Exception):
    pass


class ModelCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_root()

    def path(self, key: str) -> Path:
        return self.root / key

    @property
    def writable(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.root, os.W_OK | os.X_OK)

    def load(self, key: str, source_id: str) -> Path | None:
        """The entry's folder if it exists, was built from ``source_id`` and every checksum holds."""
        folder = self.path(key)
        manifest = folder / MANIFEST
        if not manifest.exists():
            return None
        try:
            meta = json.loads(manifest.read_text())
            files: dict[str, dict] = meta["files"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("model cache %s has an unreadable manifest; rebuilding it", folder)
            return None
        if meta.get("format") != FORMAT or meta.get("source") != source_id:
            log.info("model cache %s was built from another source; rebuilding it", folder)
            return None
        for name, info in files.items():
            p = folder / name
            if not p.exists() or p.stat().st_size != info["size"] or sha256(p) != info["sha256"]:
                log.warning("model cache file %s is corrupt or incomplete (checksum mismatch); rebuilding", p)
                return None
        return folder

    def store(self, key: str, source_id: str, build: Callable[[Path], None]) -> Path:
        """Run ``build(tmpdir)`` to write the files, checksum them, then move them into place."""
        if not self.writable:
            raise CacheUnwritable(f"model cache {self.root} is not writable")
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            t0 = time.perf_counter()
            build(tmp)
            files = {
                p.name: {"sha256": sha256(p), "size": p.stat().st_size}
                for p in sorted(tmp.iterdir())
                if p.is_file()
            }
            meta = {"format": FORMAT, "source": source_id, "files": files, "built_seconds": round(time.perf_counter() - t0, 3)}
            (tmp / MANIFEST).write_text(json.dumps(meta, indent=1))
            final = self.path(key)
            if final.exists():
                # move the stale entry aside first: a rename over a non-empty folder fails
                stale = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=self.root))
                os.replace(final, stale / "entry")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
