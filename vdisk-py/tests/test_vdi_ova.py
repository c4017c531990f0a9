"""VDI images and OVA archives through the Python package: every case of the generators
(testdata/vdi/make.py, testdata/ova/make.py) opened, read, converted and refused as the CLI does."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

import vdisk
from conftest import REPO, cli_info, cli_map, map_entry, need

Case = dict[str, str]


def generate(script: str, out: Path) -> list[Case]:
    """Run a case generator into `out` and read its cases.tsv."""
    need("qemu-img")
    subprocess.run([sys.executable, str(REPO / "testdata" / script), str(out)], check=True, capture_output=True)
    with open(out / "cases.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def vdi_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Case]]:
    out = tmp_path_factory.mktemp("vdi-cases")
    return out, generate("vdi/make.py", out)


@pytest.fixture(scope="module")
def ova_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Case]]:
    out = tmp_path_factory.mktemp("ova-cases")
    return out, generate("ova/make.py", out)


def disk_of(flags: str) -> int | None:
    words = flags.split()
    return int(words[words.index("--disk") + 1]) if "--disk" in words else None


def references_of(flags: str) -> Literal["deny", "same-dir"]:
    return "same-dir" if "same-dir" in flags else "deny"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_every_vdi_case(vdi_cases: tuple[Path, list[Case]], tmp_path: Path) -> None:
    root, cases = vdi_cases
    assert len(cases) >= 30
    for case in cases:
        path = root / case["name"]
        refs = references_of(case["flags"])
        if case["expect"] == "ok":
            with vdisk.open(path, references=refs) as img:
                assert img.format == "vdi" and img.disk is None and img.disk_format == "vdi"
                assert img.virtual_size == int(case["virtual_size"]), case
                info = img.info()
                assert info["format"] == "vdi" and info["format-specific"]["type"] == "vdi"
                extents = [map_entry(e) for e in img.extents()]
            assert extents == cli_map(str(path), *case["flags"].split()), case["name"]
            dst = tmp_path / "out.raw"
            dst.unlink(missing_ok=True)
            report = vdisk.convert(path, dst, references=refs)
            assert report.virtual_size == int(case["virtual_size"])
            assert sha256(dst) == case["sha256"], case["name"]
        else:
            with pytest.raises(vdisk.VdiskError) as err:
                vdisk.open(path, references=refs)
            assert case["error"] in str(err.value), (case["name"], str(err.value))
            assert type(err.value) in (
                vdisk.InvalidImageError,
                vdisk.UnsupportedFeatureError,
                vdisk.ReferenceDeniedError,
            ), type(err.value)


def test_every_ova_case(ova_cases: tuple[Path, list[Case]], tmp_path: Path) -> None:
    root, cases = ova_cases
    assert len(cases) >= 35
    for case in cases:
        path = root / case["name"]
        disk = disk_of(case["flags"])
        dst = tmp_path / "out.raw"
        dst.unlink(missing_ok=True)
        if case["expect"] == "ok":
            report = vdisk.convert(path, dst, disk=disk)
            assert sha256(dst) == case["sha256"], case["name"]
            with vdisk.open(path, disk=disk) as img:
                assert img.format == "ova"
                assert img.disk == (disk or 1)
                assert img.virtual_size == report.virtual_size == int(case["virtual_size"])
                info = img.info()
                assert info == cli_info(str(path), *case["flags"].split())
                disks = info["format-specific"]["data"]["disks"]
                assert [d["index"] for d in disks] == list(range(1, len(disks) + 1))
                assert disks[(disk or 1) - 1]["virtual-size"] == img.virtual_size
        else:
            with pytest.raises(vdisk.VdiskError) as err:
                vdisk.convert(path, dst, disk=disk)
            assert case["error"] in str(err.value), (case["name"], str(err.value))


def test_multi_disk_ova(ova_cases: tuple[Path, list[Case]], tmp_path: Path) -> None:
    root, _ = ova_cases
    path = root / "two-disks.ova"
    with vdisk.open(path) as img:
        assert (img.disk, img.disk_format, img.virtual_size) == (1, "vmdk", 6 * (1 << 20))
        disks = img.info()["format-specific"]["data"]["disks"]
        assert [(d["file"], d["format"], d["virtual-size"]) for d in disks] == [
            ("disk1.vmdk", "vmdk", 6 << 20),
            ("disk2.vmdk", "vmdk", (3 << 20) + 512),
        ]
    with pytest.raises(vdisk.UnsupportedFeatureError, match=r"disk=N.*1 'disk1\.vmdk'.*2 'disk2\.vmdk'"):
        vdisk.convert(path, tmp_path / "never.raw")
    assert not (tmp_path / "never.raw").exists()
    with vdisk.open(path, disk=2) as img:
        assert img.disk == 2 and img.virtual_size == (3 << 20) + 512
        first = img.read(0, 4096)
    report = vdisk.convert(path, tmp_path / "d2.raw", disk=2, format="ova")
    assert report.virtual_size == (3 << 20) + 512
    assert (tmp_path / "d2.raw").read_bytes()[:4096] == first
    with pytest.raises(ValueError):
        vdisk.open(path, disk=0)
    with pytest.raises(vdisk.UnsupportedFeatureError, match="there is no disk 3"):
        vdisk.open(path, disk=3)


def test_disk_numbers_only_for_ovas(vdi_cases: tuple[Path, list[Case]]) -> None:
    root, _ = vdi_cases
    with pytest.raises(vdisk.UnsupportedFeatureError, match="OVA"):
        vdisk.open(root / "version0.vdi", disk=1)


def test_compressed_ova_disk_reads_front_to_back_only(ova_cases: tuple[Path, list[Case]], tmp_path: Path) -> None:
    root, cases = ova_cases
    case = next(c for c in cases if c["name"] == "gzip-stream.ova")
    path = root / "gzip-stream.ova"
    with vdisk.open(path) as img:
        with pytest.raises(vdisk.UnsupportedFeatureError, match="front to back"):
            img.read(0, 512)
        with pytest.raises(vdisk.UnsupportedFeatureError):
            list(img.extents())
    seen: list[tuple[int, int]] = []
    vdisk.convert(path, tmp_path / "out.raw", progress=lambda d, t: seen.append((d, t)))
    assert sha256(tmp_path / "out.raw") == case["sha256"]
    assert seen and seen[-1] == (int(case["virtual_size"]),) * 2
