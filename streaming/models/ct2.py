"""Reader for CTranslate2's ``model.bin``.

The format (binary version 6): a uint32 version, the spec name and a uint32 revision, a uint32
count of variables, each stored as a name, a uint8 rank, uint32 dims, a uint8 dtype id (the order
of CTranslate2's DataType enum), a uint32 byte count and the raw little-endian bytes; then a uint32
count of aliases, each an alias name and the variable it points to. Strings are a uint16 length
(including a trailing NUL) and the bytes. A model split into ``model.bin.part1``, ``.part2``, ...
is read as the concatenation of its parts, without joining them on disk.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DuplexError

# CTranslate2's DataType enum order; bfloat16 has no numpy dtype and is widened on read
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


@dataclass(frozen=True)
class CT2Model:
    spec: str
    revision: int
    version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]


class _Chain(io.RawIOBase):
    """Sequential reads across several files, as if they were one."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._files = [open(p, "rb") for p in paths]
        self._i = 0

    def readinto(self, b) -> int:
        while self._i < len(self._files):
            n = self._files[self._i].readinto(b)
            if n:
                return n
            self._i += 1
        return 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def model_parts(directory: Path) -> list[Path]:
    whole = directory / "model.bin"
    if whole.exists():
        return [whole]
    parts = sorted(directory.glob("model.bin.part*"), key=lambda p: int(p.suffix.removeprefix(".part") or 0))
    if not parts:
        raise DuplexError(f"no model.bin (or model.bin.partN) in {directory}")
    return parts


def read_ct2(parts: Sequence[Path]) -> CT2Model:
    raw = io.BufferedReader(_Chain(parts), buffer_size=1 << 20)
    try:
        return _read(raw, parts)
    except (struct.error, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise DuplexError(f"{parts[0]} is not a readable CTranslate2 model ({exc})") from None
    finally:
        raw.close()


def _exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"truncated: wanted {n} bytes, got {len(data)}")
    return data


def _u(f, fmt: str) -> int:
    return struct.unpack("<" + fmt, _exact(f, struct.calcsize(fmt)))[0]


def _string(f) -> str:
    n = _u(f, "H")
    return _exact(f, n)[:-1].decode("utf-8")


def _read(f, parts) -> CT2Model:
    version = _u(f, "I")
    if version < 5 or version > 6:
        raise ValueError(f"unsupported CTranslate2 binary version {version}")
    spec = _string(f)
    revision = _u(f, "I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(_u(f, "I")):
        name = _string(f)
        rank = _u(f, "B")
        shape = tuple(_u(f, "I") for _ in range(rank))
        dtype = _DTYPES[_u(f, "B")]
        nbytes = _u(f, "I")
        buf = _exact(f, nbytes)
        if dtype == "bfloat16":
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, np.dtype(dtype).newbyteorder("<"))
        variables[name] = arr.reshape(shape)
    aliases = {}
    for _ in range(_u(f, "I")):
        alias = _string(f)
        aliases[alias] = _string(f)
    return CT2Model(spec, revision, version, variables, aliases)
