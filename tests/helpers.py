"""Small helpers shared by several test files (imported as ``from helpers import ...``)."""
from __future__ import annotations

from pathlib import Path


class WritesMarker:
    """A malicious pickle payload: unpickling this object runs ``exec``, which creates a marker file.

    Tests put it inside each official checkpoint container and check that our loaders refuse the file
    and that the marker does not exist afterwards (so nothing from the file ran).
    """

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))
