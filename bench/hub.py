"""Cache folder, resumable verified downloads, safe archive extraction and checkpoint lookup.

Everything here uses the standard library (plus :mod:`bench.progress` for progress reports): no
``requests``, so a bare install can fetch the datasets and checkpoints. Promises:

- a file appears at its final path only when it is complete and verified: against the declared
  sha256, else against the server's announced size (a download whose size is unknown and whose
  sha256 is not declared is refused). Data streams to ``<dest>.part`` and is moved into place with
  :func:`os.replace`;
- a file downloaded without a declared sha256 gets its digest recorded in ``<dest>.sha256``
  (``sha256sum`` format), and later calls check the file against it before reusing it;
- a failure leaves nothing that cannot be used: only a ``.part`` the next call resumes;
- every failure is a one-line :class:`~bench.errors.BenchError` naming the url or file, and an error
  about a bad cache entry names the file to delete.

Archives are handled by :mod:`bench.archives`; :func:`safe_extract` is re-exported here.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import secrets
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Sequence

from bench.archives import safe_extract  # noqa: F401  (re-export: bench.data calls hub.safe_extract)
from bench.errors import CheckpointError, DownloadError
from bench.progress import progress  # shadowed by the `progress` flags below: private code says `show`

if TYPE_CHECKING:  # pragma: no cover
    from bench.contract import Weights

log = logging.getLogger(__name__)

#: seconds a socket may stay silent before a download counts as failed
SOCKET_TIMEOUT = 60.0
#: read size; large enough to keep Python overhead low, small enough for a lively progress bar
CHUNK_BYTES = 1 << 20


def bench_home() -> Path:
    """The cache root: ``$BENCH_HOME``, else ``$XDG_CACHE_HOME/bench``, else ``~/.cache/bench``.

    The folder is created on first use.

    Example:
        >>> import os, tempfile
        >>> os.environ["BENCH_HOME"] = tempfile.mkdtemp()
        >>> bench_home() == Path(os.environ["BENCH_HOME"])
        True
    """
    if os.environ.get("BENCH_HOME"):
        home = Path(os.environ["BENCH_HOME"])
    elif os.environ.get("XDG_CACHE_HOME"):
        home = Path(os.environ["XDG_CACHE_HOME"]) / "bench"
    else:
        home = Path.home() / ".cache" / "bench"
    return _usable_folder(home.expanduser(), "the cache root (BENCH_HOME)")


def _usable_folder(folder: Path, what: str) -> Path:
    """``folder``, created if absent; a one-line error if it is a file or a link to nowhere."""
    if folder.is_symlink() and not folder.exists():
        raise DownloadError(f"{what} {folder} is a symlink to {os.readlink(folder)}, which does not exist; "
                            f"create that folder or remove the link")
    if folder.exists() and not folder.is_dir():
        raise DownloadError(f"{what} {folder} exists but is not a folder; move it away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create {what} {folder}: {err.strerror or err}") from err
    return folder


def cache_dir(name: str) -> Path:
    """A folder of the cache (``datasets``, ``features``, ``downloads``, ``checkpoints``), checked.

    A symlink to a folder elsewhere (a bigger disk) is fine; a dangling link or a file is a one-line
    error naming it.

    Example:
        >>> import os, tempfile
        >>> os.environ["BENCH_HOME"] = tempfile.mkdtemp()
        >>> cache_dir("features").is_dir()
        True
    """
    return _usable_folder(bench_home() / name, f"cache folder {name!r}:")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are gigabytes; never read them whole).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = p.write_bytes(b"abc")
        >>> sha256_file(p)[:16]
        'ba7816bf8f01cfea'
    """
    return _digest_of(path).hexdigest()


# ---- downloads ----------------------------------------------------------------------------------


class _RestartFromZero(Exception):
    """The ``.part`` cannot be continued (416, or the server sent another range): start again."""


def download(url: str | Sequence[str], dest: Path, *, sha256: str = "", progress: bool = True) -> Path:
    """Download ``url`` (or the first working mirror of a list) to ``dest``; returns ``dest``.

    Data streams to ``dest.name + ".part"``; an existing ``.part`` is resumed with an HTTP Range
    request (a server that ignores Range, or answers with another range, is read from the start
    again). The bytes are verified before ``dest`` appears: against ``sha256`` when given (a
    mismatch deletes the ``.part`` and tries the next mirror), else against the size the server
    announces; a server that announces no size is refused unless ``sha256`` is given.

    Without ``sha256`` the digest is recorded in ``dest.name + ".sha256"``. An existing ``dest`` is
    reused without network access when it matches ``sha256``, else its recorded digest; a mismatch
    is deleted and downloaded again. A ``dest`` with neither (from an older version, or copied in by
    hand) may be truncated, so it is treated as a ``.part``: the server completes it or confirms
    its size. A symlink placed by hand is trusted and its digest recorded.

    Example:
        >>> import tempfile
        >>> src = Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = src.write_bytes(b"weights")
        >>> out = download(src.as_uri(), src.with_name("copy.bin"), progress=False)
        >>> out.read_bytes(), _read_sidecar(_sidecar(out)) == sha256_file(out)
        (b'weights', True)
    """
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise DownloadError(f"no url given for {dest}")
    dest = Path(dest)
    part, sidecar = dest.with_name(dest.name + ".part"), _sidecar(dest)
    for path in (dest, part, sidecar):
        # We only write regular files, and appending to a linked .part would write through the link.
        if (os.path.lexists(path) and not path.is_file()) or (path == part and path.is_symlink()):
            raise DownloadError(f"cannot download {urls[0]}: {path} is in the way (not a regular file); "
                                f"delete it and run again")
    expected = sha256.strip().lower()
    unverified = False
    if dest.is_file():
        recorded = expected or _read_sidecar(sidecar)
        if recorded:
            actual = sha256_file(dest)
            if actual == recorded:
                if expected and os.path.lexists(sidecar) and _read_sidecar(sidecar) != expected:
                    _write_sidecar(sidecar, actual, dest.name)  # the declared sha256 wins: fix the record
                return dest
            source = "the declared sha256" if expected else f"the sha256 recorded in {sidecar.name}"
            log.warning("%s has sha256 %s, not %s %s; deleting it and downloading it again",
                        dest, actual, source, recorded)
            dest.unlink()
            sidecar.unlink(missing_ok=True)
        elif dest.is_symlink():
            # Never one of our downloads (we write no links): the user placed it, so trust it.
            _write_sidecar(sidecar, sha256_file(dest), dest.name)
            return dest
        else:
            log.warning("%s has no recorded sha256 and may be truncated; checking it against the server", dest)
            os.replace(dest, part)
            unverified = True
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot download {urls[0]}: cannot create {dest.parent}: {err}") from err

    failures: list[str] = []
    for one_url in urls:
        try:
            actual = _fetch_verified(one_url, part, expected, progress, label=dest.name)
        except DownloadError as err:
            failures.append(str(err))  # every message names its url
            continue
        try:
            os.replace(part, dest)
        except OSError as err:
            raise DownloadError(f"cannot move {part} to {dest}: {err}") from err
        if not expected or os.path.lexists(sidecar):  # a stale record would fail the next check
            _write_sidecar(sidecar, actual, dest.name)
        if not expected:
            log.info("downloaded %s from %s, sha256 %s (declare it to verify future downloads)",
                     dest, one_url, actual)
        return dest
    message = failures[0] if len(failures) == 1 else \
        f"could not download {dest.name} from any of its {len(urls)} urls: " + "; ".join(failures)
    if unverified and part.exists():
        message += (f" ({dest.name} had no recorded sha256, so it was moved to {part.name} to be completed and "
                    f"checked by the next run; to use it as it is, move it back and run "
                    f"`sha256sum {dest.name} > {sidecar.name}` in {dest.parent})")
    raise DownloadError(message)


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _read_sidecar(sidecar: Path) -> str:
    """The sha256 recorded in ``sidecar`` ('' when there is none or it is unreadable)."""
    try:
        words = sidecar.read_text(encoding="ascii").split()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError):
        words = []
    digest = words[0].lower() if words else ""
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    log.warning("ignoring %s: it does not start with a sha256", sidecar)
    return ""


def _write_sidecar(sidecar: Path, digest: str, name: str) -> None:
    """Record ``digest`` atomically, in ``sha256sum`` format (so ``sha256sum -c`` can check it)."""
    tmp = sidecar.with_name(f"{sidecar.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(f"{digest}  {name}\n", encoding="ascii")
        os.replace(tmp, sidecar)
    except OSError as err:  # the download itself succeeded: the next call checks it with the server
        tmp.unlink(missing_ok=True)
        log.warning("could not record the sha256 of %s in %s: %s", name, sidecar, err)


def _fetch_verified(url: str, part: Path, expected: str, show: bool, label: str) -> str:
    """Complete ``part`` from ``url`` and check its digest; returns the digest.

    A mismatch after resuming may come from a stale ``.part`` (another file, an old version), so
    the url gets one more try from zero before it is declared wrong.
    """
    for attempt in range(2):
        resumed_bytes = part.stat().st_size if part.exists() else 0
        try:
            actual = _stream_to_part(url, part, expected, show, label)
        except _RestartFromZero:
            part.unlink(missing_ok=True)
            actual = _stream_to_part(url, part, expected, show, label)
            resumed_bytes = 0
        if not expected or actual == expected:
            return actual
        part.unlink(missing_ok=True)
        if resumed_bytes == 0 or attempt == 1:
            raise DownloadError(f"sha256 mismatch for {url}: expected {expected}, got {actual}; "
                                f"the file was deleted")
        log.warning("sha256 mismatch after resuming %s; downloading it again from zero", url)
    raise AssertionError("unreachable")  # pragma: no cover


def _stream_to_part(url: str, part: Path, expected: str, show: bool, label: str) -> str:
    """Append the rest of ``url`` to ``part`` (resuming when possible); returns the full sha256."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "bench-seg"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            if _content_range(err.headers.get("Content-Range", ""))[1] == have:
                return _digest_of(part).hexdigest()  # "nothing after byte N of N": the .part is complete
            raise _RestartFromZero() from err
        raise DownloadError(f"HTTP {err.code} {err.reason} from {url}") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        # URLError wraps DNS/refused/timeout; ValueError is urllib's "unknown url type".
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot open {url}: {reason}") from err

    with response:
        status = response.status or 200  # file:// responses have no status
        length = response.headers.get("Content-Length", "")
        body = int(length) if length.isdigit() else None
        if status == 206:
            first, size = _content_range(response.headers.get("Content-Range", ""))
            if first != have:
                if have:  # splicing another range onto the .part would corrupt it
                    raise _RestartFromZero()
                raise DownloadError(f"{url} answered a plain request with bytes from {first}; cannot use it")
            total = size if size is not None else (have + body if body is not None else None)
            mode = "ab"
        else:
            have, mode, total = 0, "wb", body  # a 200 answer is the whole file: start from zero
        if total is None and not expected:
            # Without a size or a digest, a cut connection looks exactly like the end of the file.
            part.unlink(missing_ok=True)
            raise DownloadError(f"cannot verify the download of {url}: the server does not announce its size "
                                f"(no Content-Length) and no sha256 is declared, so a truncated file would go "
                                f"unnoticed; nothing was kept. Declare the file's sha256 to download it")
        digest = _digest_of(part) if have else hashlib.sha256()
        bar = progress(total=total, desc=label, unit="B", enabled=show, unit_scale=True, unit_divisor=1024,
                       initial=have, leave=False)
        try:
            with open(part, mode) as out:
                received = _copy_stream(response, out, digest, bar, url)
        finally:
            bar.close()
    if total is not None and have + received < total:
        # Keep the .part: the next call resumes where this one stopped.
        raise DownloadError(f"connection to {url} closed after {have + received} of {total} bytes; "
                            f"run again to resume (or delete {part} to start over)")
    return digest.hexdigest()


def _digest_of(path: Path) -> Any:
    """A sha256 object fed with ``path``'s bytes (to continue hashing where a ``.part`` stops)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest


def _copy_stream(response: BinaryIO, out: BinaryIO, digest: Any, bar: Any, url: str) -> int:
    """Copy ``response`` into ``out`` chunk by chunk, hashing as it goes; returns bytes copied."""
    received = 0
    while True:
        try:
            block = response.read(CHUNK_BYTES)
        except (socket.timeout, TimeoutError) as err:
            raise DownloadError(f"timed out after {SOCKET_TIMEOUT:g} s reading {url}; "
                                f"run again to resume (or delete {out.name} to start over)") from err
        except (OSError, http.client.HTTPException) as err:  # reset, IncompleteRead, ...
            raise DownloadError(f"connection error reading {url}: {err!r}; run again to resume "
                                f"(or delete {out.name} to start over)") from err
        if not block:
            return received
        try:
            out.write(block)
        except OSError as err:  # disk full, quota: the user's side, so say which file
            raise DownloadError(f"cannot write {out.name} while downloading {url}: {err}") from err
        digest.update(block)
        received += len(block)
        bar.update(len(block))


def _content_range(header: str) -> tuple[int | None, int | None]:
    """(first byte, total size) of ``Content-Range: bytes FIRST-LAST/TOTAL`` or ``bytes */TOTAL``.

    Example:
        >>> _content_range("bytes 100-199/1000"), _content_range("bytes */1000"), _content_range("")
        ((100, 1000), (None, 1000), (None, None))
    """
    span, _, size = header.strip().removeprefix("bytes").strip().partition("/")
    first = span.split("-")[0]
    return (int(first) if first.isdigit() else None, int(size) if size.isdigit() else None)


# ---- checkpoints --------------------------------------------------------------------------------


def fetch_weights(weights: "Weights", *, module_file: str, name: str, progress: bool = True) -> Path:
    """Local path of a backbone's checkpoint: the shipped file, or a verified download in the cache.

    ``weights.file`` is resolved next to ``module_file`` (the plugin's ``__file__``); otherwise the
    first working url of ``weights.url`` is downloaded to
    ``bench_home()/"checkpoints"/name/<basename of the first url>``.

    Example:
        >>> import tempfile
        >>> from bench.contract import Weights
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "tiny.safetensors").write_bytes(b"...")
        >>> w = Weights(tag="demo", file="tiny.safetensors")
        >>> fetch_weights(w, module_file=str(folder / "plugin.py"), name="demo").name
        'tiny.safetensors'
    """
    if weights.file:
        path = Path(module_file).parent / weights.file
        if not path.is_file():
            raise CheckpointError(f"shipped checkpoint of {name} not found: {path}")
        if weights.sha256:
            actual = sha256_file(path)
            if actual != weights.sha256.lower():
                raise CheckpointError(f"shipped checkpoint {path} has sha256 {actual}, "
                                      f"expected {weights.sha256.lower()}")
        return path
    if not weights.url:
        raise CheckpointError(f"weights tag {weights.tag!r} of {name!r} has no download location "
                              f"(neither url nor file is declared)")
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise CheckpointError(f"invalid cache folder name {name!r} for weights tag {weights.tag!r}")
    # The first url names the cache file, so the cache path does not depend on which mirror answered.
    basename = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(weights.url[0]).path))
    if basename in ("", ".", ".."):
        basename = f"{weights.tag}.bin"
    dest = cache_dir("checkpoints") / name / basename
    return download(weights.url, dest, sha256=weights.sha256, progress=progress)
