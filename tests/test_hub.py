"""Downloads against a real HTTP server on 127.0.0.1, archive extraction, checkpoint lookup."""
from __future__ import annotations

import hashlib
import io
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
                self.send_error(416, "Range Not Satisfiable")
                return
        status = 206 if start else 200
        payload = body[start:]
        self.send_response(status)
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
    assert not [p for p in tmp_path.iterdir() if ".extract-" in p.name]


def test_corrupt_archive_is_an_archive_error(tmp_path):
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ArchiveError, match="broken.tar.gz"):
        hub.safe_extract(tmp_path / "broken.tar.gz", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.tar.gz"]


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
