"""Safe extraction of .tar / .tar.gz / .tgz / .tar.bz2 / .tar.xz / .zip archives.

Split out of :mod:`bench.hub`, which re-exports :func:`safe_extract`. Standard library only. Every
extraction keeps these promises:

- the whole archive is checked before anything is written: member names, member types, encryption,
  compression methods, stream integrity and the size limits (:func:`extract_limits`);
- members are written to a staging folder, then moved into the target all-or-nothing: a clash or a
  failed move leaves the target exactly as it was;
- every failure is a one-line :class:`~bench.errors.ArchiveError` naming the archive (and member),
  and no staging folder is left behind.
"""
from __future__ import annotations

import lzma
import os
import re
import secrets
import shutil
import stat
import tarfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from bench.errors import ArchiveError

#: Default cap on the total uncompressed size of one archive. The official ddpm-segmentation
#: tarball extracts to a few GB; 64 GiB leaves an order of magnitude of room and still stops a
#: bomb before it fills an ordinary disk. ``$BENCH_MAX_EXTRACT_BYTES`` overrides it.
MAX_EXTRACT_BYTES = 64 << 30
#: Default cap on total uncompressed size / archive size. PNG and JPEG do not compress further
#: (about 1x), so image datasets expand by a few times at most; even an archive of nothing but
#: uint8 ``.npy`` label maps expands about 80x. Deflate bombs reach about 1000x (bzip2 and xz far
#: more), so 200 refuses them with a wide margin for real data. ``$BENCH_MAX_EXTRACT_RATIO`` overrides it.
MAX_EXTRACT_RATIO = 200.0
#: read size for copying members
CHUNK_BYTES = 1 << 20

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
ZIP_SUFFIXES = (".zip",)
#: compression methods Python's zipfile can read
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# What a damaged stream raises: lzma and zlib errors are not OSErrors, and tarfile lets them through.
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError, lzma.LZMAError, zlib.error)


@dataclass
class _Member:
    name: str  # as written in the archive, for messages
    parts: list[str]  # safe path components below the target
    is_dir: bool
    size: int  # uncompressed bytes the header declares
    open: Callable[[], IO[bytes]]


def safe_extract(archive: Path, target: Path, *, max_bytes: int | None = None,
                 max_ratio: float | None = None) -> Path:
    """Extract a .tar(.gz/.bz2/.xz), .tgz or .zip ``archive`` into the folder ``target``; returns ``target``.

    Refused with :class:`ArchiveError`, before anything is written: absolute paths, ``..``
    components, links, device files and fifos, a file and a folder of the same name, encrypted or
    unreadable zip members, damaged streams, and archives whose members declare more than
    ``max_bytes`` in total or more than ``max_ratio`` times the archive's size. The limits default
    to ``$BENCH_MAX_EXTRACT_BYTES`` / ``$BENCH_MAX_EXTRACT_RATIO``, else 64 GiB and 200 (see
    :data:`MAX_EXTRACT_BYTES` and :data:`MAX_EXTRACT_RATIO` for why). Members are also counted
    while they are copied, so one holding more than its header declares is stopped there.

    Existing folders in ``target`` are merged into and existing files replaced; a file of the
    archive where ``target`` has a folder (or the reverse) is refused with ``target`` untouched.
    ``target`` may be a symlink to a folder (a dataset folder on a bigger disk).

    Example:
        >>> import io, tarfile, tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with tarfile.open(root / "a.tar.xz", "w:xz") as tar:
        ...     info = tarfile.TarInfo("data/hello.txt"); info.size = 2
        ...     tar.addfile(info, io.BytesIO(b"hi"))
        >>> (safe_extract(root / "a.tar.xz", root / "out") / "data" / "hello.txt").read_text()
        'hi'
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise ArchiveError(f"archive not found: {archive}")
    name = archive.name.lower()
    if name.endswith(ZIP_SUFFIXES):
        read_members = _zip_members
    elif name.endswith(TAR_SUFFIXES):
        read_members = _tar_members
    else:
        accepted = ", ".join(TAR_SUFFIXES) + " or " + ", ".join(ZIP_SUFFIXES)
        raise ArchiveError(f"unsupported archive type: {archive} (expected {accepted})")
    max_bytes, max_ratio = extract_limits(max_bytes, max_ratio)
    cap = min(max_bytes, max_ratio * max(archive.stat().st_size, 1))
    folder = _target_folder(archive, target)

    def check_total(total: int) -> None:
        if total > cap:
            raise ArchiveError(_over_limit(archive, total, max_bytes, max_ratio))

    try:
        with read_members(archive, check_total) as members:
            staging = _make_staging(archive, folder)
            try:
                _write_members(archive, members, staging)
                _merge(archive, staging, folder, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except ArchiveError:
        raise
    except _READ_ERRORS as err:
        lines = str(err).splitlines()  # tarfile's "r:*" error lists one line per method tried
        reason = lines[0].rstrip(":") if lines else type(err).__name__
        raise ArchiveError(f"cannot extract {archive}: it is damaged, incomplete or not a valid "
                           f"archive ({reason}); delete it and download it again") from err
    return target


def extract_limits(max_bytes: int | None = None, max_ratio: float | None = None) -> tuple[int, float]:
    """The extraction caps: the arguments when given, else the environment, else the defaults.

    ``$BENCH_MAX_EXTRACT_BYTES`` takes a number of bytes with an optional K/M/G/T suffix (powers of
    1024: ``100G``); ``$BENCH_MAX_EXTRACT_RATIO`` a number.

    Example:
        >>> import os
        >>> os.environ["BENCH_MAX_EXTRACT_BYTES"] = "100G"
        >>> extract_limits(max_ratio=50)
        (107374182400, 50.0)
        >>> del os.environ["BENCH_MAX_EXTRACT_BYTES"]
    """
    if max_bytes is None:
        max_bytes = int(_env_limit("BENCH_MAX_EXTRACT_BYTES", MAX_EXTRACT_BYTES, units=True))
    if max_ratio is None:
        max_ratio = _env_limit("BENCH_MAX_EXTRACT_RATIO", MAX_EXTRACT_RATIO, units=False)
    return max_bytes, float(max_ratio)


def _env_limit(variable: str, default: float, units: bool) -> float:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    pattern = r"(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?" if units else r"(\d+(?:\.\d*)?)()"
    match = re.fullmatch(pattern, raw, re.IGNORECASE)
    value = float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " ") if match else 0
    if value <= 0:
        example = "a number of bytes such as 100G" if units else "a number such as 500"
        raise ArchiveError(f"{variable}={raw!r} is not a valid limit; use {example}, or unset it for the default")
    return value


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _over_limit(archive: Path, total: int, max_bytes: int, max_ratio: float) -> str:
    size = max(archive.stat().st_size, 1)
    if total > max_bytes:
        return (f"refusing to extract {archive}: its members declare at least {_human(total)}, more than "
                f"the limit of {_human(max_bytes)}; if you trust it, raise BENCH_MAX_EXTRACT_BYTES "
                f"(e.g. BENCH_MAX_EXTRACT_BYTES={-(-total * 2 // (1 << 30))}G) or pass max_bytes")
    return (f"refusing to extract {archive}: its {_human(size)} would expand to at least {_human(total)} "
            f"({total / size:.0f}x), more than the limit of {max_ratio:g}x (a decompression bomb?); if you "
            f"trust it, raise BENCH_MAX_EXTRACT_RATIO (e.g. BENCH_MAX_EXTRACT_RATIO={2 * total // size}) "
            f"or pass max_ratio")


# ---- reading: every check happens here, before anything is written --------------------------------


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


class _Layout:
    """Collects members, refusing a name used for both a file and a folder (it could not be written)."""

    def __init__(self, archive: Path) -> None:
        self.archive, self.kinds, self.members = archive, {}, []  # kinds: path -> is_dir

    def add(self, member: _Member) -> None:
        if not member.parts and not member.is_dir:
            raise ArchiveError(f"archive {self.archive} has file member {member.name!r} without a name; refused")
        paths = [tuple(member.parts[:i]) for i in range(1, len(member.parts))]
        for path, is_dir in [(p, True) for p in paths] + [(tuple(member.parts), member.is_dir)]:
            if self.kinds.setdefault(path, is_dir) != is_dir:
                raise ArchiveError(f"archive {self.archive} has {'/'.join(path)!r} both as a file and as a "
                                   f"folder (member {member.name!r}); refused")
        self.members.append(member)


@contextmanager
def _tar_members(archive: Path, check_total: Callable[[int], None]) -> Iterator[list[_Member]]:
    with tarfile.open(archive, "r:*") as tar:
        layout, total = _Layout(archive), 0
        # Iterate instead of getmembers(): a bomb is refused once the declared sizes pass the cap,
        # before the rest of its stream is decompressed.
        for m in tar:
            if not (m.isfile() or m.isdir()):
                kind = "link" if (m.issym() or m.islnk()) else "special file"
                raise ArchiveError(f"archive {archive} has member {m.name!r} which is a {kind}"
                                   f"{' to ' + repr(m.linkname) if m.linkname else ''}; refused")
            total += m.size if m.isfile() else 0
            check_total(total)
            layout.add(_Member(m.name, _member_parts(archive, m.name), m.isdir(), m.size,
                               lambda m=m: tar.extractfile(m)))  # type: ignore[misc]
        # tarfile stops at the end-of-archive marker, before the gzip/bzip2/xz trailer holding the
        # stream's checksum: read to the end so a corrupted stream fails here, not silently.
        if tar.fileobj is not None:
            while tar.fileobj.read(CHUNK_BYTES):
                pass
        yield layout.members


@contextmanager
def _zip_members(archive: Path, check_total: Callable[[int], None]) -> Iterator[list[_Member]]:
    with zipfile.ZipFile(archive) as zf:
        layout, total = _Layout(archive), 0
        for info in zf.infolist():
            parts = _member_parts(archive, info.filename)
            # Unix file-type bits, when a unix tool made the zip (0 otherwise: a plain file).
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                kind = "link" if file_type == stat.S_IFLNK else "special file"
                raise ArchiveError(f"archive {archive} has member {info.filename!r} which is a {kind}; refused")
            # zipfile would raise RuntimeError / NotImplementedError half-way through: check up front.
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive {archive} has member {info.filename!r} which is encrypted; "
                                   f"password-protected archives are not supported (re-pack it without one)")
            if info.compress_type not in _ZIP_METHODS:
                raise ArchiveError(f"archive {archive} has member {info.filename!r} compressed with method "
                                   f"{info.compress_type}, which Python cannot read (re-pack it with deflate)")
            total += 0 if info.is_dir() else info.file_size
            check_total(total)
            layout.add(_Member(info.filename, parts, info.is_dir(), info.file_size,
                               lambda info=info: zf.open(info)))  # type: ignore[misc]
        yield layout.members


# ---- writing --------------------------------------------------------------------------------------


def _target_folder(archive: Path, target: Path) -> Path:
    """The real folder to extract into (a symlink followed); it may not exist yet."""
    if target.is_symlink() and not target.exists():
        raise ArchiveError(f"cannot extract {archive} into {target}: it is a symlink to {os.readlink(target)}, "
                           f"which does not exist; create that folder or remove the link")
    if target.exists() and not target.is_dir():
        what = f"it is a symlink to {target.resolve()}, which is not a folder" if target.is_symlink() else \
            "it exists and is not a folder"
        raise ArchiveError(f"cannot extract {archive} into {target}: {what}; remove it or choose another target")
    # Resolved so that the staging folder lands on the same disk as the real folder (renames only).
    return target.resolve() if target.is_symlink() else target


def _make_staging(archive: Path, folder: Path) -> Path:
    token = f"extract-{os.getpid()}-{secrets.token_hex(4)}"
    # Inside an existing target (same disk, surely writable); otherwise next to the new one. Not
    # tempfile.mkdtemp: its 0700 mode would become the mode of the target after the rename.
    staging = folder / f".{token}" if folder.is_dir() else folder.parent / f".{folder.name}.{token}"
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        raise ArchiveError(f"cannot extract {archive}: cannot create {staging}: {err}") from err
    return staging


def _write_members(archive: Path, members: list[_Member], staging: Path) -> None:
    for member in members:
        path = staging.joinpath(*member.parts)
        try:
            if member.is_dir:
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            out = open(path, "wb")
        except OSError as err:
            raise ArchiveError(f"cannot write {path} while extracting {archive}: {err}") from err
        with out, member.open() as source:
            _copy_member(archive, member, source, out)


def _copy_member(archive: Path, member: _Member, source: IO[bytes], out: IO[bytes]) -> None:
    """Copy one member, holding it to the size its header declares."""
    # The declared sizes passed the caps, so holding each member to its own size bounds the total:
    # a header that lies is caught at its first extra byte, not after the disk is full.
    copied = 0
    while block := source.read(CHUNK_BYTES):
        copied += len(block)
        if copied > member.size:
            raise ArchiveError(f"archive {archive} has member {member.name!r} holding more than the "
                               f"{member.size} bytes its header declares; refused (damaged or a decompression bomb)")
        try:
            out.write(block)
        except OSError as err:  # disk full, quota: the user's side, so say which file
            raise ArchiveError(f"cannot write {out.name} while extracting {archive}: {err}") from err


def _merge(archive: Path, staging: Path, folder: Path, target: Path) -> None:
    """Move the staged tree into ``folder`` all-or-nothing: folders merge, files replace files."""
    if not folder.exists():
        try:
            os.replace(staging, folder)  # the common case: one atomic rename of the whole tree
        except OSError as err:
            raise ArchiveError(f"cannot move the files of {archive} into {target}: {err}") from err
        return
    moves: list[tuple[Path, Path]] = []
    _plan_merge(archive, staging, folder, target, folder, moves)  # raises before anything moves
    journal: list[tuple[Path, Path]] = []  # renames done, undone in reverse on failure
    try:
        for n, (source, dest) in enumerate(moves):
            if os.path.lexists(dest):  # a replaced file waits in staging until everything has moved
                backup = staging / f"{staging.name}.replaced-{n}"  # a name no member can take
                os.replace(dest, backup)
                journal.append((dest, backup))
            os.replace(source, dest)
            journal.append((source, dest))
    except BaseException as err:  # also Ctrl-C: never leave a half-merged target
        stuck = []
        for before, after in reversed(journal):
            try:
                os.replace(after, before)
            except OSError:  # pragma: no cover - the disk failed twice
                stuck.append(after)
        if stuck:  # pragma: no cover - keep the replaced files: the caller deletes the staging folder
            kept = staging.with_name(staging.name.replace(".extract-", ".recover-"))
            os.replace(staging, kept)
            raise ArchiveError(f"cannot move the files of {archive} into {target} ({err}), nor all of them back: "
                               f"{len(stuck)} paths could not be restored; the replaced files are in {kept}") from err
        if not isinstance(err, OSError):
            raise
        raise ArchiveError(f"cannot move the files of {archive} into {target}: {err}; "
                           f"{target} was left as it was") from err


def _plan_merge(archive: Path, staged: Path, dest_dir: Path, target: Path, folder: Path,
                moves: list[tuple[Path, Path]]) -> None:
    for entry in sorted(staged.iterdir()):
        dest = dest_dir / entry.name
        shown = target / dest.relative_to(folder)  # the path as the user named it
        if entry.is_dir() and dest.is_dir():  # is_dir follows links: a linked sub-folder is merged into
            _plan_merge(archive, entry, dest, target, folder, moves)
        elif entry.is_dir() and os.path.lexists(dest):
            raise ArchiveError(f"cannot extract {archive} into {target}: the archive has a folder where {shown} "
                               f"is a file; nothing was changed (move or delete {shown}, or extract elsewhere)")
        elif not entry.is_dir() and dest.is_dir():
            raise ArchiveError(f"cannot extract {archive} into {target}: the archive has a file where {shown} "
                               f"is a folder; nothing was changed (move or delete {shown}, or extract elsewhere)")
        else:
            moves.append((entry, dest))
