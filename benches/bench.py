#!/usr/bin/env python3
"""Side-by-side benchmark: `vdisk convert` against `qemu-img convert -m 16 -W`.

One command builds realistic images (an ext4 file system filled with real files from /usr, about
1 GB of data in a 4 GiB disk, and a larger one), converts them to every format and compressed
variant with qemu-img, then times both tools converting each back to a raw file, alternating
which goes first, for several rounds. It prints medians, the vdisk/qemu-img ratio per variant,
peak RSS, and `cp --sparse=always` of the raw image as the write-bandwidth limit, and appends the
table with a machine description to benches/RESULTS.md (with --record).

    python3 benches/bench.py                 # default: 4G:1G disk, 5 rounds
    python3 benches/bench.py --disks 4G:1G,16G:3G --rounds 5 --record
    python3 benches/bench.py --portable      # also the portable build users install
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, qemu-img -f name, qemu-img convert options to make it)
VARIANTS = [
    ("qcow2", "qcow2", ["-O", "qcow2"]),
    ("qcow2-zlib", "qcow2", ["-O", "qcow2", "-c"]),
    ("qcow2-zstd", "qcow2", ["-O", "qcow2", "-c", "-o", "compression_type=zstd"]),
    ("vmdk-sparse", "vmdk", ["-O", "vmdk"]),
    ("vmdk-stream", "vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    ("vhd-dynamic", "vpc", ["-O", "vpc", "-o", "force_size=on"]),
    ("vhdx-dynamic", "vhdx", ["-O", "vhdx"]),
    ("raw", "raw", None),
]

# Real files to fill the file system with, in order of preference.
SOURCES = ["/usr/lib", "/usr/share", "/usr/bin", "/usr/local", "/usr/libexec", "/usr/sbin"]


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(n: float) -> str:
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"]:
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


TIME = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)


def timed(cmd: list[str]) -> tuple[float, int]:
    """Run cmd; return (wall seconds, peak RSS bytes of the child)."""
    wall, rss, _ = timed_cpu(cmd)
    return wall, rss


def timed_cpu(cmd: list[str]) -> tuple[float, int, float]:
    """Run cmd; return (wall seconds, peak RSS bytes, CPU seconds (user + system)) of the child.

    Peak RSS and CPU time come from GNU time (%M, %U, %S): the rusage of a child started by Python
    would include Python's own pages (vfork shares them until exec), hiding anything smaller than
    Python. CPU time is what compares two builds of the same code on a machine other work is
    loading: it does not count the time spent waiting for a core.
    """
    argv = [TIME, "-f", "%U %S %M", *cmd] if TIME else cmd
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err}")
    rss, cpu = 0, 0.0
    if TIME:
        fields = err.strip().splitlines()[-1].split() if err.strip() else []
        if len(fields) == 3:
            cpu = float(fields[0]) + float(fields[1])
            rss = int(fields[2]) * 1024
    return elapsed, rss, cpu


def fill_tree(dest: Path, budget: int) -> int:
    """Copy real files from /usr into dest until `budget` bytes; returns bytes copied."""
    copied = 0
    for src in SOURCES:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not (st.st_mode & 0o170000 == 0o100000) or st.st_size == 0:
                    continue
                if copied + st.st_size > budget:
                    continue
                target = dest / os.path.relpath(path, "/")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(path, target)
                except OSError:
                    continue
                copied += st.st_size
                if copied >= budget * 0.995:
                    return copied
    return copied


def make_disk(work: Path, disk: int, data: int) -> Path:
    raw = work / f"disk-{disk >> 30}G-{data >> 20}M.raw"
    if raw.exists():
        return raw
    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    copied = fill_tree(staging, data)
    print(f"  filled {human(copied)} of real files for a {human(disk)} disk", flush=True)
    tmp = raw.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(disk)
    run(["mkfs.ext4", "-q", "-F", "-d", str(staging), str(tmp)])
    shutil.rmtree(staging)
    tmp.rename(raw)
    return raw


def machine(target: Path) -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    fs = subprocess.run(["df", "-T", str(target)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    return (
        f"{os.cpu_count()} cores ({cpu}), {human(mem)} RAM, kernel {platform.release()}, "
        f"target file system {fs[1] if len(fs) > 1 else '?'}; {qemu}; vdisk {commit}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disks", default="4G:1G", help="comma-separated DISK:DATA sizes (default 4G:1G)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="all", help="comma-separated subset of: " + ",".join(v[0] for v in VARIANTS))
    ap.add_argument("--work", type=Path, default=ROOT / "benches" / "work", help="where images are made")
    ap.add_argument("--target-dir", type=Path, default=None, help="where outputs are written (default: --work; e.g. /dev/shm to take the disk out)")
    ap.add_argument("--threads", type=int, default=None, help="vdisk --threads (default: all cores)")
    ap.add_argument("--record", action="store_true", help="append the results to benches/RESULTS.md")
    ap.add_argument(
        "--portable",
        action="store_true",
        help="also time the portable binary packaging/build.sh makes (glibc 2.17, linked by zig), "
        "side by side with the development build, each with its own ratio to qemu-img",
    )
    args = ap.parse_args()

    chosen = VARIANTS if args.variants == "all" else [v for v in VARIANTS if v[0] in args.variants.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    print("building vdisk (release)", flush=True)
    run(["cargo", "build", "--release", "-q", "-p", "vdisk-cli"], cwd=ROOT)
    builds = [("vdisk", str(ROOT / "target" / "release" / "vdisk"))]
    if args.portable:
        print("building the portable vdisk (packaging/build.sh)", flush=True)
        run(["bash", "packaging/build.sh"], cwd=ROOT, env={**os.environ, "VDISK_ARCHES": "x86_64"}, stdout=subprocess.DEVNULL)
        portable = sorted(ROOT.glob("dist/vdisk-*-x86_64-linux-gnu"))[-1]
        builds.append(("portable", str(portable)))
    out = (args.target_dir or args.work) / "out.raw"

    lines = [f"### {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.rounds} rounds", "", machine(out.parent), ""]
    if len(builds) > 1:
        lines += [f"Builds: {', '.join(f'{n} = `{os.path.relpath(p, ROOT)}`' for n, p in builds)}.", ""]
    cols = "".join(f" {n} median s |" for n, _ in builds) + " qemu-img median s |" + "".join(f" {n} ratio |" for n, _ in builds)
    rss_cols = "".join(f" {n} peak RSS |" for n, _ in builds) + " qemu-img peak RSS |"
    # CPU seconds (user + system) per build and qemu-img, and each build's CPU ratio to qemu-img:
    # robust where other work shares the machine.
    cpu_cols = "".join(f" {n} CPU s |" for n, _ in builds) + " qemu-img CPU s |" + "".join(f" {n} CPU ratio |" for n, _ in builds)
    header = f"| disk | variant | image size |{cols}{rss_cols}{cpu_cols}"
    ncols = 3 + 2 * len(builds) + 1 + len(builds) + 1 + 2 * len(builds) + 1
    lines += [header, "|" + "---|" * ncols]
    print(header)
    blank = " |" * (ncols - 4)

    def clean() -> None:
        if out.exists():
            out.unlink()
        os.sync()

    for spec in args.disks.split(","):
        disk_s, data_s = spec.split(":")
        disk, data = size_arg(disk_s), size_arg(data_s)
        print(f"preparing {disk_s} disk with {data_s} of files", flush=True)
        raw = make_disk(args.work, disk, data)
        # Write-bandwidth limit: cp of the raw image, keeping holes.
        cp_times = []
        for _ in range(args.rounds):
            clean()
            cp_times.append(timed(["cp", "--sparse=always", str(raw), str(out)])[0])
        clean()
        row = f"| {disk_s}/{data_s} | cp --sparse=always (raw) | {human(raw.stat().st_blocks * 512)} | {statistics.median(cp_times):.2f} |{blank}"
        print(row, flush=True)
        lines.append(row)
        # Make every variant first, then let writeback settle, so no measurement overlaps the
        # flushing of a just-written image.
        images = {}
        for name, fmt, opts in chosen:
            image = raw if opts is None else args.work / f"{raw.stem}.{name}"
            if opts is not None and not image.exists():
                print(f"  making {image.name}", flush=True)
                run(["qemu-img", "convert", "-f", "raw", *opts, str(raw), str(image) + ".tmp"])
                os.rename(str(image) + ".tmp", image)
            images[name] = image
        os.sync()
        time.sleep(2)
        for name, fmt, opts in chosen:
            image = images[name]
            # One (command, times, peak RSS) per vdisk build, then qemu-img last.
            runs: list[tuple[list[str], list[float], list[int], list[float]]] = []
            for _, binary in builds:
                vcmd = [binary, "convert", "-f", fmt, "-O", "raw", str(image), str(out)]
                if args.threads:
                    vcmd[2:2] = ["--threads", str(args.threads)]
                runs.append((vcmd, [], [], []))
            runs.append((["qemu-img", "convert", "-m", "16", "-W", "-f", fmt, "-O", "raw", str(image), str(out)], [], [], []))
            for r in range(args.rounds):
                # Rotate who goes first each round, so page-cache and thermal effects spread evenly.
                k = r % len(runs)
                for cmd, times, rss, cpus in runs[k:] + runs[:k]:
                    clean()
                    t, m, c = timed_cpu(cmd)
                    times.append(t)
                    rss.append(m)
                    cpus.append(c)
            clean()
            medians = [statistics.median(times) for _, times, _, _ in runs]
            mt = medians[-1]
            cpu_medians = [statistics.median(cpus) for _, _, _, cpus in runs]
            ct = cpu_medians[-1]
            row = (
                f"| {disk_s}/{data_s} | {name} | {human(image.stat().st_blocks * 512)} |"
                + "".join(f" {m:.2f} |" for m in medians)
                + "".join(f" {m / mt:.2f} |" for m in medians[:-1])
                + "".join(f" {human(max(rss))} |" for _, _, rss, _ in runs)
                + "".join(f" {c:.2f} |" for c in cpu_medians)
                + "".join(f" {c / ct:.2f} |" if ct else " - |" for c in cpu_medians[:-1])
            )
            print(row, flush=True)
            lines.append(row)

    # An empty 1 TiB qcow2: metadata only.
    empty = args.work / "empty-1T.qcow2"
    if not empty.exists():
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(empty), "1T"])
    cmds = [[binary, "convert", str(empty), str(out)] for _, binary in builds]
    cmds.append(["qemu-img", "convert", "-m", "16", "-W", "-O", "raw", str(empty), str(out)])
    samples: list[list[float]] = [[] for _ in cmds]
    for _ in range(args.rounds):
        for cmd, times in zip(cmds, samples):
            clean()
            times.append(timed(cmd)[0])
    clean()
    medians = [statistics.median(t) for t in samples]
    row = (
        f"| 1T/0 | empty qcow2 | {human(empty.stat().st_blocks * 512)} |"
        + "".join(f" {m:.3f} |" for m in medians)
        + "".join(f" {m / medians[-1]:.2f} |" for m in medians[:-1])
        + " |" * (len(builds) + 1)
        + " |" * (3 * len(builds) + 1)
    )
    print(row)
    lines.append(row)

    if args.record:
        results = ROOT / "benches" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmark results\n\nProduced by `python3 benches/bench.py --record`; newest last.\n\n")
        with open(results, "a") as f:
            f.write("\n".join(lines) + "\n\n")
        print(f"recorded in {results}")


if __name__ == "__main__":
    sys.exit(main())
