#!/usr/bin/env python3
"""Side-by-side benchmark of verification: `vdisk checksum`, `vdisk compare`, `convert --checksum`.

On the image bench.py builds (an ext4 file system holding real files from /usr: 1 GB of data in a
4 GiB disk), in one run, alternating the order of the tools each round, page cache warm:

- `vdisk checksum` (blkhash) of the raw image and of its qcow2, against `sha256sum` of the raw
  image and the Python hashlib loop the example DAG used to verify (8 MiB reads, sha256);
- `vdisk compare` against `qemu-img compare` on the qcow2 and its raw conversion;
- `vdisk convert --checksum` against a plain `vdisk convert` of the qcow2 (and the zlib qcow2).

Prints medians and ratios; appends the table to benches/RESULTS.md with --record.

    python3 benches/verify_bench.py --rounds 5 --record
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
import bench  # noqa: E402  (the shared helpers: building the disk, timing, machine line)

ROOT = bench.ROOT

HASHLIB_LOOP = """
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    while chunk := f.read(8 << 20):
        h.update(chunk)
print(h.hexdigest())
"""


def output(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of a command. CPU time is what a loaded machine does
    not distort: the work done, whatever the other processes took."""
    argv = [bench.TIME, "-f", "%U %S", *cmd] if bench.TIME else cmd
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err}")
    try:
        user, system = (float(x) for x in err.splitlines()[-1].split())
    except (ValueError, IndexError):
        user = system = float("nan")
    return wall, user + system


WALL: dict[str, float] = {}
CPU: dict[str, float] = {}


def median_pair(rounds: int, a: list[str], b: list[str], before=None) -> tuple[float, float]:
    """Median wall seconds of commands a and b, alternating which goes first; their median CPU
    seconds are kept in CPU under the commands' text."""
    ta, tb, ca, cb = [], [], [], []
    for r in range(rounds):
        order = [(a, ta, ca), (b, tb, cb)]
        if r % 2:
            order.reverse()
        for cmd, times, cpus in order:
            if before:
                before()
            wall, cpu = timed(cmd)
            times.append(wall)
            cpus.append(cpu)
    for cmd, times, cpus in [(a, ta, ca), (b, tb, cb)]:
        WALL[" ".join(cmd)] = statistics.median(times)
        CPU[" ".join(cmd)] = statistics.median(cpus)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disk", default="4G:1G", help="DISK:DATA size of the benchmark disk (default 4G:1G)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=ROOT / "benches" / "work", help="where images are made")
    ap.add_argument("--target-dir", type=Path, default=None, help="where conversions are written (default: --work)")
    ap.add_argument("--record", action="store_true", help="append the results to benches/RESULTS.md")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    print("building vdisk (release)", flush=True)
    bench.run(["cargo", "build", "--release", "-q", "-p", "vdisk-cli"], cwd=ROOT)
    vdisk = str(ROOT / "target" / "release" / "vdisk")
    disk_s, data_s = args.disk.split(":")
    raw = bench.make_disk(args.work, bench.size_arg(disk_s), bench.size_arg(data_s))
    images = {}
    for name, opts in [("qcow2", ["-O", "qcow2"]), ("qcow2-zlib", ["-O", "qcow2", "-c"])]:
        image = args.work / f"{raw.stem}.{name}"
        if not image.exists():
            print(f"  making {image.name}", flush=True)
            bench.run(["qemu-img", "convert", "-f", "raw", *opts, str(raw), str(image) + ".tmp"])
            os.rename(str(image) + ".tmp", image)
        images[name] = image
    out_dir = args.target_dir or args.work
    converted = out_dir / "verify-converted.raw"
    if converted.exists():
        converted.unlink()
    bench.run([vdisk, "convert", str(images["qcow2"]), str(converted)])
    out = out_dir / "verify-out.raw"

    def clean() -> None:
        if out.exists():
            out.unlink()
        os.sync()

    # Same answers first: every digest of the same content agrees.
    blk = {p: output([vdisk, "checksum", str(p)]).split()[0] for p in [raw, images["qcow2"], images["qcow2-zlib"], converted]}
    assert len(set(blk.values())) == 1, blk
    plain = output(["sha256sum", str(raw)]).split()[0]
    assert output([vdisk, "checksum", "-a", "sha256", str(images["qcow2"])]).split()[0] == plain
    assert output([sys.executable, "-c", HASHLIB_LOOP, str(raw)]).strip() == plain
    assert output([vdisk, "compare", str(images["qcow2"]), str(converted)]).strip() == "Images are identical."
    # Warm the page cache.
    for p in [raw, images["qcow2"], images["qcow2-zlib"], converted]:
        subprocess.run(["cat", str(p)], check=True, stdout=subprocess.DEVNULL)

    title = f"### verification, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.rounds} rounds, {args.disk} disk"
    lines = [title, "", bench.machine(out.parent), ""]
    header = "| measurement | vdisk s | other s | other | ratio vdisk/other | target | vdisk CPU s | other CPU s |"
    lines += [header, "|---|---|---|---|---|---|---|---|"]
    print(header, flush=True)

    def row(what: str, ours: list[str], theirs: list[str], other: str, target: str) -> None:
        o, t = " ".join(ours), " ".join(theirs)
        line = (
            f"| {what} | {WALL[o]:.3f} | {WALL[t]:.3f} | {other} | {WALL[o] / WALL[t]:.3f} | {target} | "
            f"{CPU[o]:.2f} | {CPU[t]:.2f} |"
        )
        print(line, flush=True)
        lines.append(line)

    r = args.rounds
    sha256sum = ["sha256sum", str(raw)]
    pyloop = [sys.executable, "-c", HASHLIB_LOOP, str(raw)]
    for image in [raw, images["qcow2"]]:
        ours = [vdisk, "checksum", str(image)]
        median_pair(r, ours, sha256sum)
        row(f"checksum of the {'raw image' if image == raw else 'qcow2'}", ours, sha256sum, "sha256sum (raw)", "<= 0.1")
    median_pair(max(1, r // 2), [vdisk, "checksum", str(raw)], pyloop)
    row("checksum of the raw image", [vdisk, "checksum", str(raw)], pyloop, "Python hashlib loop of the old DAG (one side)", "")
    ours = [vdisk, "checksum", "-a", "sha256", str(raw)]
    median_pair(max(1, r // 2), ours, sha256sum)
    row("checksum -a sha256 of the raw image", ours, sha256sum, "sha256sum (raw)", "")
    for image in [images["qcow2"], raw]:
        ours = [vdisk, "compare", str(image), str(converted)]
        theirs = ["qemu-img", "compare", str(image), str(converted)]
        median_pair(r, ours, theirs)
        row(f"compare the {'qcow2' if image != raw else 'raw image'} with its conversion", ours, theirs, "qemu-img compare", "<= 0.5")
    for name in ["qcow2", "qcow2-zlib"]:
        ours = [vdisk, "convert", "--checksum", str(images[name]), str(out)]
        theirs = [vdisk, "convert", str(images[name]), str(out)]
        median_pair(r, ours, theirs, before=clean)
        row(f"convert --checksum of the {name}", ours, theirs, "plain vdisk convert", "<= 1.15")
    clean()
    converted.unlink()

    if args.record:
        results = ROOT / "benches" / "RESULTS.md"
        with open(results, "a") as f:
            f.write("\n".join(lines) + "\n\n")
        print(f"recorded in {results}")


if __name__ == "__main__":
    sys.exit(main())
