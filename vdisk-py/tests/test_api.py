"""vdisk.open, Image, Extent, Limits, convert and ConvertReport, against the CLI and qemu-img."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import vdisk
from conftest import (
    cli,
    KINDS,
    REPO,
    MiB,
    cli,
    cli_error,
    cli_info,
    cli_map,
    make_image,
    make_qcow2,
    map_entry,
    pattern,
    qemu_img,
    qemu_io,
    qemu_raw,
    write_at,
)


def test_version_is_the_crate_version_and_the_commit() -> None:
    text = (REPO / "Cargo.toml").read_text()
    m = re.search(r'^\[workspace\.package\][^\[]*?^version = "([^"]+)"', text, re.M | re.S)
    assert m is not None
    public, _, local = vdisk.__version__.partition("+")
    assert public == m.group(1)
    # The commit the wheel was built from, as a PEP 440 local label (g + 12 hex digits).
    assert re.fullmatch(r"g[0-9a-f]{12}(\.dirty)?", local), vdisk.__version__
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert local.startswith("g" + head.stdout.strip()), (vdisk.__version__, head.stdout)
    # The CLI says the same.
    assert f"vdisk {public} ({local[1:13]}" in cli("--version").stdout


def test_pip_installs_the_vdisk_command(tmp_path: Path) -> None:
    """The wheel puts `vdisk` on PATH beside the interpreter; it is the same command as the binary."""
    command = Path(sys.executable).parent / "vdisk"
    assert command.exists(), f"{command} was not installed with the wheel"
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(1 << 20))
    info = subprocess.run([str(command), "info", "--output", "json", str(src)], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert '"virtual-size": 1048576' in info.stdout
    out = tmp_path / "out.raw"
    conv = subprocess.run([str(command), "convert", str(src), str(out)], capture_output=True, text=True)
    assert conv.returncode == 0, conv.stderr
    assert out.read_bytes() == src.read_bytes()
    usage = subprocess.run([str(command), "convert", str(src)], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("vdisk: "), usage
    missing = subprocess.run([str(command), "info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing
    assert "Traceback" not in missing.stderr
    same = subprocess.run([sys.executable, "-m", "vdisk", "--version"], capture_output=True, text=True)
    assert same.stdout == cli("--version").stdout


def test_public_names_have_docstrings() -> None:
    for name in vdisk.__all__:
        obj = getattr(vdisk, name)
        if name == "__version__":
            continue
        assert obj.__doc__ and obj.__doc__.strip(), name
        for attr, value in vars(obj).items() if isinstance(obj, type) else []:
            if attr.startswith("_") and attr not in ("__enter__", "__exit__", "__iter__", "__next__", "__new__"):
                continue
            if callable(value) or isinstance(value, property) or type(value).__name__ == "getset_descriptor":
                assert getattr(value, "__doc__", None), f"{name}.{attr}"
    assert vdisk.__doc__


def test_open_raw(raw_image: Path) -> None:
    img = vdisk.open(raw_image)
    assert isinstance(img, vdisk.Image)
    assert img.format == "raw"
    assert img.virtual_size == 64 * MiB
    assert img.path == str(raw_image)
    assert not img.closed
    assert "format=raw" in repr(img)
    img.close()
    assert img.closed
    assert "closed" in repr(img)


def test_open_accepts_str_and_pathlike_and_explicit_format(raw_image: Path) -> None:
    with vdisk.open(str(raw_image), "raw", "same-dir") as img:
        assert img.format == "raw"
    with vdisk.open(raw_image, format="raw", references="any", limits=vdisk.Limits()) as img:
        assert img.virtual_size == 64 * MiB


def test_context_manager_closes(raw_image: Path) -> None:
    with vdisk.open(raw_image) as img:
        assert img.read(0, 4) == pattern(4, 1)
        it = img.extents()
    assert img.closed
    img.close()  # twice is fine
    for use in (lambda: img.read(0, 1), img.info, img.extents, lambda: img.format, lambda: img.virtual_size):
        with pytest.raises(ValueError, match="closed"):
            use()
    with pytest.raises(ValueError, match="closed"):
        next(it)


def test_exit_does_not_swallow_exceptions(raw_image: Path) -> None:
    with pytest.raises(KeyError):
        with vdisk.open(raw_image) as img:
            raise KeyError("x")
    assert img.closed


@pytest.mark.parametrize("kind", KINDS)
def test_info_equals_cli_json(kind: str, tmp_path: Path, raw_image: Path) -> None:
    path = str(make_image(kind, tmp_path, raw_image))
    with vdisk.open(path) as img:
        info = img.info()
    assert info == cli_info(path)
    assert info["format"] == kind
    assert info["virtual-size"] >= 64 * MiB


def test_extents_equal_cli_map_raw(raw_image: Path) -> None:
    with vdisk.open(raw_image) as img:
        extents = list(img.extents())
    assert [map_entry(e) for e in extents] == cli_map(str(raw_image))
    assert {e.kind for e in extents} == {"data", "zero"}
    assert extents[0].start == 0 and extents[-1].end == 64 * MiB
    for a, b in zip(extents, extents[1:]):
        assert a.end == b.start and a.kind + str(a.offset) != b.kind + str(b.offset)


def test_extents_equal_cli_map_over_many_batches(tmp_path: Path) -> None:
    # 3000 data extents and as many holes: several batches of the lazy iterator.
    path = write_at(tmp_path / "many.raw", 6000 * 64 * 1024, [(i * 128 * 1024, b"x" * 4096) for i in range(3000)])
    with vdisk.open(path) as img:
        it = img.extents()
        assert iter(it) is it
        extents = list(it)
        with pytest.raises(StopIteration):
            next(it)
    assert len(extents) == 6000
    assert [map_entry(e) for e in extents] == cli_map(str(path))


def test_extent_objects(raw_image: Path) -> None:
    with vdisk.open(raw_image) as img:
        first, second = list(img.extents())[:2]
    assert (first.start, first.kind, first.depth, first.offset, first.compressed) == (0, "data", 0, 0, False)
    assert first.end == first.start + first.length
    assert second.kind == "zero" and second.offset is None
    assert first == first and first != second
    assert len({first, second, first}) == 2
    assert repr(first).startswith("Extent(start=0, length=")


@pytest.mark.parametrize("kind", KINDS)
def test_extents_equal_cli_map_every_format(kind: str, tmp_path: Path, raw_image: Path) -> None:
    path = str(make_image(kind, tmp_path, raw_image))
    with vdisk.open(path) as img:
        extents = list(img.extents())
        assert extents[-1].end == img.virtual_size
    assert [map_entry(e) for e in extents] == cli_map(path)
    assert "data" in {e.kind for e in extents}


def test_extents_of_qcow2_equal_cli_map(qcow2_image: Path) -> None:
    with vdisk.open(qcow2_image) as img:
        extents = list(img.extents())
    assert [map_entry(e) for e in extents] == cli_map(str(qcow2_image))
    kinds = {(e.kind, e.compressed) for e in extents}
    assert {("data", False), ("data", True), ("zero", False), ("unallocated", False)} <= kinds


def test_backing_chain_needs_references_and_reports_depth(tmp_path: Path) -> None:
    base = make_qcow2(tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io(str(top), "qcow2", "write -P 0x77 4M 1M")
    with pytest.raises(vdisk.ReferenceDeniedError) as denied:
        vdisk.open(top)
    assert "--references same-dir" in str(denied.value) or 'references="same-dir"' in str(denied.value)
    with vdisk.open(top, references="same-dir") as img:
        extents = list(img.extents())
        assert img.info()["backing-filename"] == "base.qcow2"
        assert img.info() == cli_info(str(top))
        content = img.read(0, img.virtual_size)
    assert {e.depth for e in extents} == {0, 1}
    assert [map_entry(e) for e in extents] == cli_map(str(top), "--references", "same-dir")
    assert content == qemu_raw(str(top), tmp_path / "top.raw")
    assert base.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_reads_equal_qemu_img_raw_output(kind: str, tmp_path: Path, raw_image: Path) -> None:
    path = str(make_image(kind, tmp_path, raw_image))
    expected = qemu_raw(path, tmp_path / "expected.raw")
    rng = random.Random(6)
    with vdisk.open(path) as img:
        size = img.virtual_size
        assert len(expected) == size
        assert img.read(0, size) == expected
        for _ in range(200):
            offset = rng.randrange(size)
            length = rng.choice([1, 511, 4096, 65537, 3 * MiB])
            assert img.read(offset, length) == expected[offset : offset + length], (offset, length)
        assert img.read(size - 10, 100) == expected[-10:]
        assert img.read(size, 10) == b""
        assert img.read(size + 12345, 10) == b""
        assert img.read(0, 0) == b""
        with pytest.raises(OverflowError):
            img.read(-1, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_convert_equals_qemu_img(kind: str, tmp_path: Path, raw_image: Path) -> None:
    path = str(make_image(kind, tmp_path, raw_image))
    expected = qemu_raw(path, tmp_path / "expected.raw")
    dst = tmp_path / "out.raw"
    report = vdisk.convert(path, dst)
    assert dst.read_bytes() == expected
    assert isinstance(report, vdisk.ConvertReport)
    assert report.virtual_size == len(expected)
    assert report.target == "new-file"
    # Every non-zero byte was written; zero ranges of a new file stay holes.
    assert len(expected) - expected.count(0) <= report.bytes_written <= len(expected)
    assert report.bytes_zeroed == 0
    assert report.seconds >= 0 and report.threads >= 1
    assert "ConvertReport(virtual_size=" in repr(report)


def test_convert_onto_existing_file_zeroes_and_never_truncates(tmp_path: Path, raw_image: Path) -> None:
    dst = tmp_path / "existing.raw"
    dst.write_bytes(b"\xee" * (65 * MiB))
    report = vdisk.convert(raw_image, dst, must_exist=True, threads=1, format="raw")
    data = dst.read_bytes()
    assert len(data) == 65 * MiB
    assert data[: 64 * MiB] == raw_image.read_bytes()
    assert data[64 * MiB :] == b"\xee" * MiB
    assert report.target == "existing-file" and report.threads == 1
    assert report.bytes_zeroed > 0 and report.bytes_written + report.bytes_zeroed == 64 * MiB

    # target_is_zero: zero ranges are left alone (here, visibly so).
    report = vdisk.convert(raw_image, dst, target_is_zero=True)
    assert report.bytes_zeroed == 0


def test_convert_accepts_pathlike_and_limits(tmp_path: Path, raw_image: Path) -> None:
    report = vdisk.convert(raw_image, tmp_path / "o.raw", limits=vdisk.Limits(max_virtual_size=64 * MiB))
    assert report.virtual_size == 64 * MiB
    with pytest.raises(vdisk.LimitExceededError):
        vdisk.convert(raw_image, tmp_path / "p.raw", limits=vdisk.Limits(max_virtual_size=MiB))
    assert not (tmp_path / "p.raw").exists()


def test_progress_is_monotonic_on_the_calling_thread_and_ends_at_total(tmp_path: Path, data_image: Path) -> None:
    src = data_image
    calls: list[tuple[int, int, int]] = []
    report = vdisk.convert(
        src, tmp_path / "out.raw", threads=1, progress=lambda d, t: calls.append((d, t, threading.get_ident()))
    )
    assert calls, "progress was never called"
    assert calls[-1][:2] == (report.virtual_size, report.virtual_size)
    assert all(t == report.virtual_size for _, t, _ in calls)
    dones = [d for d, _, _ in calls]
    assert dones == sorted(dones)
    assert {tid for _, _, tid in calls} == {threading.get_ident()}
    # About every 100 ms while the copy runs (the reporting loop ticks every 50 ms).
    assert len(calls) >= int(report.seconds / 0.15), (len(calls), report.seconds)
    with open(tmp_path / "out.raw", "rb") as a, open(src, "rb") as b:
        while True:
            x, y = a.read(16 * MiB), b.read(16 * MiB)
            assert x == y
            if not x:
                break
    (tmp_path / "out.raw").unlink()


def test_progress_called_once_at_the_end_for_a_quick_copy(tmp_path: Path) -> None:
    src = write_at(tmp_path / "tiny.raw", 4096, [(0, b"abc")])
    calls: list[tuple[int, int]] = []
    vdisk.convert(src, tmp_path / "o.raw", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (4096, 4096)


def test_exception_in_progress_is_reraised(tmp_path: Path, raw_image: Path) -> None:
    class Boom(Exception):
        pass

    boom = Boom("from progress")

    def progress(done: int, total: int) -> None:
        raise boom

    with pytest.raises(Boom) as raised:
        vdisk.convert(raw_image, tmp_path / "o.raw", progress=progress)
    assert raised.value is boom


def test_empty_image(tmp_path: Path) -> None:
    src = tmp_path / "empty.raw"
    src.write_bytes(b"")
    with vdisk.open(src) as img:
        assert img.virtual_size == 0
        assert list(img.extents()) == []
        assert img.read(0, 10) == b""
    calls: list[tuple[int, int]] = []
    report = vdisk.convert(src, tmp_path / "o.raw", progress=lambda d, t: calls.append((d, t)))
    assert report.virtual_size == 0 and calls == [(0, 0)]


def test_limits_defaults_and_keywords() -> None:
    d = vdisk.Limits()
    assert d.max_metadata_bytes == 1 << 30
    assert d.max_chain_depth == 64
    assert d.max_virtual_size == 256 << 40
    assert d.max_table_entries == 1 << 28
    assert d.max_unit_bytes == 2 << 20
    custom = vdisk.Limits(max_chain_depth=3, max_unit_bytes=4 << 20)
    assert (custom.max_chain_depth, custom.max_unit_bytes, custom.max_metadata_bytes) == (3, 4 << 20, 1 << 30)
    assert custom == vdisk.Limits(max_chain_depth=3, max_unit_bytes=4 << 20) and custom != d
    assert "max_chain_depth=3" in repr(custom)
    with pytest.raises(TypeError):
        vdisk.Limits(3)  # type: ignore[call-arg]
    with pytest.raises(OverflowError):
        vdisk.Limits(max_chain_depth=-1)


def test_limits_raise_and_lower(tmp_path: Path) -> None:
    # A 4 TiB qcow2: its L1 table has 8192 entries (64 KiB).
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "4T")
    for limits, option, value in [
        (vdisk.Limits(max_metadata_bytes=16384), "--max-metadata-bytes", 16384),
        (vdisk.Limits(max_table_entries=1000), "--max-table-entries", 1000),
    ]:
        with pytest.raises(vdisk.LimitExceededError) as e:
            vdisk.open(path, limits=limits)
        assert str(e.value) == cli_error("info", option, str(value), str(path))
        assert option.lstrip("-").replace("-", "_") in str(e.value)
    with vdisk.open(path, limits=vdisk.Limits(max_metadata_bytes=16 * MiB, max_table_entries=8192)) as img:
        assert img.virtual_size == 4 << 40


def test_same_digest_as_cli_convert(tmp_path: Path, raw_image: Path) -> None:
    cli("convert", str(raw_image), str(tmp_path / "cli.raw"))
    vdisk.convert(raw_image, tmp_path / "py.raw")
    cli_digest = hashlib.sha256((tmp_path / "cli.raw").read_bytes()).hexdigest()
    assert hashlib.sha256((tmp_path / "py.raw").read_bytes()).hexdigest() == cli_digest
    assert os.stat(tmp_path / "py.raw").st_blocks < 64 * MiB // 512 // 2  # created sparse
