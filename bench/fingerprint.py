"""Content fingerprints: what identifies data by its bytes, not by its name or folder.

A run's key (:mod:`bench.runner`) and the feature cache use the sha256 of every image and label
file. Hashing is memoised per process by (path, size, mtime_ns), so an edited file is hashed again
while the same file is read once however many runs use it.

Example:
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a.bin"; _ = p.write_bytes(b"abc")
    >>> file_sha256(p)[:12]
    'ba7816bf8f01'
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from bench.errors import DatasetError

_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoised by (resolved path, size, mtime_ns).

    Example:
        >>> file_sha256(Path(__file__)) == file_sha256(Path(__file__))
        True
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        from bench.hub import sha256_file  # the one chunked file hasher

        _MEMO[key] = sha256_file(path)
    return _MEMO[key]


def digest(value: Any, length: int = 16) -> str:
    """Short sha256 of a JSON-able value in canonical form (sorted keys): the key of a config.

    Example:
        >>> digest({"b": 1, "a": [2]}) == digest({"a": [2], "b": 1})
        True
    """
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]
