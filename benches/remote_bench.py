#!/usr/bin/env python3
"""Remote-source benchmark: `vdisk convert URL` against downloading first, and against the tools that
read URLs today, all in one run against the loopback server throttled to model object storage.

The server (testdata/http/server.py) caps every response at --rate bytes/s (one response per
connection at a time, so this is a per-connection cap, like an object store's ~85-90 MB/s per
connection scaled down to what this machine can serve) and adds --latency-ms before each answer.
The image is a qcow2 with --data of incompressible data scattered over a --disk sized disk.

Timed, alternating the order by round, medians over --rounds:
  reference       curl download to local disk, then qemu-img convert -m 16 -W (the DAG today)
  dl+vdisk        curl download, then vdisk convert of the local file
  vdisk URL xN    vdisk convert --http-connections N URL (for each N in --connections)
  vdisk item S    vdisk convert --http-connections N0 --item-size S URL (request size; N0 = 8)
  qemu curl       qemu-img convert -m 8 -W of the URL through qemu's curl driver, when its module is
                  found (--qemu-module-dir, or QEMU_MODULE_DIR; Debian's qemu-block-extra matching the
                  installed qemu, unpacked with dpkg -x)
  nbdkit curl     nbdkit's curl plugin serving the URL over NBD, converted by qemu-img (qemu reads NBD)

Every vdisk output is checked against the reference conversion with `vdisk compare`.

    python3 benches/remote_bench.py                          # 256 MiB of data, 8 MB/s, 20 ms
    python3 benches/remote_bench.py --rounds 3 --record      # append the table to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, human, machine, size_arg, timed_cpu  # noqa: E402


def make_image(work: Path, disk: int, data: int, seed: int = 1) -> Path:
    """A qcow2 of `disk` bytes with `data` bytes of random content in 1-8 MiB runs."""
    img = work / "served" / "disk.qcow2"
    if img.exists():
        return img
    img.parent.mkdir(parents=True, exist_ok=True)
    raw = work / "source.raw"
    rng = __import__("random").Random(seed)
    with open(raw, "wb") as f:
        f.truncate(disk)
        left = data
        slots = disk // (8 << 20)
        used: set[int] = set()
        while left > 0:
            slot = rng.randrange(slots)
            if slot in used:
                continue
            used.add(slot)
            n = min(left, rng.randrange(1, 9) << 20)
            f.seek(slot * (8 << 20))
            f.write(os.urandom(n))
            left -= n
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)], check=True)
    raw.unlink()
    return img


class Server:
    def __init__(self, root: Path, rate: int, latency_ms: float) -> None:
        script = ROOT / "testdata" / "http" / "server.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--root", str(root), "--port", "0", "--exit-on-stdin-eof",
             "--rate", str(rate), "--latency-ms", str(latency_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url("_stats/reset")) as r:
            return json.load(r)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disk", type=size_arg, default=size_arg("4G"))
    ap.add_argument("--data", type=size_arg, default=size_arg("256M"))
    ap.add_argument("--rate", type=size_arg, default=size_arg("8M"), help="bytes/s per connection (default 8M)")
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--connections", default="1,4,8,16")
    ap.add_argument("--item-sizes", default="1M,8M,16M", help="request sizes tried at 8 connections (4M is the default run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "benches" / "work" / "remote")
    ap.add_argument("--vdisk", default=str(ROOT / "target" / "release" / "vdisk"))
    ap.add_argument("--qemu-module-dir", default=os.environ.get("QEMU_MODULE_DIR"))
    ap.add_argument("--skip", default="", help="comma-separated runs to leave out (reference,dl+vdisk,qemu-curl,nbdkit-curl)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()

    vdisk = args.vdisk
    if not os.access(vdisk, os.X_OK):
        fallback = ROOT / "target" / "debug" / "vdisk"
        if not os.access(fallback, os.X_OK):
            raise SystemExit(f"no vdisk binary at {vdisk}: cargo build --release -p vdisk-cli")
        vdisk = str(fallback)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    img = make_image(work, args.disk, args.data)
    out = work / "out.raw"
    ref = work / "ref.raw"
    dl = work / "download.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(ref)], check=True)
    server = Server(img.parent, args.rate, args.latency_ms)
    url = server.url("disk.qcow2")
    skip = set(filter(None, args.skip.split(",")))

    def clean() -> None:
        for p in (out, dl):
            p.unlink(missing_ok=True)
        subprocess.run(["sync"])

    def check_vdisk_output(name: str) -> None:
        r = subprocess.run([vdisk, "compare", str(ref), str(out)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}: output differs from the reference conversion: {r.stdout}{r.stderr}")

    runs: list[tuple[str, list[list[str]], bool]] = []
    curl = ["curl", "-sSf", "-o", str(dl), url]
    if "reference" not in skip:
        runs.append(("reference (curl + qemu-img -m 16 -W)", [curl, ["qemu-img", "convert", "-m", "16", "-W", "-f", "qcow2", "-O", "raw", str(dl), str(out)]], False))
    if "dl+vdisk" not in skip:
        runs.append(("curl + vdisk convert", [curl, [vdisk, "convert", "-f", "qcow2", str(dl), str(out)]], True))
    for n in [int(c) for c in args.connections.split(",") if c]:
        runs.append((f"vdisk convert URL, {n} conn", [[vdisk, "convert", "--http-connections", str(n), url, str(out)]], True))
    for s in [c for c in args.item_sizes.split(",") if c]:
        runs.append((f"vdisk convert URL, 8 conn, {s} items", [[vdisk, "convert", "--http-connections", "8", "--item-size", str(size_arg(s)), url, str(out)]], True))
    if args.qemu_module_dir and "qemu-curl" not in skip:
        spec = json.dumps({"file.driver": "http", "file.url": url, "file.timeout": 3600})
        runs.append(("qemu-img curl driver (-m 8 -W)", [["env", f"QEMU_MODULE_DIR={args.qemu_module_dir}", "timeout", "600", "qemu-img", "convert", "-m", "8", "-W", "-f", "qcow2", "-O", "raw", "json:" + spec, str(out)]], False))
    if shutil.which("nbdkit") and "nbdkit-curl" not in skip:
        runs.append(("nbdkit curl + qemu-img (-m 16 -W)", [["nbdkit", "-U", "-", "curl", f"url={url}", "--run", f"qemu-img convert -m 16 -W -f qcow2 -O raw \"$uri\" {out}"]], False))

    results: dict[str, list[tuple[float, int, float, int, int]]] = {name: [] for name, _, _ in runs}
    for rnd in range(args.rounds):
        order = runs if rnd % 2 == 0 else list(reversed(runs))
        for name, cmds, is_vdisk in order:
            clean()
            server.stats()
            wall = cpu = 0.0
            rss = 0
            for cmd in cmds:
                w, m, c = timed_cpu(cmd)
                wall += w
                cpu += c
                rss = max(rss, m)
            st = server.stats()
            if is_vdisk:
                check_vdisk_output(name)
            results[name].append((wall, rss, cpu, int(st["requests"]), int(st["bytes"])))
            print(f"round {rnd + 1}: {name}: {wall:.2f} s, {st['requests']} requests, {human(st['bytes'])} fetched, RSS {human(rss)}", flush=True)
    server.stop()
    clean()

    size = img.stat().st_size
    ref_name = runs[0][0] if runs and "reference" in runs[0][0] else None
    ref_wall = statistics.median(w for w, *_ in results[ref_name]) if ref_name else None
    lines = [
        f"### Remote sources, {dt.date.today().isoformat()}",
        "",
        f"`python3 benches/remote_bench.py {' '.join(sys.argv[1:])}`: a qcow2 of {human(size)} "
        f"({human(args.data)} of random data in 1-8 MiB runs over a {human(args.disk)} disk), served from loopback at "
        f"{human(args.rate)}/s per connection with {args.latency_ms:g} ms before each answer. Medians of {args.rounds} rounds, "
        f"order alternating; every vdisk output compared equal to the reference conversion. vdisk binary: {os.path.relpath(vdisk, ROOT)}.",
        "",
        f"Machine: {machine(work)}.",
        "",
        "| run | seconds | vs reference | requests | fetched | MB/s of data | CPU s | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, _ in runs:
        rs = results[name]
        wall = statistics.median(r[0] for r in rs)
        rss = max(r[1] for r in rs)
        reqs = int(statistics.median(r[3] for r in rs))
        fetched = int(statistics.median(r[4] for r in rs))
        ratio = f"{wall / ref_wall:.2f}" if ref_wall else "-"
        cpu = statistics.median(r[2] for r in rs)
        lines.append(
            f"| {name} | {wall:.2f} | {ratio} | {reqs} | {human(fetched)} | {args.data / wall / 1e6:.1f} | {cpu:.1f} | {human(rss) if rss else '-'} |"
        )
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.record:
        with open(ROOT / "benches" / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
