"""vdisk.convert(output_format=..., options=..., compress=..., preset=...) and vdisk.measure."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import vdisk
from conftest import MiB, cli, need


def qemu_ok(*args: str) -> str:
    run = subprocess.run([need("qemu-img"), *args], capture_output=True, text=True, check=False)
    assert run.returncode == 0, (args, run.stdout, run.stderr)
    return run.stdout


@pytest.mark.parametrize(
    ("output_format", "options", "compress", "qemu_format"),
    [
        ("qcow2", None, False, "qcow2"),
        ("qcow2", {"compat": "0.10", "cluster_size": "4k"}, True, "qcow2"),
        ("qcow2", {"compression_type": "zstd"}, True, "qcow2"),
        ("vmdk", None, True, "vmdk"),
        ("vmdk", {"subformat": "monolithicSparse"}, False, "vmdk"),
        ("vpc", {"subformat": "fixed"}, False, "vpc"),
        ("vhdx", None, False, "vhdx"),
    ],
)
def test_export_formats(
    raw_image: Path, tmp_path: Path, output_format: str, options: dict[str, str] | None, compress: bool, qemu_format: str
) -> None:
    out = tmp_path / f"out.{output_format}"
    seen: list[tuple[int, int]] = []
    report = vdisk.convert(
        raw_image,
        out,
        output_format=output_format,  # type: ignore[arg-type]
        options=options,
        compress=compress,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert report.output_length == out.stat().st_size
    assert report.virtual_size == 64 * MiB
    assert seen and seen[-1] == (64 * MiB, 64 * MiB)
    if qemu_format != "vpc":
        qemu_ok("check", "-f", qemu_format, str(out))
    qemu_ok("compare", "-f", "raw", "-F", qemu_format, str(raw_image), str(out))
    with vdisk.open(out) as img:
        assert img.read(0, 8192) == raw_image.read_bytes()[:8192]
    assert [p.name for p in tmp_path.iterdir() if "vdisk-tmp" in p.name] == []


def test_presets_and_errors(raw_image: Path, tmp_path: Path) -> None:
    out = tmp_path / "esxi.vmdk"
    vdisk.convert(raw_image, out, preset="esxi")
    head = out.read_bytes()[:512 * 21]
    assert head[:4] == b"KDMV" and b'createType="streamOptimized"' in head
    azure = tmp_path / "azure.vhd"
    vdisk.convert(raw_image, azure, preset="azure")
    assert azure.stat().st_size == 64 * MiB + 512
    odd = tmp_path / "odd.raw"
    with open(odd, "wb") as f:
        f.truncate(64 * MiB + 512)
    with pytest.raises(vdisk.TargetError, match="round-up-mib"):
        vdisk.convert(odd, tmp_path / "odd.vhd", preset="azure")
    assert not (tmp_path / "odd.vhd").exists()
    report = vdisk.convert(odd, tmp_path / "odd.vhd", preset="azure", round_up_mib=True)
    assert report.output_length == 65 * MiB + 512
    with pytest.raises(vdisk.TargetError, match="cluster_size"):
        vdisk.convert(raw_image, tmp_path / "x.qcow2", output_format="qcow2", options={"cluster_size": "3k"})
    with pytest.raises(vdisk.TargetError, match="preset"):
        vdisk.convert(raw_image, tmp_path / "x.qcow2", output_format="vhdx", preset="openstack")
    with pytest.raises(ValueError):
        vdisk.convert(raw_image, tmp_path / "x.qcow2", output_format="qcow2", checksum=True)


def test_measure_matches_the_cli(raw_image: Path) -> None:
    for fmt, opts in [("qcow2", {}), ("qcow2", {"cluster_size": "2M"}), ("vmdk", {}), ("vpc", {}), ("raw", {})]:
        m = vdisk.measure(raw_image, output_format=fmt, options=opts)  # type: ignore[arg-type]
        args = ["measure", "-O", fmt, "--output", "json"]
        for k, v in opts.items():
            args += ["-o", f"{k}={v}"]
        expected = json.loads(cli(*args, str(raw_image)).stdout)
        assert (m.required, m.fully_allocated) == (expected["required"], expected["fully-allocated"])
    empty = vdisk.measure(output_format="qcow2", size=1 << 30)
    assert (empty.required, empty.fully_allocated) == (393216, 1074135040)
    assert vdisk.measure(raw_image, preset="openstack") == vdisk.measure(raw_image, output_format="qcow2")
    with pytest.raises(ValueError):
        vdisk.measure()
