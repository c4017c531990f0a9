"""The example DAG (examples/airflow/vdisk_image_import.py) under real Apache Airflow 3.

Airflow is installed into a venv of its own under target/ (cached between runs, keyed by the
requirement and the Python version), with the freshly built vdisk wheel. The tests run
`airflow db migrate`, then the DAG with `dag.test(run_conf=...)`: an image that holds an ext4 file
system onto a loop device filled with garbage, and an OVA of two such disks onto two loop devices,
its disks fanned out by dynamic task mapping; they check the run's success, every mapped task
instance, each device's content, the progress lines in the log and the checksum verification.
Two more runs check that a retry finds the conversion's journal (here: an attempt that finished
writing but died before reporting, so the task writes nothing and still verifies), and that an
invalid image fails its task at once (AirflowFailException) instead of being retried.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import GiB, MiB, REPO, need, pattern, qemu_img, vdisk_bin

AIRFLOW_REQUIREMENT = "apache-airflow>=3,<4"
DAGS = REPO / "examples" / "airflow"
#: Size of the ext4 file system in the test image (not a multiple of 1 GiB, to exercise rounding).
IMAGE_SIZE = 96 * MiB
MARKER = b"beyond-the-virtual-size" * 100

DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import vdisk_image_import as module

run = module.image_import_dag.test(run_conf=json.loads(sys.argv[2]))
tis = run.get_task_instances()
tasks = sorted([ti.task_id, ti.map_index, str(ti.state)] for ti in tis)
tries = sorted([ti.task_id, ti.map_index, ti.try_number] for ti in tis)
print("DAG-RESULT " + json.dumps({"state": str(run.state), "tasks": tasks, "tries": tries}), flush=True)
"""

#: The DAG's tasks; every one but inspect_image is mapped over the disks.
TASKS = ("inspect_image", "volume_size", "convert", "verify")


def expected_tasks(disks: int) -> list[list[Any]]:
    """Every task instance of a successful run over `disks` disks."""
    rows = [["inspect_image", -1, "success"]]
    rows += [[t, i, "success"] for t in TASKS[1:] for i in range(disks)]
    return sorted(rows)


def run_dag(airflow: dict[str, Any], conf: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Run the DAG with `conf`; its result and the whole output."""
    run = subprocess.run(
        [airflow["python"], "-c", DRIVER, str(DAGS), json.dumps(conf)],
        env=airflow["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout + run.stderr
    result_lines = [line for line in run.stdout.splitlines() if line.startswith("DAG-RESULT ")]
    assert run.returncode == 0 and result_lines, out[-6000:]
    result: dict[str, Any] = json.loads(result_lines[-1][len("DAG-RESULT ") :])
    return result, out


def airflow_venv() -> Path:
    """The venv with Airflow, made once and reused while the requirement and Python stay the same."""
    key = hashlib.sha256(
        f"{AIRFLOW_REQUIREMENT} {sys.version_info[:2]} {platform.machine()}".encode()
    ).hexdigest()[:12]
    venv = REPO / "target" / f"airflow-venv-{key}"
    done = venv / ".installed"
    if done.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, AIRFLOW_REQUIREMENT], check=True)
    done.write_text(AIRFLOW_REQUIREMENT + "\n")
    return venv


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Airflow with the built vdisk wheel, and a migrated metadata database in a temporary home."""
    wheel = os.environ.get("VDISK_WHEEL")
    if not wheel:
        pytest.fail("VDISK_WHEEL is not set: run vdisk-py/run-tests.sh, which builds the wheel")
    venv = airflow_venv()
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--force-reinstall", wheel],
        check=True,
    )
    home = tmp_path_factory.mktemp("airflow-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VIRTUAL_ENV", "PYTHON"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}:/usr/sbin:/sbin",
    )
    run = subprocess.run([str(venv / "bin" / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    yield {"python": python, "env": env}


def make_ext4_image(tmp_path: Path, fmt: str) -> tuple[Path, bytes]:
    """An image holding an ext4 file system with some files; returns it and its guest content."""
    content = tmp_path / "content"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text("imported-by-vdisk\n")
    (content / "data.bin").write_bytes(pattern(5 * MiB + 123, 9))
    raw = tmp_path / "fs.raw"
    subprocess.run([need("mkfs.ext4"), "-q", "-F", "-d", str(content), str(raw), str(IMAGE_SIZE // 1024)], check=True)
    guest = raw.read_bytes()
    if fmt == "raw":
        image = tmp_path / "image.source"
        raw.rename(image)
    else:
        image = tmp_path / "image.source"  # no extension, as uploads arrive
        qemu_img("convert", "-c", "-f", "raw", "-O", fmt, str(raw), str(image))
    return image, guest


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_dag_converts_onto_a_loop_device(fmt: str, airflow: dict[str, Any], tmp_path: Path, loop_device: Any) -> None:
    image, guest = make_ext4_image(tmp_path, fmt)
    try:
        device = loop_device(GiB, name="volume.img")
    except pytest.skip.Exception as skip:
        print(f"SKIP: the Airflow DAG test needs a loop device: {skip}", file=sys.__stderr__, flush=True)
        raise
    # Garbage where the disk goes, and a marker after it that must survive.
    with open(device, "r+b") as dev:
        dev.write(b"\xa5" * IMAGE_SIZE)
        dev.write(MARKER)

    conf = {"image": str(image), "device": device, "min_volume_gb": 1, "journal_dir": str(tmp_path / "journals")}
    result, out = run_dag(airflow, conf)
    assert result["state"] == "success", out[-6000:]
    assert result["tasks"] == expected_tasks(1), result

    # The device holds the guest content, and nothing past it was touched.
    with open(device, "rb") as dev:
        assert hashlib.sha256(dev.read(len(guest))).hexdigest() == hashlib.sha256(guest).hexdigest()
        assert dev.read(len(MARKER)) == MARKER

    # The convert task's log has the progress lines, ending at 100 %.
    progress = [line for line in out.splitlines() if "vdisk progress:" in line]
    assert progress, out[-4000:]
    assert "(100.0%)" in progress[-1]
    # The other steps reported what they found.
    assert f"format {fmt}, virtual size {IMAGE_SIZE} bytes" in out
    assert "volume size: 1 GiB" in out
    assert "device content verified: blkhash" in out
    assert f"e2fsck -fn {device}: exit 0" in out
    # The journal stayed on the worker, one per run and task.
    journals = [p.name for p in (tmp_path / "journals").iterdir()]
    assert len(journals) == 1 and journals[0].startswith("vdisk_image_import."), journals


def test_dag_reads_the_upload_from_its_url(airflow: dict[str, Any], tmp_path: Path, loop_device: Any) -> None:
    """The upload given as an OCI pre-authenticated URL with a signed query: inspect and convert
    read it over HTTP (no download), the device verifies, and no secret reaches the output."""
    from test_remote import Server

    image, guest = make_ext4_image(tmp_path, "qcow2")
    root = tmp_path / "bucket"
    root.mkdir()
    image.rename(root / "image.source")
    try:
        device = loop_device(GiB, name="volume.img")
    except pytest.skip.Exception as skip:
        print(f"SKIP: the Airflow DAG test needs a loop device: {skip}", file=sys.__stderr__, flush=True)
        raise
    with open(device, "r+b") as dev:
        dev.write(b"\xa5" * IMAGE_SIZE)
    server = Server(root, "--require-header", "X-Upload-Token: HDRSECRET")
    try:
        url = server.url("p/PARSECRET/n/ns/b/uploads/o/image.source?sig=QSECRET")
        conf = {
            "image": url,
            "device": device,
            "http_headers": {"X-Upload-Token": "HDRSECRET"},
            "http_connections": 4,
            "journal_dir": str(tmp_path / "journals"),
        }
        result, out = run_dag(airflow, conf)
        stats = server.stats()
    finally:
        server.stop()
    assert result["state"] == "success", out[-6000:]
    assert result["tasks"] == expected_tasks(1), result
    with open(device, "rb") as dev:
        assert dev.read(len(guest)) == guest
    assert "format qcow2, virtual size" in out
    assert "device content verified: blkhash" in out
    assert server.url("p/.../n/ns/b/uploads/o/image.source?...") in out
    # No secret of the URL or header value anywhere in the run's output (task logs included).
    for secret in ("PARSECRET", "QSECRET", "HDRSECRET"):
        assert secret not in out, secret
    assert isinstance(stats["requests"], int) and stats["requests"] > 0, stats


def test_a_retry_finds_the_journal(airflow: dict[str, Any], tmp_path: Path, loop_device: Any) -> None:
    """An attempt that wrote everything but died before reporting: the retry writes nothing,
    still returns the content's checksum (hashed from the image), and verify passes."""
    image, guest = make_ext4_image(tmp_path, "qcow2")
    try:
        device = loop_device(GiB, name="volume.img")
    except pytest.skip.Exception as skip:
        print(f"SKIP: the Airflow DAG test needs a loop device: {skip}", file=sys.__stderr__, flush=True)
        raise
    with open(device, "r+b") as dev:
        dev.write(b"\xa5" * IMAGE_SIZE)
    journal = tmp_path / "retry.journal"
    done = subprocess.run(
        [vdisk_bin(), "convert", "-n", "--journal", str(journal), str(image), device], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    result, out = run_dag(airflow, {"image": str(image), "device": device, "journal": str(journal)})
    assert result["state"] == "success", out[-6000:]
    assert "the journal records this conversion as complete: nothing written" in out
    assert "device content verified: blkhash" in out
    with open(device, "rb") as dev:
        assert dev.read(len(guest)) == guest


def test_an_invalid_image_fails_without_retries(airflow: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "image.source"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 508)  # qcow2 magic, version 0xffffffff
    conf = {"image": str(bad), "device": str(tmp_path / "no-device"), "journal_dir": str(tmp_path)}
    result, out = run_dag(airflow, conf)
    assert result["state"] == "failed", out[-6000:]
    assert ["inspect_image", -1, "failed"] in result["tasks"], result
    assert ["inspect_image", -1, 1] in result["tries"], result
    assert "AirflowFailException: UnsupportedFeatureError: " in out, out[-6000:]


#: Sizes of the two disks of the OVA (neither a multiple of 1 GiB nor equal).
OVA_DISKS = (96 * MiB, 64 * MiB)


def make_two_disk_ova(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """An OVA holding two streamOptimized VMDKs, each an ext4 file system; returns it and each
    disk's guest content."""
    members: list[tuple[str, bytes]] = []
    guests: list[bytes] = []
    disk_lines, file_lines = [], []
    for i, size in enumerate(OVA_DISKS, 1):
        content = tmp_path / f"content{i}"
        content.mkdir()
        (content / "disk.txt").write_text(f"disk {i} of the OVA\n")
        (content / "data.bin").write_bytes(pattern(3 * MiB + 17 * i, 20 + i))
        raw = tmp_path / f"disk{i}.raw"
        subprocess.run([need("mkfs.ext4"), "-q", "-F", "-d", str(content), str(raw), str(size // 1024)], check=True)
        guests.append(raw.read_bytes())
        vmdk = tmp_path / f"disk{i}.vmdk"
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(vmdk))
        data = vmdk.read_bytes()
        members.append((f"vm-disk{i}.vmdk", data))
        file_lines.append(f'<File ovf:href="vm-disk{i}.vmdk" ovf:id="file{i}" ovf:size="{len(data)}"/>')
        disk_lines.append(
            f'<Disk ovf:capacity="{size // MiB}" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk{i}" '
            f'ovf:fileRef="file{i}" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>'
        )
    ovf = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
        'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>' + "".join(file_lines) + "</References>"
        "<DiskSection><Info>disks</Info>" + "".join(disk_lines) + "</DiskSection></Envelope>\n"
    ).encode()
    manifest = "".join(f"SHA256({n})= {hashlib.sha256(d).hexdigest()}\n" for n, d in [("vm.ovf", ovf), *members])
    ova = tmp_path / "upload.source"  # no extension, as uploads arrive
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in [("vm.ovf", ovf), ("vm.mf", manifest.encode()), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return ova, guests


def test_dag_fans_an_ova_out_disk_by_disk(airflow: dict[str, Any], tmp_path: Path, loop_device: Any) -> None:
    ova, guests = make_two_disk_ova(tmp_path)
    try:
        devices = [loop_device(GiB, name=f"volume{i}.img") for i in (1, 2)]
    except pytest.skip.Exception as skip:
        print(f"SKIP: the Airflow OVA test needs two loop devices: {skip}", file=sys.__stderr__, flush=True)
        raise
    for device, guest in zip(devices, guests):
        with open(device, "r+b") as dev:
            dev.write(b"\x5a" * len(guest))
            dev.write(MARKER)

    conf = {"image": str(ova), "devices": devices, "min_volume_gb": 1, "journal_dir": str(tmp_path / "journals")}
    result, out = run_dag(airflow, conf)
    assert result["state"] == "success", out[-6000:]
    assert result["tasks"] == expected_tasks(2), result

    for device, guest in zip(devices, guests):
        with open(device, "rb") as dev:
            assert hashlib.sha256(dev.read(len(guest))).hexdigest() == hashlib.sha256(guest).hexdigest(), device
            assert dev.read(len(MARKER)) == MARKER
        assert f"e2fsck -fn {device}: exit 0" in out
    assert "format ova, 2 disks" in out
    for i, size in enumerate(OVA_DISKS, 1):
        assert f"disk {i}: vm-disk{i}.vmdk, format vmdk, virtual size {size} bytes -> {devices[i - 1]}" in out
        assert f"disk {i} (vmdk)" in out
    assert sum("(100.0%)" in line for line in out.splitlines() if "vdisk progress:" in line) >= 2
    # One journal per mapped convert task, and each device verified by its checksum.
    assert len(list((tmp_path / "journals").iterdir())) == 2
    assert out.count("device content verified: blkhash") >= 2
