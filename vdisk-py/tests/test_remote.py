"""Remote sources from Python: vdisk.open/convert/checksum/compare on http:// URLs served by the
loopback test server (testdata/http/server.py), with headers, connection counts, URL refresh, and
RemoteError for what cannot be read."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import vdisk
from conftest import REPO, MiB, make_qcow2

SERVER = REPO / "testdata" / "http" / "server.py"


class Server:
    def __init__(self, root: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--root", str(root), "--port", "0", "--exit-on-stdin-eof", *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def stats(self) -> dict[str, object]:
        with urllib.request.urlopen(self.url("_stats")) as r:
            stats: dict[str, object] = json.load(r)
            return stats

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    root = tmp_path / "root"
    root.mkdir()
    make_qcow2(root / "disk.qcow2")
    server = Server(root)
    yield server, root
    server.stop()


def test_open_and_convert_a_url_like_a_file(served: tuple[Server, Path], tmp_path: Path) -> None:
    server, root = served
    url = server.url("p/PARTOKEN/n/ns/b/bucket/o/disk.qcow2?sig=QSECRET")
    with vdisk.open(url, http_connections=4) as img:
        assert img.format == "qcow2"
        assert img.virtual_size == 64 * MiB
        info = img.info()
        assert info["filename"] == server.url("p/.../n/ns/b/bucket/o/disk.qcow2?...")
        assert "PARTOKEN" not in repr(img) and "QSECRET" not in repr(img)
        assert img.read(0, 4) == b"\xab" * 4
        local = vdisk.open(root / "disk.qcow2")
        assert [e.start for e in img.extents()] == [e.start for e in local.extents()]
    seen: list[tuple[int, int]] = []
    report = vdisk.convert(url, tmp_path / "remote.raw", http_connections=4, progress=lambda d, t: seen.append((d, t)))
    vdisk.convert(root / "disk.qcow2", tmp_path / "local.raw")
    assert (tmp_path / "remote.raw").read_bytes() == (tmp_path / "local.raw").read_bytes()
    assert report.threads >= 4 and seen[-1] == (64 * MiB, 64 * MiB)
    assert vdisk.checksum(url).digest == vdisk.checksum(root / "disk.qcow2").digest
    assert vdisk.compare(url, tmp_path / "local.raw")


def test_remote_error_carries_the_status_and_hides_secrets(served: tuple[Server, Path]) -> None:
    server, _ = served
    with pytest.raises(vdisk.RemoteError) as caught:
        vdisk.open(server.url("_fault/status=403/disk.qcow2?X-Amz-Signature=QSECRET"), http_retries=1)
    assert caught.value.status == 403
    assert "may have expired" in str(caught.value) and "QSECRET" not in str(caught.value)
    assert isinstance(caught.value, vdisk.VdiskError)
    with pytest.raises(vdisk.RemoteError, match="ignores Range requests") as caught:
        vdisk.open(server.url("_fault/ignore-range/disk.qcow2"))
    assert caught.value.status == 200
    with pytest.raises(vdisk.RemoteError) as caught:
        vdisk.open(server.url("_fault/status=503/disk.qcow2"), http_retries=0)
    assert caught.value.status == 503
    assert vdisk.RemoteError.status is None


def test_headers_reach_the_server(tmp_path: Path) -> None:
    make_qcow2(tmp_path / "disk.qcow2")
    server = Server(tmp_path, "--require-header", "Authorization: Bearer HSECRET")
    try:
        with pytest.raises(vdisk.RemoteError) as caught:
            vdisk.open(server.url("disk.qcow2"))
        assert caught.value.status == 401
        img = vdisk.open(server.url("disk.qcow2"), http_headers={"Authorization": "Bearer HSECRET"})
        assert img.virtual_size == 64 * MiB
    finally:
        server.stop()


def test_the_issue_spelling_headers_and_http(tmp_path: Path) -> None:
    """``vdisk.open(url, headers=..., http=...)`` and ``convert`` likewise; a setting named in
    both spellings, or an unknown one, is refused."""
    make_qcow2(tmp_path / "disk.qcow2")
    server = Server(tmp_path, "--require-header", "Authorization: Bearer HSECRET")
    try:
        url = server.url("disk.qcow2")
        auth = {"Authorization": "Bearer HSECRET"}
        with vdisk.open(url, headers=auth, http={"connections": 2, "retries": 1, "timeout": 30}) as img:
            assert img.virtual_size == 64 * MiB
        with vdisk.open(url, http={"headers": auth}) as img:
            assert img.virtual_size == 64 * MiB
        report = vdisk.convert(url, tmp_path / "out.raw", headers=auth, http={"connections": 3})
        assert report.virtual_size == 64 * MiB
        vdisk.convert(tmp_path / "disk.qcow2", tmp_path / "local.raw")
        assert (tmp_path / "out.raw").read_bytes() == (tmp_path / "local.raw").read_bytes()
        assert vdisk.checksum(url, headers=auth).digest == vdisk.checksum(tmp_path / "disk.qcow2").digest
        with pytest.raises(ValueError, match="given twice"):
            vdisk.open(url, headers=auth, http_headers=auth)
        with pytest.raises(ValueError, match="given twice"):
            vdisk.open(url, headers=auth, http={"connections": 2}, http_connections=2)
        with pytest.raises(ValueError, match="unknown http setting"):
            vdisk.open(url, headers=auth, http={"conections": 2})
        with pytest.raises(TypeError, match="connections"):
            vdisk.open(url, headers=auth, http={"connections": "many"})
    finally:
        server.stop()


def test_url_refresh_replaces_an_expired_url(served: tuple[Server, Path], tmp_path: Path) -> None:
    server, root = served
    calls: list[int] = []

    def refresh() -> str:
        calls.append(1)
        return server.url("disk.qcow2?sig=fresh")

    expiring = server.url("_fault/status=403,after=3/disk.qcow2?sig=old")
    vdisk.convert(expiring, tmp_path / "out.raw", url_refresh=refresh, http_connections=2)
    vdisk.convert(root / "disk.qcow2", tmp_path / "local.raw")
    assert (tmp_path / "out.raw").read_bytes() == (tmp_path / "local.raw").read_bytes()
    assert calls, "the refresh function was not called"

    def broken() -> str:
        raise RuntimeError("cannot mint a URL")

    with pytest.raises(vdisk.RemoteError, match="cannot mint a URL"):
        vdisk.convert(server.url("_fault/status=403,after=3,x/disk.qcow2"), tmp_path / "x.raw", url_refresh=broken)
    with pytest.raises(TypeError):
        vdisk.open(server.url("disk.qcow2"), url_refresh="not callable")  # type: ignore[arg-type]


def test_ctrl_c_ends_a_retry_wait(tmp_path: Path, sigint_raises: None) -> None:
    """Every data request after the open is answered 503 with Retry-After: 100: convert waits to
    retry, and Ctrl-C must stop it within seconds, not after the server's 100 s."""
    import os
    import signal
    import threading
    import time

    (tmp_path / "disk.raw").write_bytes(b"\x07" * (8 * MiB))
    server = Server(tmp_path)
    sent: list[float] = []

    def interrupt() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(2.0, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            vdisk.convert(
                server.url("_fault/status=503,retry-after=100,after=1/disk.raw"),
                tmp_path / "out.raw",
                format="raw",
                http_retries=5,
            )
        assert sent, "convert ended before the interrupt"
        assert time.monotonic() - sent[0] < 10
    finally:
        timer.cancel()
        server.stop()
