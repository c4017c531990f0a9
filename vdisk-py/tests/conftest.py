"""Shared helpers: the vdisk CLI built by cargo, qemu-img, and images made at test time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vdisk

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
GiB = 1 << 30


def vdisk_bin() -> str:
    """The `vdisk` CLI (run-tests.sh builds it and sets VDISK_BIN)."""
    path = os.environ.get("VDISK_BIN") or str(REPO / "target" / "debug" / "vdisk")
    if not os.access(path, os.X_OK):
        pytest.fail(f"the vdisk CLI is not built at {path}: run `cargo build -p vdisk-cli` (run-tests.sh does)")
    return path


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the vdisk CLI."""
    run = subprocess.run([vdisk_bin(), *args], capture_output=True, text=True, check=False)
    if check and run.returncode != 0:
        raise AssertionError(f"vdisk {' '.join(args)} failed ({run.returncode}): {run.stderr}")
    return run


def cli_error(*args: str) -> str:
    """The message the CLI prints for a failing command, without its `vdisk: ` prefix."""
    run = cli(*args, check=False)
    assert run.returncode == 1, (run.returncode, run.stderr)
    line = run.stderr.strip()
    assert line.startswith("vdisk: ") and "\n" not in line, line
    return line[len("vdisk: ") :]


def cli_info(path: str, *args: str) -> Any:
    return json.loads(cli("info", "--output", "json", *args, path).stdout)


def cli_map(path: str, *args: str) -> Any:
    return json.loads(cli("map", "--output", "json", *args, path).stdout)


def map_entry(e: vdisk.Extent) -> dict[str, Any]:
    """An extent as `vdisk map --output json` (qemu-img map) prints it."""
    entry: dict[str, Any] = {
        "start": e.start,
        "length": e.length,
        "depth": e.depth,
        "present": e.kind != "unallocated",
        "zero": e.kind != "data",
        "data": e.kind == "data",
        "compressed": e.compressed,
    }
    if e.offset is not None:
        entry["offset"] = e.offset
    return entry


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (.ci/run installs qemu-utils and e2fsprogs)")
    return path


def qemu_img(*args: str) -> None:
    subprocess.run([need("qemu-img"), *args], check=True, capture_output=True)


def qemu_io(path: str, fmt: str, *commands: str) -> None:
    argv = [need("qemu-io"), "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, path], check=True, capture_output=True)


def qemu_raw(src: str, dst: Path, *args: str) -> bytes:
    """The guest content of `src` as `qemu-img convert -O raw` writes it."""
    qemu_img("convert", *args, "-O", "raw", src, str(dst))
    return dst.read_bytes()


def write_at(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    """A sparse raw file of `size` bytes with `writes` applied."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    return path


def pattern(n: int, seed: int) -> bytes:
    """`n` bytes that are not zero and differ from block to block."""
    block = bytes((seed + i * 7) % 251 + 1 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt during the test, however pytest was started: a shell runs a
    background job (`cmd &`) with SIGINT ignored, and Python then installs no handler of its own,
    so a test that sends itself SIGINT would see it ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    """A 64 MiB sparse raw image with data at a few unaligned places."""
    return write_at(
        tmp_path / "disk.raw",
        64 * MiB,
        [(0, pattern(8192, 1)), (3 * MiB + 100, pattern(70000, 2)), (40 * MiB, pattern(MiB, 3)), (64 * MiB - 4096, b"end!" * 1024)],
    )


def make_qcow2(path: Path, size: str = "64M", *extra: str) -> Path:
    """A qcow2 image with data, zero clusters, a compressed cluster and unallocated space."""
    qemu_img("create", "-q", "-f", "qcow2", *extra, str(path), size)
    qemu_io(
        str(path),
        "qcow2",
        "write -P 0xab 0 1M",
        "write -P 0x5c 1536k 4k",
        "write -z 2M 1M",
        "write -c -P 0xcd 8M 64k",
        "write -P 0x11 20M 192k",
        "write -z 20M 64k",
    )
    return path


#: Formats the parametrized tests cover; qemu-img makes each from the same content.
KINDS = ["raw", "qcow2", "vmdk", "vpc", "vhdx"]


def make_image(kind: str, tmp_path: Path, raw_image: Path) -> Path:
    """An image of `kind`: the raw fixture itself, the qcow2 above, or VHD/VHDX made from it."""
    if kind == "raw":
        return raw_image
    if kind == "qcow2":
        return make_qcow2(tmp_path / "disk.qcow2")
    path = tmp_path / f"disk.{kind}"
    qemu_img("convert", "-f", "raw", "-O", kind, str(raw_image), str(path))
    return path


@pytest.fixture
def qcow2_image(tmp_path: Path) -> Path:
    return make_qcow2(tmp_path / "disk.qcow2")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Any]:
    """A factory of loop devices over sparse files, detached at the end; skips where impossible."""
    devices: list[str] = []

    def attach(size: int, read_only: bool = False, name: str = "loop.img") -> str:
        backing = tmp_path / name
        with open(backing, "wb") as f:
            f.truncate(size)
        losetup = shutil.which("losetup")
        if losetup is None:
            pytest.skip("SKIP: losetup is not installed")
        argv = [losetup, "-f", "--show"] + (["-r"] if read_only else []) + [str(backing)]
        run = subprocess.run(argv, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            pytest.skip(f"SKIP: cannot attach a loop device here: {run.stderr.strip()}")
        dev = run.stdout.strip()
        devices.append(dev)
        # A loop device just attached (above all one reused right after a detach) can report a
        # capacity of 0 for a moment; a test reading it then would see an empty disk.
        deadline = time.monotonic() + 10
        while True:
            with open(dev, "rb") as f:
                got = f.seek(0, os.SEEK_END)
            if got == size - size % 512:  # a loop device holds whole sectors
                return dev
            assert time.monotonic() < deadline, f"{dev} reports {got} bytes, not {size - size % 512}, 10 s after losetup"
            time.sleep(0.05)

    yield attach
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture(scope="session")
def data_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """1 GiB virtual with 1 MiB of data every 2 MiB (512 MiB of data): a copy of it takes a few
    progress intervals (100 ms each) on any machine."""
    path = tmp_path_factory.mktemp("data") / "data.raw"
    yield write_at(path, GiB, [(i * 2 * MiB, pattern(MiB, i)) for i in range(512)])
    path.unlink()
