"""Cache folder, resumable verified downloads, safe archive extraction and checkpoint lookup.

Everything here uses the standard library (plus tqdm for progress bars): no ``requests``, so a bare
install can fetch the datasets and checkpoints. Three promises hold for every function:

- a file appears at its final path only when it is complete (and verified, when a sha256 is known):
  data streams to ``<dest>.part`` and is moved into place with :func:`os.replace`;
- a failed check leaves nothing behind (no ``.part``, no half-extracted folder);
- every failure is a :class:`~bench.errors.BenchError` naming the url, file or archive member.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import secrets
import shutil
import socket
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Sequence

from tqdm.auto import tqdm

from bench.errors import ArchiveError, CheckpointError, DownloadError

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
    home = home.expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are gigabytes; never read them whole).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = p.write_bytes(b"abc")
        >>> sha256_file(p)[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- downloads ----------------------------------------------------------------------------------


class _RestartFromZero(Exception):
    """The server cannot continue our ``.part`` (416 Range Not Satisfiable): start again."""


def download(url: str | Sequence[str], dest: Path, *, sha256: str = "", progress: bool = True) -> Path:
    """Download ``url`` (or the first working mirror of a list) to ``dest``; returns ``dest``.

    Data streams to ``dest.name + ".part"``; an existing ``.part`` is resumed with an HTTP Range
    request (a server that ignores Range and answers 200 is read from the start again). With
    ``sha256`` the bytes are verified before ``dest`` appears; a mismatch deletes the ``.part`` and
    tries the next mirror. An existing ``dest`` that matches (or any ``dest`` when ``sha256`` is
    empty) is returned without network access.

    Example:
        >>> import tempfile
        >>> src = Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = src.write_bytes(b"weights")
        >>> out = download(src.as_uri(), src.with_name("copy.bin"), progress=False)
        >>> out.read_bytes()
        b'weights'
    """
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise DownloadError(f"no url given for {dest}")
    dest = Path(dest)
    expected = sha256.strip().lower()
    if dest.is_file():
        if not expected:
            return dest
        if sha256_file(dest) == expected:
            return dest
        # A stale or damaged copy: fetch again; it is replaced only once the new one is verified.
        log.warning("%s does not match sha256 %s; downloading it again", dest, expected)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    failures: list[str] = []
    for one_url in urls:
        try:
            actual = _fetch_verified(one_url, part, expected, progress, label=dest.name)
        except DownloadError as err:
            failures.append(f"  {one_url}: {err}")
            continue
        os.replace(part, dest)
        if not expected:
            log.info("downloaded %s from %s, sha256 %s (declare it to verify future downloads)",
                     dest, one_url, actual)
        return dest
    raise DownloadError(f"could not download {dest.name}; every url failed:\n" + "\n".join(failures))


def _fetch_verified(url: str, part: Path, expected: str, progress: bool, label: str) -> str:
    """Complete ``part`` from ``url`` and check its digest; returns the digest.

    A mismatch after resuming may come from a stale ``.part`` (another file, an old version), so
    the url gets one more try from zero before it is declared wrong.
    """
    for attempt in range(2):
        resumed_bytes = part.stat().st_size if part.exists() else 0
        try:
            actual = _stream_to_part(url, part, progress, label)
        except _RestartFromZero:
            part.unlink(missing_ok=True)
            actual = _stream_to_part(url, part, progress, label)
            resumed_bytes = 0
        if not expected or actual == expected:
            return actual
        part.unlink(missing_ok=True)
        if resumed_bytes == 0 or attempt == 1:
            raise DownloadError(f"sha256 mismatch for {url}: expected {expected}, got {actual}; "
                                f"the file was deleted")
        log.warning("sha256 mismatch after resuming %s; downloading it again from zero", url)
    raise AssertionError("unreachable")  # pragma: no cover


def _stream_to_part(url: str, part: Path, progress: bool, label: str) -> str:
    """Append the rest of ``url`` to ``part`` (resuming when possible); returns the full sha256."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "bench-seg"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            raise _RestartFromZero() from err
        raise DownloadError(f"HTTP {err.code} {err.reason} from {url}") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        # URLError wraps DNS/refused/timeout; ValueError is urllib's "unknown url type".
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot open {url}: {reason}") from err

    with response:
        status = response.status or 200  # file:// responses have no status
        if have and status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != have:
                raise DownloadError(f"{url} answered a Range request for byte {have} with bytes "
                                    f"from {start}; refusing to splice")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # a 200 answer is the whole file: start from zero
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        digest = hashlib.sha256()
        if have:
            with open(part, "rb") as old:
                for block in iter(lambda: old.read(CHUNK_BYTES), b""):
                    digest.update(block)
        total = have + remaining if remaining is not None else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=label, disable=not progress, leave=False)
        received = 0
        try:
            with open(part, mode) as out:
                received = _copy_stream(response, out, digest, bar, url)
        finally:
            bar.close()
    if remaining is not None and received < remaining:
        # Keep the .part: the next call resumes where this one stopped.
        raise DownloadError(f"connection to {url} closed after {have + received} of {total} bytes; "
                            f"run again to resume")
    return digest.hexdigest()


def _copy_stream(response: BinaryIO, out: BinaryIO, digest: "hashlib._Hash", bar: tqdm, url: str) -> int:
    """Copy ``response`` into ``out`` chunk by chunk, hashing as it goes; returns bytes copied."""
    received = 0
    while True:
        try:
            block = response.read(CHUNK_BYTES)
        except (socket.timeout, TimeoutError) as err:
            raise DownloadError(f"timed out after {SOCKET_TIMEOUT:g} s reading {url}; "
                                f"run again to resume") from err
        except (OSError, http.client.HTTPException) as err:  # reset, IncompleteRead, ...
            raise DownloadError(f"connection error reading {url}: {err!r}; run again to resume") from err
        if not block:
            return received
        try:
            out.write(block)
        except OSError as err:  # disk full, quota: the user's side, so say which file
            raise DownloadError(f"cannot write {out.name} while downloading {url}: {err}") from err
        digest.update(block)
        received += len(block)
        bar.update(len(block))


def _content_range_start(header: str) -> int | None:
    """First byte of ``Content-Range: bytes START-END/TOTAL`` (None when absent or malformed)."""
    try:
        return int(header.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


# ---- archives -----------------------------------------------------------------------------------

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract a .tar / .tar.gz / .tgz / .zip into ``target`` after checking every member.

    Refused (with :class:`ArchiveError` naming the archive and member, and nothing written):
    absolute paths, ``..`` components, links of any kind, device files and fifos. Entries are
    extracted into a temporary folder next to ``target`` and then moved into place.

    Example:
        >>> import io, tarfile, tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with tarfile.open(root / "a.tar", "w") as tar:
        ...     info = tarfile.TarInfo("data/hello.txt"); info.size = 2
        ...     tar.addfile(info, io.BytesIO(b"hi"))
        >>> (safe_extract(root / "a.tar", root / "out") / "data" / "hello.txt").read_text()
        'hi'
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise ArchiveError(f"archive not found: {archive}")
    if target.exists() and not target.is_dir():
        raise ArchiveError(f"cannot extract {archive} into {target}: it exists and is not a folder")
    name = archive.name.lower()
    if name.endswith(".zip"):
        extract_into = _extract_zip
    elif name.endswith(_TAR_SUFFIXES):
        extract_into = _extract_tar
    else:
        raise ArchiveError(f"unsupported archive type: {archive} (expected .tar, .tar.gz, .tgz or .zip)")

    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would become the mode of ``target`` after the rename.
    staging = target.parent / f".{target.name}.extract-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        extract_into(archive, staging)
        _move_tree(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _member_parts(archive: Path, member: str) -> list[str]:
    """Split a member name into safe path components, or raise ArchiveError."""
    # Backslashes are separators on Windows: treat them as such so "..\\x" cannot slip through.
    normalised = member.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise ArchiveError(f"archive {archive} has member {member!r} with an absolute path; refused")
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive {archive} has member {member!r} that climbs out with '..'; refused")
    if any("\0" in p for p in parts):
        raise ArchiveError(f"archive {archive} has member {member!r} with a NUL byte; refused")
    return parts


def _extract_tar(archive: Path, staging: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            # Check everything before writing anything: a refused archive leaves no trace.
            plan = []
            for m in members:
                parts = _member_parts(archive, m.name)
                if not (m.isfile() or m.isdir()):
                    kind = "link" if (m.issym() or m.islnk()) else "special file"
                    raise ArchiveError(f"archive {archive} has member {m.name!r} which is a {kind}"
                                       f"{' to ' + repr(m.linkname) if m.linkname else ''}; refused")
                plan.append((m, parts))
            for m, parts in plan:
                path = staging.joinpath(*parts)
                if m.isdir():
                    path.mkdir(parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(m)
                assert source is not None  # regular files always have a stream
                with source, open(path, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise ArchiveError(f"cannot extract {archive}: {err}") from err


def _extract_zip(archive: Path, staging: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            plan = []
            for info in infos:
                parts = _member_parts(archive, info.filename)
                # Unix file-type bits, when a unix tool made the zip (0 otherwise: a plain file).
                file_type = stat.S_IFMT(info.external_attr >> 16)
                if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                    kind = "link" if file_type == stat.S_IFLNK else "special file"
                    raise ArchiveError(f"archive {archive} has member {info.filename!r} which is a {kind}; refused")
                plan.append((info, parts))
            for info, parts in plan:
                path = staging.joinpath(*parts)
                if info.is_dir():
                    path.mkdir(parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(path, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ArchiveError(f"cannot extract {archive}: {err}") from err


def _move_tree(staging: Path, target: Path) -> None:
    """Move the staged entries into ``target``; existing folders are merged, files replaced."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(staging, target)  # the common case: one atomic rename of the whole tree
        return
    for entry in staging.iterdir():
        dest = target / entry.name
        if entry.is_dir() and dest.is_dir():
            _move_tree(entry, dest)
        else:
            if dest.is_dir():
                raise ArchiveError(f"cannot replace folder {dest} with a file from the archive")
            os.replace(entry, dest)


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
    dest = bench_home() / "checkpoints" / name / basename
    return download(weights.url, dest, sha256=weights.sha256, progress=progress)
