#!/usr/bin/env python3
"""Side-by-side export benchmark: `vdisk convert -O FMT [-c]` against
`qemu-img convert -O FMT [-c] -m 16 -W`, from the same raw image (an ext4 file system filled with
real files, as benches/bench.py builds it).

Each round times both tools writing each variant (qcow2, qcow2 -c zlib, qcow2 -c zstd,
streamOptimized VMDK, dynamic VHD, dynamic VHDX), alternating which goes first, output deleted
and `sync` between runs. vdisk syncs its output before renaming it into place (a finished export
is durable); qemu-img leaves it in the page cache, so qemu-img is also timed followed by
`sync FILE` (the same durability). Prints medians, the vdisk/qemu-img ratios of wall and CPU
time, peak RSS and output sizes; appends the table to benches/RESULTS.md with --record.

    python3 benches/export_bench.py --disk 2G:512M --rounds 3
    python3 benches/export_bench.py --vdisk target/debug/vdisk --record   # a given build
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared helpers: disk building, timing, machine description)

ROOT = bench.ROOT

# (name, extension, vdisk arguments, qemu-img arguments)
VARIANTS = [
    ("qcow2", "qcow2", ["-O", "qcow2"], ["-O", "qcow2"]),
    ("qcow2 -c zlib", "qcow2", ["-O", "qcow2", "-c"], ["-O", "qcow2", "-c"]),
    (
        "qcow2 -c zstd",
        "qcow2",
        ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
        ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
    ),
    ("vmdk streamOptimized", "vmdk", ["-O", "vmdk"], ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    ("vhd dynamic", "vhd", ["-O", "vpc"], ["-O", "vpc", "-o", "force_size=on"]),
    ("vhdx dynamic", "vhdx", ["-O", "vhdx"], ["-O", "vhdx"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disk", default="2G:512M", help="DISK:DATA sizes of the source (default 2G:512M)")
    ap.add_argument("--source", type=Path, default=None, help="use this raw image instead of building one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="all", help="comma-separated subset of the variant names")
    ap.add_argument("--work", type=Path, default=ROOT / "benches" / "work")
    ap.add_argument("--target-dir", type=Path, default=None, help="where outputs are written (default --work)")
    ap.add_argument("--vdisk", default=None, help="vdisk binary (default: build and use target/release/vdisk)")
    ap.add_argument("--record", action="store_true", help="append the results to benches/RESULTS.md")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    if args.vdisk:
        vdisk = str(Path(args.vdisk).resolve())
    else:
        print("building vdisk (release)", flush=True)
        bench.run(["cargo", "build", "--release", "-q", "-p", "vdisk-cli"], cwd=ROOT)
        vdisk = str(ROOT / "target" / "release" / "vdisk")
    if args.source:
        raw = args.source.resolve()
    else:
        disk_s, data_s = args.disk.split(":")
        raw = bench.make_disk(args.work, bench.size_arg(disk_s), bench.size_arg(data_s))
    chosen = VARIANTS if args.variants == "all" else [v for v in VARIANTS if v[0] in args.variants.split(",")]
    target = args.target_dir or args.work

    build = subprocess.run(["file", "-b", vdisk], capture_output=True, text=True).stdout.strip().split(",")[0]
    lines = [
        f"### Export, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.rounds} rounds",
        "",
        bench.machine(target) + f"; vdisk binary `{os.path.relpath(vdisk, ROOT)}` ({build})",
        "",
        f"Source: `{raw.name}`, {bench.human(raw.stat().st_size)} disk, {bench.human(raw.stat().st_blocks * 512)} allocated.",
        "",
    ]
    header = (
        "| variant | vdisk s | qemu-img s | wall ratio | qemu-img + sync s | ratio to + sync "
        "| vdisk CPU s | qemu-img CPU s | CPU ratio | vdisk RSS | qemu-img RSS | vdisk size | qemu-img size | size ratio |"
    )
    lines += [header, "|" + "---|" * 14]
    print(header, flush=True)
    for name, ext, vargs, qargs in chosen:
        outs = {"vdisk": target / f"export-vdisk.{ext}", "qemu": target / f"export-qemu.{ext}"}
        qemu = ["qemu-img", "convert", "-m", "16", "-W", "-f", "raw", *qargs, str(raw), str(outs["qemu"])]
        cmds = {
            "vdisk": [vdisk, "convert", "-f", "raw", *vargs, str(raw), str(outs["vdisk"])],
            "qemu": qemu,
            "qemu+sync": ["sh", "-c", '"$@" && sync "$0"', str(outs["qemu"]), *qemu],
        }
        stats: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": [], "rss": [], "size": []} for k in cmds}
        order = list(cmds)
        for r in range(args.rounds):
            for tool in order[r % 3 :] + order[: r % 3]:
                for p in outs.values():
                    if p.exists():
                        p.unlink()
                os.sync()
                wall, rss, cpu = bench.timed_cpu(cmds[tool])
                stats[tool]["wall"].append(wall)
                stats[tool]["cpu"].append(cpu)
                stats[tool]["rss"].append(rss)
                stats[tool]["size"].append(outs["vdisk" if tool == "vdisk" else "qemu"].stat().st_size)
        for p in outs.values():
            if p.exists():
                p.unlink()
        med = {t: {k: statistics.median(v) for k, v in s.items()} for t, s in stats.items()}
        v, q, qs = med["vdisk"], med["qemu"], med["qemu+sync"]
        row = (
            f"| {name} | {v['wall']:.2f} | {q['wall']:.2f} | {v['wall'] / q['wall']:.2f} "
            f"| {qs['wall']:.2f} | {v['wall'] / qs['wall']:.2f} "
            f"| {v['cpu']:.2f} | {q['cpu']:.2f} | {v['cpu'] / max(q['cpu'], 1e-9):.2f} "
            f"| {bench.human(v['rss'])} | {bench.human(q['rss'])} "
            f"| {bench.human(v['size'])} | {bench.human(q['size'])} | {v['size'] / q['size']:.3f} |"
        )
        print(row, flush=True)
        lines.append(row)
        time.sleep(1)
    if args.record:
        with open(ROOT / "benches" / "RESULTS.md", "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
        print("appended to benches/RESULTS.md")


if __name__ == "__main__":
    main()
