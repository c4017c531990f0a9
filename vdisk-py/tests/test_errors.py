"""Every error path: the exception class, and the same words the CLI prints after `vdisk: `."""

from __future__ import annotations

import errno
import os
import pickle
import struct
from pathlib import Path

import pytest

import vdisk
from conftest import MiB, cli_error, make_qcow2, qemu_img, write_at

SUBCLASSES = [
    vdisk.InvalidImageError,
    vdisk.UnsupportedFeatureError,
    vdisk.ReferenceDeniedError,
    vdisk.LimitExceededError,
    vdisk.TargetError,
]


def test_hierarchy() -> None:
    assert issubclass(vdisk.VdiskError, Exception)
    assert not issubclass(vdisk.VdiskError, OSError)
    for cls in SUBCLASSES:
        assert issubclass(cls, vdisk.VdiskError)
        assert cls.__module__ == "vdisk"
        assert cls.__doc__


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.img")
    with pytest.raises(FileNotFoundError) as e:
        vdisk.open(missing)
    assert e.value.errno == errno.ENOENT
    assert str(e.value) == cli_error("info", missing)
    with pytest.raises(FileNotFoundError) as e:
        vdisk.convert(missing, tmp_path / "out.raw")
    assert str(e.value) == cli_error("convert", missing, str(tmp_path / "out.raw"))
    assert not (tmp_path / "out.raw").exists()


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError) as e:
        vdisk.open(tmp_path)
    assert e.value.errno == errno.EISDIR
    assert str(e.value) == cli_error("info", str(tmp_path))


def test_permission_denied(tmp_path: Path) -> None:
    """A file the process may not read raises PermissionError (checked as an unprivileged child)."""
    secret = write_at(tmp_path / "secret.raw", 4096, [(0, b"x")])
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    if os.getuid() != 0:
        with pytest.raises(PermissionError):
            vdisk.open(secret)
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody and report what open() raised
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                vdisk.open(secret)
                result: object = ("no error", "", 0)
            except BaseException as exc:  # noqa: BLE001
                result = (type(exc).__name__, str(exc), getattr(exc, "errno", None))
            os.write(w, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        name, message, code = pickle.loads(f.read())
    os.waitpid(pid, 0)
    assert (name, code) == ("PermissionError", errno.EACCES), message
    assert message == f"cannot open image {secret}: Permission denied"


def test_unsupported_formats(tmp_path: Path) -> None:
    qed = write_at(tmp_path / "disk.qed", MiB, [(0, b"QED\0")])
    qcow1 = write_at(tmp_path / "disk.qcow", MiB, [(0, b"QFI\xfb\x00\x00\x00\x01")])
    for path in (qed, qcow1):
        with pytest.raises(vdisk.UnsupportedFeatureError) as e:
            vdisk.open(path)
        assert str(e.value) == cli_error("info", str(path))
        with pytest.raises(vdisk.VdiskError):
            vdisk.convert(path, tmp_path / "out.raw")
    assert "QED" in cli_error("info", str(qed))
    # A VDI signature over a header of zeros is read as a VDI and refused as a damaged one.
    vdi = write_at(tmp_path / "disk.vdi", MiB, [(0, b"<<< Oracle VM VirtualBox Disk Image >>>\n"), (0x40, b"\x7f\x10\xda\xbe")])
    with pytest.raises(vdisk.InvalidImageError) as err:
        vdisk.open(vdi)
    assert str(err.value) == cli_error("info", str(vdi))


@pytest.mark.parametrize("kind", ["qcow2", "vpc", "vhdx"])
def test_invalid_image(kind: str, tmp_path: Path) -> None:
    """Damaged metadata: a truncated qcow2 header, a VHD dynamic header without its cookie, VHDX
    headers that are both overwritten."""
    path = tmp_path / f"bad.{kind}"
    if kind == "qcow2":
        good = make_qcow2(tmp_path / "good.qcow2")
        path.write_bytes(good.read_bytes()[:32])
    else:
        qemu_img("create", "-q", "-f", kind, str(path), "64M")
        at, length = (512, 32) if kind == "vpc" else (64 * 1024, 128 * 1024)
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(b"\xee" * length)
    with pytest.raises(vdisk.InvalidImageError) as e:
        vdisk.open(path)
    assert str(e.value) == cli_error("info", str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(vdisk.InvalidImageError):
        vdisk.convert(path, tmp_path / "out.raw")


def test_reference_denied(tmp_path: Path) -> None:
    make_qcow2(tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    with pytest.raises(vdisk.ReferenceDeniedError) as e:
        vdisk.open(top)
    assert str(e.value) == cli_error("map", str(top))
    with pytest.raises(vdisk.ReferenceDeniedError) as e:
        vdisk.convert(top, tmp_path / "out.raw")
    # An absolute backing name is refused by same-dir too.
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(tmp_path / "base.qcow2"), "-F", "qcow2", str(top))
    with pytest.raises(vdisk.ReferenceDeniedError):
        vdisk.open(top, references="same-dir")
    with vdisk.open(top, references="any") as img:
        assert img.virtual_size == 64 * MiB


def test_limit_exceeded(tmp_path: Path) -> None:
    src = write_at(tmp_path / "disk.raw", 8 * MiB, [(0, b"x")])
    with pytest.raises(vdisk.LimitExceededError) as e:
        vdisk.open(src, limits=vdisk.Limits(max_virtual_size=MiB))
    assert str(e.value) == cli_error("info", "--max-virtual-size", str(MiB), str(src))
    assert "max_virtual_size" in str(e.value)


def test_target_errors(tmp_path: Path) -> None:
    src = write_at(tmp_path / "disk.raw", 8 * MiB, [(0, b"x")])
    small = write_at(tmp_path / "small.raw", MiB, [])
    big = write_at(tmp_path / "big.raw", 16 * MiB, [])
    cases: list[tuple[Path, bool, list[str]]] = [
        (small, False, ["convert", str(src), str(small)]),  # too small
        (src, False, ["convert", str(src), str(src)]),  # the source itself
        (big, True, ["convert", "-O", "host_device", str(src), str(big)]),  # not a device
    ]
    for dst, require_device, argv in cases:
        with pytest.raises(vdisk.TargetError) as e:
            vdisk.convert(src, dst, require_device=require_device)
        assert str(e.value) == cli_error(*argv), argv
    assert small.stat().st_size == MiB  # never resized
    assert src.read_bytes()[:1] == b"x"


def test_missing_target_with_must_exist(tmp_path: Path) -> None:
    src = write_at(tmp_path / "disk.raw", MiB, [(0, b"x")])
    dst = tmp_path / "nope.raw"
    with pytest.raises((vdisk.TargetError, FileNotFoundError)) as e:
        vdisk.convert(src, dst, must_exist=True)
    assert str(e.value) == cli_error("convert", "-n", str(src), str(dst))
    assert not dst.exists()


def test_target_in_missing_directory(tmp_path: Path) -> None:
    src = write_at(tmp_path / "disk.raw", MiB, [(0, b"x")])
    dst = tmp_path / "no" / "such" / "dir.raw"
    with pytest.raises(FileNotFoundError) as e:
        vdisk.convert(src, dst)
    assert str(e.value) == cli_error("convert", str(src), str(dst))


def test_bad_arguments(tmp_path: Path) -> None:
    src = write_at(tmp_path / "disk.raw", MiB, [(0, b"x")])
    with pytest.raises(ValueError, match="unknown format 'qed'"):
        vdisk.open(src, format="qed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disk must be 1 or more"):
        vdisk.open(src, disk=0)
    with pytest.raises(ValueError, match="unknown reference policy 'all'"):
        vdisk.open(src, references="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown format"):
        vdisk.convert(src, tmp_path / "o.raw", format="qcow3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads"):
        vdisk.convert(src, tmp_path / "o.raw", threads=0)
    with pytest.raises(TypeError):
        vdisk.open(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vdisk.open(src, limits={"max_chain_depth": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vdisk.convert(src, tmp_path / "o.raw", "raw")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="progress must be callable"):
        vdisk.convert(src, tmp_path / "o.raw", progress=42)  # type: ignore[arg-type]
    assert not (tmp_path / "o.raw").exists()


def test_vhd_footer_with_bad_checksum_is_not_read_as_raw(tmp_path: Path) -> None:
    """A fixed VHD whose footer is damaged is refused as VHD, never silently converted as raw."""
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">Q", footer, 48, MiB)
    path = write_at(tmp_path / "disk.vhd", MiB + 512, [(MiB, bytes(footer))])
    with pytest.raises(vdisk.VdiskError) as e:
        vdisk.open(path)
    assert str(e.value) == cli_error("info", str(path))
