"""Seeds: one run seed, an independent sub-stream for each use of it.

A run seed ``s`` drives the split, the random-init controls and every ensemble member; each use
gets its own 63-bit sub-seed ``derive_seed(s, stream, index)``, so one member or one split can be
recomputed alone and adding a new use never shifts the others.

Example:
    >>> derive_seed(0, "member", 3) != derive_seed(0, "member", 4)
    True
"""
from __future__ import annotations

import hashlib
from typing import Any

from bench.errors import BenchError


def is_int(value: Any) -> bool:
    """True for real integers (bools excluded: ``True`` is not a seed or a size).

    Example:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """A stable 63-bit sub-seed for one use of the run seed (``"split"``, ``"init"``, ``"member"`` m, ...).

    Defined as the first 8 bytes (big-endian) of ``sha256(f"bench/{stream}/{seed}/{index}")``,
    shifted right by one bit. Independent of platform, Python and NumPy versions, and of the order in
    which streams are used, so one member or one split can be recomputed alone.

    Example:
        >>> derive_seed(0, "split") == derive_seed(0, "split") != derive_seed(1, "split")
        True
        >>> 0 <= derive_seed(3, "member", 9) < 2**63
        True
    """
    if not is_int(seed) or not is_int(index):
        raise BenchError(f"seed and index must be integers, got seed={seed!r} index={index!r}")
    digest = hashlib.sha256(f"bench/{stream}/{seed}/{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1
