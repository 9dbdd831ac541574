"""Downloads against a real HTTP server on 127.0.0.1, archive extraction, checkpoint lookup."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import tarfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench import hub
from bench.contract import Weights
from bench.errors import ArchiveError, CheckpointError, DownloadError

PAYLOAD = bytes(range(256)) * 400  # 100 KiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ---- a small file server with Range support and a log of what it sent ----------------------------


@dataclass
class Served:
    path: str
    range: str | None
    status: int
    body_bytes: int


@dataclass
class FileServer:
    base: str
    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: bool = False
    stall_seconds: float = 0.0
    cut_after: int | None = None  # send only this many body bytes, then hang up
    no_length: bool = False  # send no Content-Length: the body ends when the connection closes
    wrong_start: bool = False  # answer a Range request with a 206 starting at byte 0
    log: list[Served] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        state: FileServer = self.server.state  # type: ignore[attr-defined]
        if state.stall_seconds:
            time.sleep(state.stall_seconds)
        name = self.path.lstrip("/")
        body = state.files.get(name)
        asked = self.headers.get("Range")
        if body is None:
            state.log.append(Served(name, asked, 404, 0))
            self.send_error(404, "Not Found")
            return
        start = 0
        if asked and not state.ignore_range:
            start = int(asked.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                state.log.append(Served(name, asked, 416, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")  # as RFC 9110 asks
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        status = 206 if start or (asked and state.wrong_start) else 200
        if state.wrong_start:
            start = 0
        payload = body[start:]
        self.send_response(status)
        if not state.no_length:
            self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if state.cut_after is not None:
            payload = payload[: state.cut_after]
        # Log before sending: the client may finish reading (and the test assert on the log) before
        # this thread runs again after the write.
        state.log.append(Served(name, asked, status, len(payload)))
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            return

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server(monkeypatch):
    # A proxy configured on the machine must not intercept requests to our local server.
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    state = FileServer(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    return hub.bench_home()


# ---- downloads ----------------------------------------------------------------------------------


def test_bench_home_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.bench_home() == tmp_path / "xdg" / "bench"
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "mine"))
    assert hub.bench_home() == tmp_path / "mine" and (tmp_path / "mine").is_dir()


def test_download_with_sha256(server, cache):
    server.files["w.pt"] = PAYLOAD
    dest = cache / "checkpoints" / "w.pt"
    assert hub.download(server.url("w.pt"), dest, sha256=PAYLOAD_SHA, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["w.pt"]  # no .part left
    # A verified file in place is reused without touching the network.
    hub.download(server.url("w.pt"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert len(server.log) == 1


def test_sha256_mismatch_leaves_nothing(server, cache):
    server.files["w.pt"] = PAYLOAD[:-1] + b"X"  # corrupted copy
    folder = cache / "checkpoints"
    dest = folder / "w.pt"
    with pytest.raises(DownloadError) as err:
        hub.download(server.url("w.pt"), dest, sha256=PAYLOAD_SHA, progress=False)
    message = str(err.value)
    assert server.url("w.pt") in message and PAYLOAD_SHA in message
    assert hashlib.sha256(server.files["w.pt"]).hexdigest() in message
    assert list(folder.iterdir()) == []


def test_resume_asks_only_for_the_remainder(server, cache):
    server.files["w.pt"] = PAYLOAD
    dest = cache / "w.pt"
    half = len(PAYLOAD) // 2
    dest.with_name("w.pt.part").write_bytes(PAYLOAD[:half])
    hub.download(server.url("w.pt"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [(s.range, s.status, s.body_bytes) for s in server.log] == [
        (f"bytes={half}-", 206, len(PAYLOAD) - half)
    ]


def test_interrupted_download_resumes_on_next_call(server, cache):
    server.files["w.pt"] = PAYLOAD
    dest = cache / "w.pt"
    server.cut_after = 1000
    with pytest.raises(DownloadError, match="resume"):
        hub.download(server.url("w.pt"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.with_name("w.pt.part").stat().st_size == 1000 and not dest.exists()
    server.cut_after = None
    hub.download(server.url("w.pt"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.log[-1].range == "bytes=1000-"


def test_server_ignoring_range_restarts_from_zero(server, cache):
    server.files["w.pt"] = PAYLOAD
    server.ignore_range = True
    dest = cache / "w.pt"
    dest.with_name("w.pt.part").write_bytes(PAYLOAD[:5000])
    # No sha256: appending the 200 body to the .part would go unnoticed, so content must be checked.
    hub.download(server.url("w.pt"), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [s.status for s in server.log] == [200]


def test_stale_part_is_discarded_when_sha_fails(server, cache):
    server.files["w.pt"] = PAYLOAD
    dest = cache / "w.pt"
    dest.with_name("w.pt.part").write_bytes(b"\xff" * 5000)  # left over from another file
    hub.download(server.url("w.pt"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [s.range for s in server.log] == ["bytes=5000-", None]


def test_404_names_url_and_status(server, cache):
    with pytest.raises(DownloadError) as err:
        hub.download(server.url("missing.pt"), cache / "m.pt", progress=False)
    assert server.url("missing.pt") in str(err.value) and "404" in str(err.value)
    assert list(cache.iterdir()) == []


def test_mirror_fallback_and_all_mirrors_failing(server, cache):
    server.files["w.pt"] = PAYLOAD
    dest = cache / "w.pt"
    hub.download([server.url("gone.pt"), server.url("w.pt")], dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(DownloadError) as err:
        hub.download([server.url("a.pt"), server.url("b.pt")], cache / "x.pt", progress=False)
    assert server.url("a.pt") in str(err.value) and server.url("b.pt") in str(err.value)
    assert "\n" not in str(err.value)  # one line, like every BenchError


def test_timeout_is_a_download_error(server, cache, monkeypatch):
    server.files["w.pt"] = PAYLOAD
    server.stall_seconds = 1.0
    monkeypatch.setattr(hub, "SOCKET_TIMEOUT", 0.2)
    with pytest.raises(DownloadError, match="timed out") as err:
        hub.download(server.url("w.pt"), cache / "w.pt", progress=False)
    assert server.url("w.pt") in str(err.value)


def test_stale_destination_is_replaced(server, cache):
    server.files["w.pt"] = PAYLOAD
    dest = cache / "w.pt"
    dest.write_bytes(b"old version")
    hub.download(server.url("w.pt"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def _listing(folder: Path) -> list[str]:
    """Every path under ``folder``, relative, sorted (to show that nothing was left behind)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_unknown_size_without_sha256_is_never_promoted(server, cache):
    server.files["d.tar.gz"] = PAYLOAD
    server.no_length = True
    folder = cache / "downloads"
    dest = folder / "d.tar.gz"
    with pytest.raises(DownloadError) as err:
        hub.download(server.url("d.tar.gz"), dest, progress=False)
    message = str(err.value)
    assert server.url("d.tar.gz") in message and "sha256" in message and "\n" not in message
    assert _listing(folder) == []  # no dest, no .part, no sidecar
    # A truncated body cannot pass a declared sha256 either, and is deleted.
    server.cut_after = 1000
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        hub.download(server.url("d.tar.gz"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert _listing(folder) == []
    server.cut_after = None
    assert hub.download(server.url("d.tar.gz"), dest, sha256=PAYLOAD_SHA, progress=False).read_bytes() == PAYLOAD


def test_first_download_records_sha256_and_later_calls_check_it(server, cache, caplog):
    server.files["w.pt"] = PAYLOAD
    dest = cache / "w.pt"
    sidecar = cache / "w.pt.sha256"
    hub.download(server.url("w.pt"), dest, progress=False)
    assert sidecar.read_text() == f"{PAYLOAD_SHA}  w.pt\n"  # sha256sum format
    assert _listing(cache) == ["w.pt", "w.pt.sha256"]
    hub.download(server.url("w.pt"), dest, progress=False)
    assert len(server.log) == 1  # verified against the record: no network

    dest.write_bytes(b"\0" * len(PAYLOAD))  # damaged in the cache
    with caplog.at_level(logging.WARNING, logger="bench.hub"):
        hub.download(server.url("w.pt"), dest, progress=False)
    assert "w.pt.sha256" in caplog.text and "downloading it again" in caplog.text
    assert dest.read_bytes() == PAYLOAD and len(server.log) == 2 and server.log[-1].range is None
    assert sidecar.read_text().startswith(PAYLOAD_SHA)

    # A declared sha256 wins over a (wrong) record, which is corrected.
    sidecar.write_text("0" * 64 + "  w.pt\n")
    hub.download(server.url("w.pt"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert len(server.log) == 2 and sidecar.read_text().startswith(PAYLOAD_SHA)


@pytest.mark.parametrize("kept", [len(PAYLOAD) // 3, len(PAYLOAD)], ids=["truncated", "complete"])
def test_unrecorded_cache_file_is_checked_against_the_server(server, cache, kept):
    # A file from an older version (no sidecar, no declared sha256) may be a truncated download.
    server.files["w.pt"] = PAYLOAD
    dest = cache / "w.pt"
    dest.write_bytes(PAYLOAD[:kept])
    assert hub.download(server.url("w.pt"), dest, progress=False).read_bytes() == PAYLOAD
    status, body = (206, len(PAYLOAD) - kept) if kept < len(PAYLOAD) else (416, 0)
    assert [(s.range, s.status, s.body_bytes) for s in server.log] == [(f"bytes={kept}-", status, body)]
    assert (cache / "w.pt.sha256").read_text().startswith(PAYLOAD_SHA)
    assert _listing(cache) == ["w.pt", "w.pt.sha256"]


def test_unrecorded_cache_file_is_kept_resumable_when_the_server_is_down(server, cache):
    dest = cache / "w.pt"
    dest.write_bytes(PAYLOAD)
    with pytest.raises(DownloadError) as err:
        hub.download(server.url("w.pt"), dest, progress=False)  # not served: 404
    message = str(err.value)
    assert "404" in message and "moved to w.pt.part" in message and "sha256sum w.pt > w.pt.sha256" in message
    assert _listing(cache) == ["w.pt.part"] and (cache / "w.pt.part").read_bytes() == PAYLOAD
    server.files["w.pt"] = PAYLOAD  # back online: the next run confirms it without a body
    hub.download(server.url("w.pt"), dest, progress=False)
    assert [s.status for s in server.log] == [404, 416] and dest.read_bytes() == PAYLOAD

def test_other_content_range_restarts_from_zero(server, cache):
    server.files["w.pt"] = PAYLOAD
    server.wrong_start = True
    dest = cache / "w.pt"
    dest.with_name("w.pt.part").write_bytes(b"\xff" * 5000)
    hub.download(server.url("w.pt"), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [(s.range, s.status) for s in server.log] == [("bytes=5000-", 206), (None, 200)]
    assert _listing(cache) == ["w.pt", "w.pt.sha256"]


@pytest.mark.parametrize("blocker", ["w.pt", "w.pt.part"])
def test_cache_entry_in_the_way_names_the_file_to_delete(server, cache, blocker):
    server.files["w.pt"] = PAYLOAD
    (cache / blocker).mkdir()
    (cache / blocker / "x").write_bytes(b"")
    with pytest.raises(DownloadError) as err:
        hub.download(server.url("w.pt"), cache / "w.pt", progress=False)
    message = str(err.value)
    assert str(cache / blocker) in message and "delete it" in message and "\n" not in message
    assert server.log == []


def test_interrupted_download_names_the_part_file(server, cache):
    server.files["w.pt"] = PAYLOAD
    server.cut_after = 1000
    with pytest.raises(DownloadError) as err:
        hub.download(server.url("w.pt"), cache / "w.pt", progress=False)
    assert "resume" in str(err.value) and str(cache / "w.pt.part") in str(err.value)
    assert _listing(cache) == ["w.pt.part"]  # resumable: kept


def test_progress_off_a_terminal_is_not_a_tqdm_bar(server, cache, capsys):
    server.files["w.pt"] = PAYLOAD
    hub.download(server.url("w.pt"), cache / "w.pt", sha256=PAYLOAD_SHA, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) <= 1


# ---- archives -----------------------------------------------------------------------------------


def _tar(path: Path, members: list[tarfile.TarInfo], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        good = tarfile.TarInfo("good.txt")
        good.size = 4
        tar.addfile(good, io.BytesIO(b"good"))  # a harmless member first: it must not be written either
        for m in members:
            tar.addfile(m, io.BytesIO(b"evil") if m.isfile() else None)
    return path


def _file_member(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


def _link_member(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


ABSOLUTE = f"/tmp/bench-evil-{uuid.uuid4().hex}"


@pytest.mark.parametrize(
    "member, shown",
    [
        (_file_member("../evil"), "../evil"),
        (_file_member("data/../../evil"), "data/../../evil"),
        (_file_member(ABSOLUTE), ABSOLUTE),
        (_link_member("passwd", "/etc/passwd", tarfile.SYMTYPE), "passwd"),
        (_link_member("hard", "/etc/passwd", tarfile.LNKTYPE), "hard"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink"],
)
def test_malicious_tar_is_refused_without_trace(tmp_path, member, shown):
    work = tmp_path / "work"
    work.mkdir()
    archive = _tar(work / "bad.tar.gz", [member], mode="w:gz")
    with pytest.raises(ArchiveError) as err:
        hub.safe_extract(archive, work / "out")
    assert "bad.tar.gz" in str(err.value) and shown in str(err.value)
    assert sorted(p.name for p in work.iterdir()) == ["bad.tar.gz"]  # no target, no staging folder
    assert not (tmp_path / "evil").exists() and not Path(ABSOLUTE).exists()


def test_malicious_zip_is_refused_without_trace(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with zipfile.ZipFile(work / "bad.zip", "w") as zf:
        zf.writestr("good.txt", b"good")
        zf.writestr("../evil", b"evil")
    with pytest.raises(ArchiveError, match=r"bad\.zip.*\.\./evil"):
        hub.safe_extract(work / "bad.zip", work / "out")
    assert sorted(p.name for p in work.iterdir()) == ["bad.zip"]
    assert not (tmp_path / "evil").exists()


def test_zip_symlink_is_refused(tmp_path):
    link = zipfile.ZipInfo("passwd")
    link.external_attr = (0o120777 << 16)  # S_IFLNK: how unix zip tools store a symlink
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ArchiveError, match="passwd.*link"):
        hub.safe_extract(tmp_path / "link.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_good_tar_gz_and_zip_extract(tmp_path):
    with tarfile.open(tmp_path / "data.tgz", "w:gz") as tar:
        for name, data in [("ds/real/train/a.png", b"A"), ("ds/real/train/a.npy", b"B")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = hub.safe_extract(tmp_path / "data.tgz", tmp_path / "out")
    assert (out / "ds/real/train/a.png").read_bytes() == b"A"
    assert (out / "ds/real/train/a.npy").read_bytes() == b"B"

    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:
        zf.writestr("ds/real/test/b.png", b"C")
    # Extracting into a folder that already has content merges into it.
    hub.safe_extract(tmp_path / "more.zip", out)
    assert (out / "ds/real/test/b.png").read_bytes() == b"C"
    assert (out / "ds/real/train/a.png").read_bytes() == b"A"
    assert not [p for p in tmp_path.rglob("*") if ".extract-" in p.name]


def test_corrupt_archive_is_an_archive_error(tmp_path):
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ArchiveError, match="broken.tar.gz"):
        hub.safe_extract(tmp_path / "broken.tar.gz", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.tar.gz"]


def _snapshot(folder: Path) -> dict[str, object]:
    """Every path under ``folder`` with its content (files), link target (links) or None (folders)."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        key = p.relative_to(folder).as_posix()
        out[key] = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
    return out


def _tar_of(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_safe_extract_is_reexported_by_hub():
    from bench import archives

    assert hub.safe_extract is archives.safe_extract


@pytest.mark.parametrize("suffix, mode", [("tar.bz2", "w:bz2"), ("tar.xz", "w:xz"), ("tar", "w")])
def test_bz2_and_xz_tarballs_extract(tmp_path, suffix, mode):
    archive = _tar_of(tmp_path / f"data.{suffix}", {"ds/a.npy": b"A" * 100}, mode)
    assert (hub.safe_extract(archive, tmp_path / "out") / "ds/a.npy").read_bytes() == b"A" * 100


def test_unsupported_type_lists_every_accepted_suffix(tmp_path):
    (tmp_path / "data.rar").write_bytes(b"Rar!")
    with pytest.raises(ArchiveError) as err:
        hub.safe_extract(tmp_path / "data.rar", tmp_path / "out")
    for suffix in (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip"):
        assert suffix in str(err.value)


def _flip_middle(path: Path) -> Path:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0x55
    path.write_bytes(raw)
    return path


TEXT = b"".join(b"row %d of a label file\n" % i for i in range(20000))


@pytest.mark.parametrize("suffix, mode, content, damage", [
    ("tar.xz", "w:xz", TEXT, "flip"),
    ("tar.xz", "w:xz", os.urandom(200_000), "flip"),  # lzma finds nothing wrong until the checksum
    ("tar.xz", "w:xz", TEXT, "truncate"),
    ("tar.bz2", "w:bz2", TEXT, "flip"),
    ("tar.bz2", "w:bz2", TEXT, "garbage"),
    ("tar.gz", "w:gz", os.urandom(200_000), "flip"),  # only the gzip CRC shows it
    ("tar.gz", "w:gz", TEXT, "truncate"),
], ids=["xz-flip", "xz-flip-stored", "xz-truncated", "bz2-flip", "bz2-garbage", "gz-flip-stored", "gz-truncated"])
def test_corrupt_archives_are_one_line_errors(tmp_path, suffix, mode, content, damage):
    work = tmp_path / "work"
    work.mkdir()
    archive = _tar_of(work / f"data.{suffix}", {"ds/a.txt": content, "ds/b.txt": content}, mode)
    if damage == "flip":
        _flip_middle(archive)
    elif damage == "truncate":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    else:
        archive.write_bytes(b"BZh9 not bzip2 at all" * 10)
    with pytest.raises(ArchiveError) as err:
        hub.safe_extract(archive, work / "out")
    message = str(err.value)
    assert str(archive) in message and "delete it" in message and "\n" not in message
    assert _listing(work) == [archive.name]


def _zip_patched(path: Path, field: str, value: int) -> Path:
    """A zip whose second member, "data.bin", has its flag bits or compression method replaced.

    zipfile cannot write such members itself (it resets the encryption bit, refuses unknown methods).
    """
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("good.txt", b"good")
        zf.writestr("data.bin", b"data")
    raw = path.read_bytes()
    # (signature, offset of the flag bits, offset of the method) in the local and central headers
    for signature, flags_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = raw.index(signature, raw.index(signature) + 1) + (flags_at if field == "flags" else method_at)
        raw = raw[:at] + struct.pack("<H", value) + raw[at + 2:]
    path.write_bytes(raw)
    return path


def test_encrypted_or_unreadable_zip_members_are_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    _zip_patched(work / "enc.zip", "flags", 0x1)  # encrypted: zipfile raises RuntimeError on reading
    with pytest.raises(ArchiveError, match=r"enc\.zip.*'data\.bin'.*encrypted"):
        hub.safe_extract(work / "enc.zip", work / "out")
    _zip_patched(work / "ppmd.zip", "method", 98)  # PPMd: zipfile raises NotImplementedError
    with pytest.raises(ArchiveError, match=r"ppmd\.zip.*'data\.bin'.*method 98"):
        hub.safe_extract(work / "ppmd.zip", work / "out")
    assert _listing(work) == ["enc.zip", "ppmd.zip"]


def _bomb(path: Path, n_bytes: int) -> Path:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("ds/zeros.npy", b"\0" * n_bytes)
        return path
    return _tar_of(path, {"ds/zeros.npy": b"\0" * n_bytes})


@pytest.mark.parametrize("name", ["bomb.tar.gz", "bomb.zip"])
def test_expansion_ratio_is_capped(tmp_path, monkeypatch, name):
    work = tmp_path / "work"
    work.mkdir()
    archive = _bomb(work / name, 4 << 20)  # 4 MiB of zeros: about 1000x smaller once deflated
    with pytest.raises(ArchiveError) as err:
        hub.safe_extract(archive, work / "out")
    message = str(err.value)
    assert str(archive) in message and "4.0 MiB" in message and "BENCH_MAX_EXTRACT_RATIO" in message
    assert "\n" not in message and _listing(work) == [name]
    monkeypatch.setenv("BENCH_MAX_EXTRACT_RATIO", "5000")
    assert (hub.safe_extract(archive, work / "out") / "ds/zeros.npy").stat().st_size == 4 << 20


def test_total_size_is_capped(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    archive = _tar_of(work / "big.tar", {"a.bin": os.urandom(3 << 20)}, "w")
    monkeypatch.setenv("BENCH_MAX_EXTRACT_BYTES", "2M")
    with pytest.raises(ArchiveError) as err:
        hub.safe_extract(archive, work / "out")
    message = str(err.value)
    assert str(archive) in message and "3.0 MiB" in message and "2.0 MiB" in message
    assert "BENCH_MAX_EXTRACT_BYTES" in message and _listing(work) == ["big.tar"]
    # An explicit argument wins over the environment.
    assert (hub.safe_extract(archive, work / "out", max_bytes=4 << 20) / "a.bin").stat().st_size == 3 << 20

    monkeypatch.setenv("BENCH_MAX_EXTRACT_BYTES", "lots")
    with pytest.raises(ArchiveError, match="BENCH_MAX_EXTRACT_BYTES='lots'"):
        hub.safe_extract(archive, work / "again")


def test_member_larger_than_its_header_is_stopped(tmp_path, monkeypatch):
    # Headers can lie: a reader that yields more than the header declared must be cut off.
    work = tmp_path / "work"
    work.mkdir()
    archive = _tar_of(work / "liar.tar.gz", {"ds/a.bin": b"x" * 100})
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, member: io.BytesIO(b"x" * (5 << 20)))
    with pytest.raises(ArchiveError, match=r"liar\.tar\.gz.*'ds/a\.bin'.*more than the 100 bytes"):
        hub.safe_extract(archive, work / "out")
    assert _listing(work) == ["liar.tar.gz"]


def _existing_target(root: Path) -> Path:
    target = root / "datasets"
    (target / "ds" / "clash").mkdir(parents=True)
    (target / "ds" / "clash" / "inner.txt").write_bytes(b"keep me")
    (target / "ds" / "existing.txt").write_bytes(b"old")
    (target / "ds" / "blocker").write_bytes(b"a file")
    return target


@pytest.mark.parametrize("clash", ["ds/clash", "ds/blocker/x.txt"], ids=["file-on-folder", "folder-on-file"])
def test_name_clash_leaves_the_target_as_it_was(tmp_path, clash):
    target = _existing_target(tmp_path)
    before = _snapshot(target)
    files = {f"new_{i}.txt": b"new" for i in range(10)}  # moved before the clash by the old code
    files.update({"ds/existing.txt": b"replaced", "ds/fresh/b.txt": b"b", clash: b"clash"})
    archive = _tar_of(tmp_path / "data.tar.gz", files)
    with pytest.raises(ArchiveError) as err:
        hub.safe_extract(archive, target)
    message = str(err.value)
    assert str(target / "ds" / clash.split("/")[1]) in message and "nothing was changed" in message
    assert _snapshot(target) == before
    assert not [p for p in tmp_path.rglob("*") if ".extract-" in p.name]


def test_failed_move_is_rolled_back(tmp_path, monkeypatch):
    target = _existing_target(tmp_path)
    before = _snapshot(target)
    archive = _tar_of(tmp_path / "data.tar.gz", {"a.txt": b"a", "ds/existing.txt": b"new", "ds/z.txt": b"z"})
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # after a new file, a replaced file and its backup have moved
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(ArchiveError, match="No space left.*left as it was"):
        hub.safe_extract(archive, target)
    assert _snapshot(target) == before
    assert not [p for p in tmp_path.rglob("*") if ".extract-" in p.name]


def test_symlinked_target(tmp_path):
    archive = _tar_of(tmp_path / "data.tar.gz", {"ds/a.txt": b"A"})
    big_disk = tmp_path / "big" / "datasets"
    big_disk.mkdir(parents=True)
    link = tmp_path / "home" / "datasets"
    link.parent.mkdir()
    link.symlink_to(big_disk)
    # A link to a real folder is written through, and stays a link (also when the folder has content).
    assert hub.safe_extract(archive, link) == link
    assert link.is_symlink() and (big_disk / "ds/a.txt").read_bytes() == b"A"
    _tar_of(tmp_path / "more.tar.gz", {"ds/b.txt": b"B"})
    hub.safe_extract(tmp_path / "more.tar.gz", link)
    assert link.is_symlink() and sorted(p.name for p in (big_disk / "ds").iterdir()) == ["a.txt", "b.txt"]
    assert _listing(link.parent) == ["datasets"]

    dangling = tmp_path / "home" / "gone"
    dangling.symlink_to(tmp_path / "unplugged-disk" / "datasets")
    with pytest.raises(ArchiveError, match="symlink to .*unplugged-disk.*does not exist"):
        hub.safe_extract(archive, dangling)
    to_file = tmp_path / "home" / "to-file"
    to_file.symlink_to(archive)
    with pytest.raises(ArchiveError, match="symlink to .*data.tar.gz, which is not a folder"):
        hub.safe_extract(archive, to_file)
    assert dangling.is_symlink() and not dangling.exists() and to_file.resolve() == archive
    assert _listing(tmp_path / "home") == ["datasets", "gone", "to-file"]
    assert not (tmp_path / "unplugged-disk").exists()


# ---- fetch_weights ------------------------------------------------------------------------------


def test_fetch_weights_shipped_file(tmp_path):
    (tmp_path / "weights").mkdir()
    shipped = tmp_path / "weights" / "tiny.safetensors"
    shipped.write_bytes(PAYLOAD)
    module_file = str(tmp_path / "plugin.py")
    ok = Weights(tag="tiny", file="weights/tiny.safetensors", sha256=PAYLOAD_SHA)
    assert hub.fetch_weights(ok, module_file=module_file, name="demo") == shipped

    wrong = Weights(tag="tiny", file="weights/tiny.safetensors", sha256="0" * 64)
    with pytest.raises(CheckpointError) as err:
        hub.fetch_weights(wrong, module_file=module_file, name="demo")
    assert "0" * 64 in str(err.value) and PAYLOAD_SHA in str(err.value)

    missing = Weights(tag="tiny", file="weights/absent.safetensors")
    with pytest.raises(CheckpointError, match="absent.safetensors"):
        hub.fetch_weights(missing, module_file=module_file, name="demo")


def test_fetch_weights_downloads_into_the_cache(server, cache, tmp_path):
    server.files["ckpt/lsun_cat.pt"] = PAYLOAD
    w = Weights(tag="lsun_cat", url=(server.url("gone/lsun_cat.pt"), server.url("ckpt/lsun_cat.pt")),
                sha256=PAYLOAD_SHA)
    path = hub.fetch_weights(w, module_file=str(tmp_path / "plugin.py"), name="ddpm", progress=False)
    assert path == cache / "checkpoints" / "ddpm" / "lsun_cat.pt"
    assert path.read_bytes() == PAYLOAD
    served = len(server.log)
    assert hub.fetch_weights(w, module_file=str(tmp_path / "plugin.py"), name="ddpm", progress=False) == path
    assert len(server.log) == served  # cached: no new request


def test_fetch_weights_without_location(tmp_path):
    with pytest.raises(CheckpointError, match="'ffhq'.*no download location"):
        hub.fetch_weights(Weights(tag="ffhq"), module_file=str(tmp_path / "p.py"), name="ddpm")
