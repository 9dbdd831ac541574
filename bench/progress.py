"""Progress for long steps: a tqdm bar on a terminal, a periodic one-line status in a log.

A tqdm bar redraws about ten times a second; off a terminal (a SLURM log, CI, ``2> file``) every
redraw becomes a line, and a Bedroom-scale probe stage would write tens of thousands of them. So
off a TTY the bar is replaced by one plain line every ``BENCH_STATUS_EVERY`` seconds (default 30)
and one at the end.

Example:
    >>> import io
    >>> stream = io.StringIO()
    >>> with progress(total=3, desc="features", unit="img", stream=stream, every=0) as bar:
    ...     bar.update(3)
    >>> stream.getvalue().splitlines()[-1].startswith("features: 3/3 img")
    True
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Any


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def status_interval() -> float:
    """Seconds between status lines off a terminal: ``$BENCH_STATUS_EVERY`` or 30.

    Example:
        >>> status_interval() > 0
        True
    """
    try:
        value = float(os.environ.get("BENCH_STATUS_EVERY", "30"))
    except ValueError:
        value = 30.0
    return value if value >= 0 else 30.0


class StatusLine:
    """The tqdm subset the harness uses (update, reset, set_description, close), as periodic lines.

    Example:
        >>> import io
        >>> s = io.StringIO(); bar = StatusLine(total=10, desc="probe", unit="step", stream=s, every=0)
        >>> bar.update(4); bar.close(); "probe: 4/10 step" in s.getvalue()
        True
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *, stream: IO[str] | None = None,
                 every: float | None = None, initial: int = 0, unit_scale: bool = False, **_: Any) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream if stream is not None else sys.stderr
        self.every = status_interval() if every is None else every
        self.unit_scale = unit_scale
        self.start = self.last = time.monotonic()
        self.closed = False

    def _fmt(self, v: float) -> str:
        if not self.unit_scale:
            return str(int(v))
        for suffix in ("", "K", "M", "G", "T"):
            if abs(v) < 1024:
                return f"{v:.1f}{suffix}"
            v /= 1024
        return f"{v:.1f}P"

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self._fmt(self.n)}/{self._fmt(self.total)}" if self.total else self._fmt(self.n)
        text = f"{self.desc}: {done} {self.unit}, {elapsed:.0f} s"
        if self.total and 0 < self.n < self.total and elapsed > 0:
            text += f", ETA {elapsed * (self.total - self.n) / self.n:.0f} s"
        return text

    def _emit(self) -> None:
        print(self._line(), file=self.stream, flush=True)
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; print a line when the interval has passed."""
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._emit()

    def reset(self, total: int | None = None) -> None:
        """Start counting again (a new epoch)."""
        if total is not None:
            self.total = total
        self.n = 0
        self.start = time.monotonic()  # the ETA is for this pass (an epoch), not the whole run

    def set_description(self, desc: str) -> None:
        """Change the label of later lines."""
        self.desc = desc

    def close(self) -> None:
        """Print the final line once."""
        if not self.closed:
            self.closed = True
            if self.n:
                self._emit()

    def __enter__(self) -> "StatusLine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(StatusLine):
    def _emit(self) -> None:
        pass


def progress(total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
             stream: IO[str] | None = None, every: float | None = None, **kwargs: Any) -> Any:
    """A progress reporter: tqdm on a terminal, :class:`StatusLine` otherwise, silent if not ``enabled``.

    Extra keyword arguments (``leave``, ``initial``, ``unit_scale``, ...) go to tqdm.

    Example:
        >>> bar = progress(total=5, desc="x", enabled=False); bar.update(5); bar.close()
    """
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return _Silent(total, desc, unit, stream=stream, every=0, **kwargs)
    if _is_tty(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, **kwargs)
    return StatusLine(total, desc, unit, stream=stream, every=every, **kwargs)
