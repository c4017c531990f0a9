#!/usr/bin/env python3
"""Instruction counts of the development build against the portable build (issue 15).

Wall-clock and even CPU-time ratios swing by tens of percent on this 2-core machine whenever other
work runs, which hides a 5 % regression. Instructions executed do not swing: valgrind's callgrind
counts them, repeatably, whatever else the machine is doing. What could make the portable build
(linked by zig against glibc 2.17) slower is code generation and run-time CPU dispatch (zlib-rs's
AVX2/BMI2 inflate, structured-zstd's, SHA-NI): both show up as instruction counts, since the
baseline paths execute several times more instructions per byte.

For each variant of bench.py's image (a smaller disk, so callgrind's ~50x slowdown stays short)
it converts the image to raw with both builds on one thread under callgrind and prints the
instruction counts, portable / dev, and each build's count against qemu-img's (qemu-img under
callgrind too, `-m 1` without `-W`, one coroutine at a time). The issue's bar: the portable
build's ratio to qemu-img within 5 % of the development build's, i.e. portable / dev <= 1.05.

    python3 benches/instructions.py [--portable dist/vdisk-*-x86_64-linux-gnu] [--record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (same folder: image making, variants, machine description)

ROOT = bench.ROOT
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def instructions(cmd: list[str], work: Path) -> int:
    """Instructions executed by cmd (all threads), counted by callgrind."""
    out = work / "callgrind.out"
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed under callgrind ({proc.returncode}):\n{proc.stderr[-2000:]}")
    out.unlink(missing_ok=True)
    m = COLLECTED.search(proc.stderr)
    if not m:
        raise SystemExit(f"no instruction count from callgrind for {' '.join(cmd)}")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disk", default="1G:160M", help="DISK:DATA sizes of the test image (default 1G:160M)")
    ap.add_argument("--variants", default="all", help="comma-separated subset of: " + ",".join(v[0] for v in bench.VARIANTS))
    ap.add_argument("--work", type=Path, default=ROOT / "benches" / "work")
    ap.add_argument("--portable", type=Path, default=None, help="the portable binary (default: the newest dist/vdisk-*-x86_64-linux-gnu, built if missing)")
    ap.add_argument("--no-qemu", action="store_true", help="skip qemu-img (only portable / dev)")
    ap.add_argument("--record", action="store_true", help="append the table to benches/RESULTS.md")
    args = ap.parse_args()

    bench.run(["cargo", "build", "--release", "-q", "-p", "vdisk-cli"], cwd=ROOT)
    dev = ROOT / "target" / "release" / "vdisk"
    portable = args.portable
    if portable is None:
        found = sorted(ROOT.glob("dist/vdisk-*-x86_64-linux-gnu"))
        if not found:
            print("building the portable vdisk (packaging/build.sh)", flush=True)
            bench.run(["bash", "packaging/build.sh"], cwd=ROOT, env={**__import__("os").environ, "VDISK_ARCHES": "x86_64"}, stdout=subprocess.DEVNULL)
            found = sorted(ROOT.glob("dist/vdisk-*-x86_64-linux-gnu"))
        portable = found[-1]

    args.work.mkdir(parents=True, exist_ok=True)
    disk_s, data_s = args.disk.split(":")
    raw = bench.make_disk(args.work, bench.size_arg(disk_s), bench.size_arg(data_s))
    chosen = bench.VARIANTS if args.variants == "all" else [v for v in bench.VARIANTS if v[0] in args.variants.split(",")]
    out = Path("/dev/shm") / "vdisk-instructions.raw"

    versions = [subprocess.run([str(b), "--version"], capture_output=True, text=True).stdout.strip() for b in (dev, portable)]
    lines = [
        f"### {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, instructions (callgrind), {args.disk} disk",
        "",
        f"dev = `target/release/vdisk` ({versions[0]}), portable = `{portable.relative_to(ROOT) if portable.is_relative_to(ROOT) else portable}` ({versions[1]}); "
        "one thread each, output to /dev/shm.",
        "",
        "| variant | dev instructions | portable instructions | portable / dev | qemu-img instructions | dev / qemu-img | portable / qemu-img |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines[-2:]), flush=True)
    worst = 0.0
    for name, fmt, opts in chosen:
        image = raw if opts is None else raw.with_name(raw.name.replace(".raw", f".{name}"))
        if opts is not None and not image.exists():
            bench.run(["qemu-img", "convert", "-f", "raw", *opts, str(raw), str(image)])
        counts = []
        for binary in (dev, portable):
            counts.append(instructions([str(binary), "convert", "--threads", "1", "-f", "raw" if opts is None else fmt, "-O", "raw", str(image), str(out)], args.work))
            out.unlink(missing_ok=True)
        q = None
        if not args.no_qemu:
            q = instructions(["qemu-img", "convert", "-m", "1", "-f", fmt, "-O", "raw", str(image), str(out)], args.work)
            out.unlink(missing_ok=True)
        rel = counts[1] / counts[0]
        worst = max(worst, rel)
        qcols = f"{q:,} | {counts[0] / q:.3f} | {counts[1] / q:.3f}" if q else " | | "
        row = f"| {name} | {counts[0]:,} | {counts[1]:,} | {rel:.4f} | {qcols} |"
        lines.append(row)
        print(row, flush=True)
    verdict = f"Largest portable / dev: {worst:.4f} ({'within' if worst <= 1.05 else 'OVER'} the 5 % bar)."
    lines += ["", verdict, ""]
    print(verdict)
    if args.record:
        with open(ROOT / "benches" / "RESULTS.md", "a") as f:
            f.write("\n" + "\n".join(lines))
        print("recorded in benches/RESULTS.md")
    if worst > 1.05:
        sys.exit(1)


if __name__ == "__main__":
    main()
