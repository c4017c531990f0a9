"""vdisk.checksum, vdisk.compare and convert(checksum=, journal=, restart=).

Digests are checked against a blkhash written here with hashlib from its definition, and against
the CLI; the journal against a conversion killed part way by the CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

import vdisk
from conftest import KINDS, MiB, cli, make_image, qemu_raw, vdisk_bin, write_at

BLOCK = 64 * 1024


def blkhash(data: bytes) -> str:
    """blkhash from its definition: sha256 of each 64 KiB block, then of those and the length."""
    outer = hashlib.sha256()
    for i in range(0, len(data), BLOCK):
        outer.update(hashlib.sha256(data[i : i + BLOCK]).digest())
    outer.update(struct.pack("<Q", len(data)))
    return outer.hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_checksum_is_the_same_in_every_format(kind: str, tmp_path: Path, raw_image: Path) -> None:
    image = make_image(kind, tmp_path, raw_image)
    content = qemu_raw(str(image), tmp_path / "reference.raw")
    got = vdisk.checksum(image)
    assert got.digest == blkhash(content)
    assert (got.algorithm, got.block_size, got.virtual_size) == ("blkhash", 65536, len(content))
    assert str(got) == got.digest
    assert vdisk.checksum(image, algorithm="sha256", threads=1).digest == hashlib.sha256(content).hexdigest()
    assert vdisk.checksum(image, algorithm="sha256").block_size is None
    line = cli("checksum", str(image)).stdout
    assert line == f"{got.digest}  {image}\n"
    assert vdisk.checksum(image, size=12345).digest == blkhash(content[:12345])


def test_checksum_errors(tmp_path: Path, raw_image: Path) -> None:
    with pytest.raises(FileNotFoundError):
        vdisk.checksum(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        vdisk.checksum(raw_image, algorithm="md5")  # type: ignore[arg-type]
    with pytest.raises(vdisk.TargetError, match="holds only"):
        vdisk.checksum(raw_image, size=1 << 40)


def test_compare(tmp_path: Path, raw_image: Path, qcow2_image: Path) -> None:
    qcow2_raw = tmp_path / "qcow2.raw"
    vdisk.convert(qcow2_image, qcow2_raw)
    same = vdisk.compare(qcow2_image, qcow2_raw)
    assert same.identical and bool(same) and same.difference is None and same.offset is None
    assert same.messages == ["Images are identical."]
    # One byte off, at an unaligned place: reported exactly.
    with open(qcow2_raw, "r+b") as f:
        f.seek(20 * MiB + 777)
        old = f.read(1)
        f.seek(20 * MiB + 777)
        f.write(bytes([old[0] ^ 0xFF]))
    diff = vdisk.compare(qcow2_image, qcow2_raw, format_a="qcow2", format_b="raw", threads=2)
    assert not diff.identical and not bool(diff)
    assert (diff.difference, diff.offset) == ("content", 20 * MiB + 777)
    assert diff.messages == [f"Content mismatch at offset {20 * MiB + 777}!"]
    # A longer image whose tail reads as zero: identical, with qemu-img's warning; strict: not.
    longer = write_at(tmp_path / "longer.raw", 65 * MiB, [(0, raw_image.read_bytes())])
    r = vdisk.compare(raw_image, longer)
    assert r.identical and r.messages == ["Warning: Image size mismatch!", "Images are identical."]
    assert (r.size_a, r.size_b) == (64 * MiB, 65 * MiB)
    strict = vdisk.compare(raw_image, longer, strict=True)
    assert (strict.identical, strict.difference, strict.messages) == (
        False,
        "size",
        ["Strict mode: Image size mismatch!"],
    )
    with pytest.raises(FileNotFoundError):
        vdisk.compare(raw_image, tmp_path / "missing")


def test_convert_checksum_matches_the_target(tmp_path: Path, qcow2_image: Path) -> None:
    out = tmp_path / "out.raw"
    report = vdisk.convert(qcow2_image, out, checksum=True)
    assert report.checksum == vdisk.checksum(out).digest == blkhash(out.read_bytes())
    assert report.bytes_skipped == 0 and not report.already_complete
    assert vdisk.convert(qcow2_image, tmp_path / "plain.raw").checksum is None


def done_bytes(journal: Path) -> int:
    """Bytes a journal records as written, read from its documented layout."""
    data = journal.read_bytes()[16:]
    done = 0
    while data:
        (length,) = struct.unpack_from("<I", data)
        kind, payload = data[4], data[5 : 5 + length]
        if kind == 2:
            done = sum(e - s for s, e in struct.iter_unpack("<QQ", payload))
        data = data[length + 9 :]
    return done


def test_journal_resumes_a_killed_conversion(tmp_path: Path, data_image: Path) -> None:
    # 512 MiB of data: the first checkpoint (about 50 ms in) comes long before the end.
    src = data_image
    dst = tmp_path / "dst.raw"
    journal = tmp_path / "convert.journal"
    child = subprocess.Popen(
        [vdisk_bin(), "convert", "--threads", "1", "--checkpoint-bytes", "2097152", "--journal", str(journal), str(src), str(dst)],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        if journal.exists() and done_bytes(journal) > 0:
            os.kill(child.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    child.wait()
    recorded = done_bytes(journal)
    size = src.stat().st_size
    assert child.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert 0 < recorded < size

    # Other options: refused, saying what changed.
    with pytest.raises(vdisk.JournalError, match="the options changed: --target-is-zero was off, now on"):
        vdisk.convert(src, dst, journal=journal, target_is_zero=True)
    report = vdisk.convert(src, dst, journal=journal, checksum=True)
    assert report.bytes_skipped >= recorded and not report.already_complete
    assert vdisk.compare(src, dst).identical
    assert report.checksum == vdisk.checksum(src).digest == vdisk.checksum(dst).digest
    again = vdisk.convert(src, dst, journal=journal)
    assert again.already_complete and again.bytes_written == 0 and again.bytes_skipped == size
    # A damaged journal is never trusted; restart=True discards it.
    data = bytearray(journal.read_bytes())
    data[30] ^= 1
    journal.write_bytes(bytes(data))
    with pytest.raises(vdisk.JournalError, match="is damaged"):
        vdisk.convert(src, dst, journal=journal)
    fresh = vdisk.convert(src, dst, journal=journal, restart=True)
    assert not fresh.already_complete and fresh.bytes_skipped == 0
    with pytest.raises(ValueError, match="restart=True needs a journal"):
        vdisk.convert(src, dst, restart=True)
