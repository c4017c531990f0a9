#!/usr/bin/env python3
"""Build the hostile-image corpus: malformed, truncated, looping and malicious images of every
format, made from small qemu-img images by editing their structures at known offsets.

    python3 testdata/hostile/make.py OUTDIR

writes OUTDIR/<case> files (some cases are folders of several files) and OUTDIR/cases.tsv with
columns `name  flags  expect  why`. `expect` is `error` (vdisk must refuse with exit 1 and one
`vdisk: ` line) or `any` (a clean refusal or a successful conversion; either way no panic, no
signal, no hang and bounded memory). Needs qemu-img and qemu-io. Deterministic.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

OUT: Path
CASES: list[tuple[str, str, str, str]] = []
SECRET = b"VDISK-DECOY-SECRET-" * 27  # 513 bytes: recognisable if it ever leaks into an output


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def qemu_io(fmt: str, path: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, stdout=subprocess.DEVNULL)


def write_sparse(path: Path, data: bytes) -> None:
    """Write data leaving 64 KiB runs of zeros as holes (the VHDX cases are mostly zeros)."""
    chunk = 64 << 10
    with open(path, "wb") as f:
        for i in range(0, len(data), chunk):
            piece = data[i : i + chunk]
            if piece.count(0) == len(piece):
                f.seek(len(piece), 1)
            else:
                f.write(piece)
        f.truncate(len(data))


def case(name: str, data: bytes, expect: str = "any", why: str = "", flags: str = "") -> None:
    write_sparse(OUT / name, data)
    CASES.append((name, flags, expect, why))


def put(data: bytes, offset: int, fmt: str, *values) -> bytes:
    b = bytearray(data)
    packed = struct.pack(fmt, *values)
    end = offset + len(packed)
    if end > len(b):
        b.extend(b"\0" * (end - len(b)))
    b[offset:end] = packed
    return bytes(b)


def get(data: bytes, offset: int, fmt: str):
    return struct.unpack_from(fmt, data, offset)[0]


def truncations(prefix: str, data: bytes, points: list[int]) -> None:
    for p in sorted(set(x for x in points if 0 <= x < len(data))):
        case(f"{prefix}-truncated-at-{p:#x}", data[:p], "any", "truncated inside a structure")


# --------------------------------------------------------------------------------------------
# qcow2 (big-endian header)


def qcow2_set_backing(d: bytes, name: bytes) -> bytes:
    """Point the header's backing file name at `name`, stored after the header extensions."""
    pos = get(d, 100, ">I")
    while pos + 8 <= len(d):
        kind, length = get(d, pos, ">I"), get(d, pos + 4, ">I")
        pos += 8
        if kind == 0:
            break
        pos += (length + 7) & ~7
    out = bytearray(d)
    out[pos : pos + len(name)] = name
    return put(put(bytes(out), 8, ">Q", pos), 16, ">I", len(name))


def qcow2_cases(tmp: Path) -> None:
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    qemu_io("qcow2", base, "write -P 0x11 0 192k", "write -P 0x22 20M 64k", "write -z 30M 64k", "write -c -P 0x33 40M 64k")
    d = base.read_bytes()
    cluster = 1 << get(d, 20, ">I")
    l1_off = get(d, 40, ">Q")
    rt_off = get(d, 48, ">Q")
    hlen = get(d, 100, ">I")
    l2_off = get(d, l1_off, ">Q") & 0x00FFFFFFFFFFFE00
    first_data = get(d, l2_off, ">Q") & 0x00FFFFFFFFFFFE00
    truncations("qcow2", d, [0, 1, 4, 20, 48, 71, 72, 100, 104, hlen, l1_off + 4, rt_off + 3, l2_off + 8, l2_off + cluster - 1, first_data + 100, len(d) - 1])
    size = len(d)
    case("qcow2-l1-past-eof", put(d, 40, ">Q", size + 16 * cluster))
    case("qcow2-l1-in-header", put(d, 40, ">Q", 0))
    case("qcow2-l1-misaligned", put(d, 40, ">Q", l1_off + 17))
    case("qcow2-l1-size-huge", put(d, 36, ">I", 0xFFFFFFFF), "error", "L1 larger than any file")
    case("qcow2-l1-size-256m", put(d, 36, ">I", 0x10000000), "error", "L1 of 2 GiB")
    case("qcow2-l1-size-zero", put(d, 36, ">I", 0), "error", "L1 too small for the virtual size")
    for bits in [0, 8, 22, 31, 63, 255]:
        case(f"qcow2-cluster-bits-{bits}", put(d, 20, ">I", bits), "error", "cluster size out of range")
    case("qcow2-size-2p63", put(d, 24, ">Q", (1 << 63) - 1), "error", "virtual size beyond limits")
    case("qcow2-size-2p56", put(put(d, 24, ">Q", 1 << 56), 36, ">I", 1 << 27), "error", "huge size with matching L1")
    case("qcow2-l2-entry-past-eof", put(d, l2_off, ">Q", (1 << 63) | (size + 100 * cluster)))
    case("qcow2-l2-entry-offset-zero", put(d, l2_off, ">Q", 1 << 63))
    case("qcow2-l2-entry-misaligned", put(d, l2_off, ">Q", (1 << 63) | (first_data + 512)))
    case("qcow2-l1-entry-misaligned", put(d, l1_off, ">Q", (1 << 63) | (l2_off + 17)))
    case("qcow2-l1-entry-past-eof", put(d, l1_off, ">Q", (1 << 63) | (size + cluster)))
    case("qcow2-l1-entry-is-l1", put(d, l1_off, ">Q", (1 << 63) | l1_off), "any", "L2 table overlapping the L1 table")
    case("qcow2-l1-entry-is-header", put(d, l1_off, ">Q", (1 << 63) | 0), "any", "L2 table at offset 0 (the header)")
    # Compressed cluster descriptor: find the compressed entry (bit 62) in the first L2 table.
    x = 62 - (get(d, 20, ">I") - 8)
    for i in range(cluster // 8):
        e = get(d, l2_off + 8 * i, ">Q")
        if e & (1 << 62):
            off = e & ((1 << x) - 1)
            case("qcow2-compressed-garbage", d[:off] + bytes((j * 7 + 3) & 0xFF for j in range(512)) + d[off + 512:])
            case("qcow2-compressed-past-eof", put(d, l2_off + 8 * i, ">Q", (1 << 62) | (size + 4096)))
            case("qcow2-compressed-max-sectors", put(d, l2_off + 8 * i, ">Q", (1 << 62) | (((1 << (62 - x)) - 1) << x) | off))
            bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
            stream = bomb.compress(b"\0" * (256 << 20)) + bomb.flush()
            sectors = (len(stream) + 511) // 512
            bombed = d + b"\0" * ((-len(d)) % 512) + stream
            entry = (1 << 62) | (min(sectors - 1, (1 << (62 - x)) - 1) << x) | (len(d) + (-len(d)) % 512)
            case("qcow2-compressed-bomb", put(bombed, l2_off + 8 * i, ">Q", entry), "any", "a 256 MiB deflate bomb in one cluster")
            break
    case("qcow2-backing-offset-past-eof", put(put(d, 8, ">Q", size + 10), 16, ">I", 10), "error")
    case("qcow2-backing-size-huge", put(put(d, 8, ">Q", hlen), 16, ">I", 0xFFFFFFFF), "error")
    for name, tag in [(b'json:{"file":{"driver":"file","filename":"/etc/passwd"}}', "json"), (b"/etc/passwd", "abs-etc-passwd"), (b"../../../../etc/passwd", "dotdot"), (b"/dev/zero", "dev-zero"), (b"/proc/self/environ", "proc-environ")]:
        img = qcow2_set_backing(d, name)
        for flags in ["", "--references same-dir", "--references any"]:
            if tag in ("abs-etc-passwd", "dotdot") and flags == "--references any":
                continue  # allowed by that policy: /etc/passwd is a regular file
            suffix = flags.split()[-1] if flags else "deny"
            case(f"qcow2-backing-{tag}-{suffix}", img, "error", "reference refused", flags)
    loop = qcow2_set_backing(d, b"self-loop.qcow2")
    case("self-loop.qcow2", loop, "error", "backing file is itself", "--references same-dir")
    a = qcow2_set_backing(d, b"loop-b.qcow2")
    b_ = qcow2_set_backing(d, b"loop-a.qcow2")
    (OUT / "loop-b.qcow2").write_bytes(b_)
    case("loop-a.qcow2", a, "error", "two-image backing loop", "--references same-dir")
    for hl in [0, 50, 0xFFFFFFFF]:
        case(f"qcow2-header-length-{hl:#x}", put(d, 100, ">I", hl), "error")
    for v in [0, 4, 0xFFFFFFFF]:
        case(f"qcow2-version-{v:#x}", put(d, 4, ">I", v), "error")
    case("qcow2-version-1", put(d, 4, ">I", 1), "error", "qcow v1 is refused by name")
    case("qcow2-unknown-incompatible", put(d, 72, ">Q", 1 << 40), "error")
    case("qcow2-crypt-aes", put(d, 32, ">I", 1), "error")
    case("qcow2-crypt-luks", put(d, 32, ">I", 2), "error")
    case("qcow2-external-data-without-name", put(d, 72, ">Q", 1 << 2), "error")
    case("qcow2-snapshots-huge", put(put(d, 60, ">I", 0xFFFFFFFF), 64, ">Q", cluster), "error")
    case("qcow2-snapshots-past-eof", put(put(d, 60, ">I", 3), 64, ">Q", size + cluster), "error")
    case("qcow2-snapshots-garbage", put(put(d, 60, ">I", 100), 64, ">Q", l2_off), "any")
    case("qcow2-refcount-table-past-eof", put(d, 48, ">Q", size + cluster))
    case("qcow2-refcount-order-7", put(d, 96, ">I", 7), "error")
    case("qcow2-extension-length-huge", put(put(d, hlen, ">I", 0x12345678), hlen + 4, ">I", 0xFFFFFFF0))
    case("qcow2-extension-unterminated", d[:hlen] + b"\x12\x34\x56\x78" + b"\0\0\0\x08" * 2000, "any")


# --------------------------------------------------------------------------------------------
# VMDK (little-endian sparse header; text descriptors)


def vmdk_cases(tmp: Path) -> None:
    base = tmp / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(base), "64M")
    qemu_io("vmdk", base, "write -P 0x44 0 192k", "write -P 0x55 33M 64k")
    d = base.read_bytes()
    desc_off = get(d, 28, "<Q") * 512
    gd = get(d, 56, "<Q") * 512
    rgd = get(d, 48, "<Q") * 512
    gt0 = get(d, gd, "<I") * 512
    truncations("vmdk", d, [0, 4, 20, 64, 77, 512, desc_off + 10, rgd + 2, gd + 2, gt0 + 10, len(d) - 1])
    size = len(d)
    case("vmdk-capacity-2p62", put(d, 12, "<Q", 1 << 62), "error")
    case("vmdk-capacity-max", put(d, 12, "<Q", (1 << 64) - 1), "error")
    for g in [0, 3, 1 << 40]:
        case(f"vmdk-grain-size-{g:#x}", put(d, 20, "<Q", g), "error")
    for n in [0, 1, 1 << 31]:
        case(f"vmdk-gtes-per-gt-{n:#x}", put(d, 44, "<I", n), "any")
    case("vmdk-gd-past-eof", put(d, 56, "<Q", size // 512 + 100))
    case("vmdk-both-gd-past-eof", put(put(d, 56, "<Q", size // 512 + 100), 48, "<Q", size // 512 + 200), "error")
    case("vmdk-gd-entry-past-eof", put(d, gd, "<I", size // 512 + 1000))
    case("vmdk-gte-past-eof", put(d, gt0, "<I", size // 512 + 1000))
    case("vmdk-gte-in-header", put(d, gt0, "<I", 0), "any")
    case("vmdk-gte-is-gd", put(d, gt0, "<I", gd // 512), "any")
    case("vmdk-descriptor-past-eof", put(d, 28, "<Q", size // 512 + 10))
    case("vmdk-descriptor-size-huge", put(d, 36, "<Q", 1 << 40))
    case("vmdk-version-9", put(d, 4, "<I", 9), "error")
    case("vmdk-flags-compressed-garbage", put(put(d, 8, "<I", get(d, 8, "<I") | 0x10000 | 0x20000), 77, "<H", 1))

    stream = tmp / "stream.vmdk"
    raw = tmp / "stream-src.raw"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(bytes((i * 13) & 0xFF for i in range(300000)))
    qemu_img("convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(stream))
    s = stream.read_bytes()
    first_marker = get(s, 64, "<Q") * 512  # overHead: first grain marker follows the metadata
    truncations("vmdk-stream", s, [first_marker + 6, first_marker + 20, len(s) - 1024, len(s) - 512, len(s) - 100])
    case("vmdk-stream-grain-garbage", s[: first_marker + 12] + bytes((j * 5 + 1) & 0xFF for j in range(256)) + s[first_marker + 268:])
    case("vmdk-stream-marker-size-huge", put(s, first_marker + 8, "<I", 0xFFFFFFF0))
    case("vmdk-stream-footer-garbage", s[:-1536] + bytes((j * 3) & 0xFF for j in range(1536)), "any")

    # Descriptor files naming hostile extents and parents.
    def desc(extents: str, extra: str = "") -> bytes:
        return (
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n"
            + extra + "\n# Extent description\n" + extents + "\n# The Disk Data Base\n#DDB\nddb.adapterType = \"ide\"\n"
        ).encode()

    (OUT / "flat-extent.bin").write_bytes(b"\x77" * 4096)
    for name, line in [
        ("abs", 'RW 8 FLAT "/etc/passwd" 0'),
        ("dotdot", 'RW 8 FLAT "../../../../etc/passwd" 0'),
        ("dev", 'RW 8 FLAT "/dev/zero" 0'),
        ("proc", 'RW 8 FLAT "/proc/self/environ" 0'),
        ("json", 'RW 8 FLAT "json:{\\"file\\":\\"/etc/passwd\\"}" 0'),
    ]:
        for flags in ["", "--references same-dir"]:
            suffix = flags.split()[-1] if flags else "deny"
            case(f"vmdk-desc-{name}-{suffix}.vmdk", desc(line), "error", "extent reference refused", flags)
    case("vmdk-desc-no-extents.vmdk", desc(""), "error", "no usable extent", "--references same-dir")
    case("vmdk-desc-rdm.vmdk", desc('RW 8 VMFSRDM "flat-extent.bin"'), "error", "raw device mapping", "--references same-dir")
    case("vmdk-desc-size-overflow.vmdk", desc('RW 18446744073709551615 FLAT "flat-extent.bin" 0\nRW 18446744073709551615 FLAT "flat-extent.bin" 0'), "error", "", "--references same-dir")
    case("vmdk-desc-flat-offset-huge.vmdk", desc('RW 8 FLAT "flat-extent.bin" 18446744073709551615'), "any", "", "--references same-dir")
    case("vmdk-desc-flat-short.vmdk", desc('RW 64 FLAT "flat-extent.bin" 0'), "any", "extent file shorter than declared", "--references same-dir")
    case("vmdk-desc-self-sparse.vmdk", desc('RW 8 SPARSE "vmdk-desc-self-sparse.vmdk"'), "error", "descriptor naming itself as sparse", "--references same-dir")
    case("vmdk-desc-parent-loop.vmdk", desc('RW 8 FLAT "flat-extent.bin" 0', 'parentFileNameHint="vmdk-desc-parent-loop.vmdk"').replace(b"parentCID=ffffffff", b"parentCID=12345678"), "error", "parent is itself", "--references same-dir")
    case("vmdk-desc-huge-line.vmdk", desc('RW 8 FLAT "' + "a" * 60000 + '" 0'), "error", "", "--references same-dir")
    case("vmdk-desc-nul-padded.vmdk", desc('RW 8 FLAT "/etc/passwd" 0') + b"\0" * 3000, "error", "NUL-padded descriptor is still a descriptor")
    case("vmdk-desc-many-extents.vmdk", desc("\n".join('RW 1 FLAT "flat-extent.bin" 0' for _ in range(20000))), "any", "", "--references same-dir")


# --------------------------------------------------------------------------------------------
# VHD (big-endian footer and dynamic header, one's-complement checksums)


def vhd_checksum(block: bytes, field: int) -> int:
    b = bytearray(block)
    b[field : field + 4] = b"\0\0\0\0"
    return (~sum(b)) & 0xFFFFFFFF


def vhd_fix(d: bytes) -> bytes:
    """Recompute footer (both copies) and dynamic-header checksums after an edit."""
    foot = d[-512:]
    foot = put(foot, 64, ">I", vhd_checksum(foot[:512], 64))
    out = d[:-512] + foot
    if out[:8] == b"conectix":
        out = foot + out[512:]
        dyn = get(out, 16, ">Q")
        if 0 < dyn and dyn + 1024 <= len(out) and out[dyn : dyn + 8] == b"cxsparse":
            out = put(out, dyn + 36, ">I", vhd_checksum(out[dyn : dyn + 1024], 36))
    return out


def vhd_cases(tmp: Path) -> None:
    base = tmp / "base.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(base), "64M")
    qemu_io("vpc", base, "write -P 0x66 0 192k", "write -P 0x77 33M 64k")
    d = base.read_bytes()
    dyn = get(d, 16, ">Q")
    bat = get(d, dyn + 16, ">Q")
    block0 = get(d, bat, ">I") * 512
    truncations("vhd", d, [0, 100, 511, 512, dyn + 20, dyn + 1023, bat + 2, block0 + 100, len(d) - 512, len(d) - 1])
    size = len(d)

    def dyn_put(fmt: str, off: int, value: int) -> bytes:
        return vhd_fix(put(d, dyn + off, fmt, value))

    case("vhd-max-table-entries-huge", dyn_put(">I", 28, 0x40000001), "error")
    for bs in [0, 3, 1 << 31]:
        case(f"vhd-block-size-{bs:#x}", dyn_put(">I", 32, bs), "error")
    case("vhd-bat-past-eof", dyn_put(">Q", 16, size + (1 << 20)), "any")
    case("vhd-bat-entry-past-eof", vhd_fix(put(d, bat, ">I", (size >> 9) + 100000)))
    case("vhd-bat-entry-zero", vhd_fix(put(d, bat, ">I", 0)), "any", "block at offset 0 (the footer copy)")
    case("vhd-bat-entries-overlap", vhd_fix(put(d, bat + 4, ">I", get(d, bat, ">I"))), "any")
    case("vhd-current-size-huge", vhd_fix(put(put(d, 48, ">Q", 1 << 62), size - 512 + 48, ">Q", 1 << 62)), "any", "creator qemu: CHS geometry decides the size")
    case("vhd-dyn-offset-past-eof", vhd_fix(put(put(d, 16, ">Q", size * 4), size - 512 + 16, ">Q", size * 4)), "error")
    case("vhd-bad-checksums", put(put(d, 64, ">I", 1), size - 512 + 64, ">I", 1), "error")
    case("vhd-bad-dyn-checksum", put(d, dyn + 36, ">I", 1), "any", "qemu-img accepts it; vdisk check reports it")
    qemu_size = bytearray(put(put(d, 28, "4s", b"wa\0\0"), size - 512 + 28, "4s", b"wa\0\0"))
    case("vhd-current-size-huge-azure", vhd_fix(put(put(bytes(qemu_size), 48, ">Q", 1 << 62), size - 512 + 48, ">Q", 1 << 62)), "error", "current size beyond the limit")
    case("vhd-disk-type-9", vhd_fix(put(put(d, 60, ">I", 9), size - 512 + 60, ">I", 9)), "error")
    # Differencing with hostile parent locators.
    diff = put(put(d, 60, ">I", 4), size - 512 + 60, ">I", 4)
    for tag, code, name in [
        ("abs", b"W2ku", "/etc/passwd".encode("utf-16-le")),
        ("dotdot", b"W2ru", "..\\..\\..\\etc\\passwd".encode("utf-16-le")),
        ("self", b"W2ru", "vhd-diff-self.vhd".encode("utf-16-le")),
        ("dev", b"W2ku", "/dev/zero".encode("utf-16-le")),
    ]:
        padded = name + b"\0" * ((-len(name)) % 512)
        img = bytearray(diff[:-512] + padded + diff[-512:])
        struct.pack_into(">4sIIIQ", img, dyn + 576, code, len(padded) // 512, len(name), 0, len(diff) - 512)
        fname = "vhd-diff-self.vhd" if tag == "self" else f"vhd-diff-{tag}.vhd"
        for flags in ["", "--references same-dir"]:
            suffix = flags.split()[-1] if flags else "deny"
            n = fname if tag == "self" else fname.replace(".vhd", f"-{suffix}.vhd")
            if tag == "self" and flags == "":
                continue
            case(n, vhd_fix(bytes(img)), "error", "parent reference refused or looping", flags)
    img = bytearray(diff)
    struct.pack_into(">4sIIIQ", img, dyn + 576, b"W2ru", 512, 0xFFFFFFF0, 0, size * 8)
    case("vhd-diff-locator-past-eof.vhd", vhd_fix(bytes(img)), "error", "", "--references same-dir")


# --------------------------------------------------------------------------------------------
# VHDX (little-endian, CRC-32C)


def _crc32c_table() -> list[int]:
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def vhdx_fix(d: bytes) -> bytes:
    """Recompute both headers' and both region tables' CRC-32C after an edit."""
    b = bytearray(d)
    for off, length in [(64 << 10, 4096), (128 << 10, 4096), (192 << 10, 64 << 10), (256 << 10, 64 << 10)]:
        if len(b) >= off + length:
            struct.pack_into("<I", b, off + 4, 0)
            struct.pack_into("<I", b, off + 4, crc32c(bytes(b[off : off + length])))
    return bytes(b)


BAT_GUID = bytes.fromhex("6677c22d23f600429d64115e9bfd4a08")
META_GUID = bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e")


def vhdx_regions(d: bytes) -> dict[bytes, tuple[int, int, int]]:
    out = {}
    count = get(d, (192 << 10) + 8, "<I")
    for i in range(min(count, 2047)):
        e = (192 << 10) + 16 + 32 * i
        out[d[e : e + 16]] = (e, get(d, e + 16, "<Q"), get(d, e + 24, "<I"))
    return out


def vhdx_cases(tmp: Path) -> None:
    base = tmp / "base.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(base), "64M")
    qemu_io("vhdx", base, "write -P 0x88 0 192k", "write -P 0x99 33M 64k")
    d = base.read_bytes()
    regs = vhdx_regions(d)
    bat_e, bat_off, bat_len = regs[BAT_GUID]
    meta_e, meta_off, meta_len = regs[META_GUID]
    truncations("vhdx", d, [0, 8, 64 << 10, (64 << 10) + 100, 192 << 10, 256 << 10, meta_off + 20, meta_off + 0x10010, bat_off + 8, len(d) - 1])
    size = len(d)
    hdr = 64 << 10
    case("vhdx-both-headers-bad", put(put(d, hdr + 4, "<I", 1), (128 << 10) + 4, "<I", 1), "error")
    case("vhdx-first-header-bad", put(d, hdr + 4, "<I", 1), "any", "the other header is valid")
    case("vhdx-both-regions-bad", put(put(d, (192 << 10) + 4, "<I", 1), (256 << 10) + 4, "<I", 1), "error")
    case("vhdx-bat-past-eof", vhdx_fix(put(put(d, bat_e + 16, "<Q", size * 16), bat_e + 16 - (192 << 10) + (256 << 10), "<Q", size * 16)), "error")
    case("vhdx-bat-length-huge", vhdx_fix(put(put(d, bat_e + 24, "<I", 0xFFF00000), bat_e + 24 - (192 << 10) + (256 << 10), "<I", 0xFFF00000)), "error")
    case("vhdx-metadata-past-eof", vhdx_fix(put(put(d, meta_e + 16, "<Q", size * 16), meta_e + 16 - (192 << 10) + (256 << 10), "<Q", size * 16)), "error")
    case("vhdx-region-count-huge", vhdx_fix(put(put(d, (192 << 10) + 8, "<I", 0xFFFFFFFF), (256 << 10) + 8, "<I", 0xFFFFFFFF)), "error")
    # Metadata items: find file parameters (block size) and virtual disk size by their ids.
    # Metadata item ids, as stored (GUIDs with their first three fields little-endian).
    fp_id = bytes.fromhex("3767a1ca36fa434db3b633f0aa44e76b")  # file parameters
    vs_id = bytes.fromhex("2442a52f1bcd7648b2115dbed83bf4b8")  # virtual disk size
    ls_id = bytes.fromhex("1dbf41816fa90947ba47f233a8faab5f")  # logical sector size
    count = get(d, meta_off + 10, "<H")
    items = {}
    for i in range(min(count, 2047)):
        e = meta_off + 32 + 32 * i
        items[d[e : e + 16]] = meta_off + get(d, e + 16, "<I")
    if fp_id in items:
        for bs in [0, 3 << 20, 1 << 31]:
            case(f"vhdx-block-size-{bs:#x}", put(d, items[fp_id], "<I", bs), "error")
    if vs_id in items:
        case("vhdx-virtual-size-2p63", put(d, items[vs_id], "<Q", 1 << 63), "error")
        case("vhdx-virtual-size-unaligned", put(d, items[vs_id], "<Q", (64 << 20) + 7), "any")
    if ls_id in items:
        case("vhdx-logical-sector-1000", put(d, items[ls_id], "<I", 1000), "error")
    case("vhdx-metadata-count-huge", put(d, meta_off + 10, "<H", 0xFFFF), "error")
    first_bat = get(d, bat_off, "<Q")
    case("vhdx-bat-entry-past-eof", put(d, bat_off, "<Q", (first_bat & 7) | ((size * 64 >> 20) << 20)))
    case("vhdx-bat-entry-into-header", put(d, bat_off, "<Q", 6 | (0 << 20)), "any")
    case("vhdx-bat-entry-state-5", put(d, bat_off, "<Q", 5), "any")
    case("vhdx-bat-entry-partial-no-bitmap", put(d, bat_off, "<Q", 7 | (first_bat & ~0xFFFFF)), "any")
    # A log that needs replay but points outside the file / is huge / is garbage.
    log_guid = bytes(range(1, 17))
    for tag, off, length in [("past-eof", size * 4, 1 << 20), ("huge", 1 << 20, 0xFFF00000), ("unaligned", (1 << 20) + 7, 1 << 20)]:
        h = bytearray(d)
        for hoff in (64 << 10, 128 << 10):
            h[hoff + 48 : hoff + 64] = log_guid
            struct.pack_into("<I", h, hoff + 68, length)
            struct.pack_into("<Q", h, hoff + 72, off)
        case(f"vhdx-log-{tag}", vhdx_fix(bytes(h)), "error")
    # A log region full of entries with garbage descriptors pointing beyond the file.
    h = bytearray(d)
    log_off = get(d, hdr + 72, "<Q")
    log_len = get(d, hdr + 68, "<I")
    for hoff in (64 << 10, 128 << 10):
        h[hoff + 48 : hoff + 64] = log_guid
    seq = 1
    entry = bytearray(4096)
    struct.pack_into("<4sIIIQII", entry, 0, b"loge", 0, 8192, 0, seq, 1, 0)
    entry[32:48] = log_guid
    struct.pack_into("<QQ", entry, 48, size * 8, size * 8)
    struct.pack_into("<4sIQQQ", entry, 64, b"desc", 0, 0, size * 1000, seq)
    sector = b"data" + struct.pack("<I", seq >> 32) + bytes(4084) + struct.pack("<I", seq & 0xFFFFFFFF)
    struct.pack_into("<I", entry, 4, crc32c(bytes(entry) + sector))
    if log_len >= 8192:
        h[log_off : log_off + 4096] = entry
        h[log_off + 4096 : log_off + 8192] = sector
        case("vhdx-log-entry-outside-file", vhdx_fix(bytes(h)), "any", "log descriptor targets an offset past the file")


# --------------------------------------------------------------------------------------------
# VDI (little-endian; pre-header, header at 72, block map of u32)


def vdi_cases(tmp: Path) -> None:
    base = tmp / "base.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(base), "8M")
    qemu_io("vdi", base, "write -P 0x66 0 64k", "write -P 0x77 3M 1M", "write -P 0x88 7M 4k")
    d = base.read_bytes()
    bmap, data = get(d, 340, "<I"), get(d, 344, "<I")
    truncations("vdi", d, [0, 64, 70, 72, 100, 380, 455, bmap + 2, data, data + 1000, len(d) - 1])
    case("vdi-blocks-max", put(d, 384, "<I", 0xFFFFFFFF), "error", "a block map of 2^32 entries")
    case("vdi-blocks-zero", put(d, 384, "<I", 0), "error", "no block for a non-empty disk")
    for b in [0, 1, 3 << 19]:
        case(f"vdi-block-size-{b:#x}", put(d, 376, "<I", b), "error", "block size")
    case("vdi-block-size-0x80000000", put(d, 376, "<I", 0x80000000), "any", "2 GiB blocks: one covers the disk")
    case("vdi-disk-size-max", put(d, 368, "<Q", (1 << 64) - 1), "error", "disk size overflows when rounded")
    case("vdi-disk-size-2p62", put(put(d, 368, "<Q", 1 << 62), 384, "<I", 1 << 22), "any", "a huge disk, a short map")
    case("vdi-map-offset-max", put(d, 340, "<I", 0xFFFFFFFF), "error", "block map past the end")
    case("vdi-data-offset-max", put(d, 344, "<I", 0xFFFFFFFF), "error", "data past the end")
    case("vdi-data-offset-in-map", put(d, 344, "<I", bmap), "error", "data overlapping the map")
    case("vdi-extra-huge", put(d, 380, "<I", 0x80000000), "error", "2 GiB of extra data per block")
    case("vdi-header-size-max", put(d, 72, "<I", 0xFFFFFFFF), "any", "a header size beyond any header")
    case("vdi-allocated-wrong", put(d, 388, "<I", 12345), "any", "a wrong allocated count (check reports it)")
    entries = bytearray(d)
    for i in range(8):
        struct.pack_into("<I", entries, bmap + 4 * i, 0xFFFFFFFD)
    case("vdi-entries-max-index", bytes(entries), "error", "every entry out of range")
    entries = bytearray(d)
    for i in range(8):
        struct.pack_into("<I", entries, bmap + 4 * i, 0)
    case("vdi-entries-all-same", bytes(entries), "error", "every entry the same block")
    case("vdi-version-2", put(d, 68, "<I", 0x00020000), "error", "an unknown major version")
    case("vdi-version-0", put(d, 68, "<I", 0x00000002), "any", "a v1 header read as version 0")
    case("vdi-type-0", put(d, 76, "<I", 0), "error", "image type 0")
    # Differencing images: a parent that is missing, one that is itself, two that are each other's.
    diff = put(put(d, 76, "<I", 4), 424, "16s", b"\x42" * 16)
    case("vdi-diff-no-parent.vdi", diff, "error", "parent UUID matches nothing", "--references same-dir")
    case("vdi-diff-denied.vdi", diff, "error", "parents are denied by default")
    self_ = put(put(put(d, 76, "<I", 4), 392, "16s", b"\xcc" * 16), 424, "16s", b"\xcc" * 16)
    case("vdi-diff-self.vdi", self_, "error", "its own parent (never opened twice)", "--references same-dir")
    a = put(put(put(d, 76, "<I", 4), 392, "16s", b"\xaa" * 16), 424, "16s", b"\xbb" * 16)
    b2 = put(put(put(d, 76, "<I", 4), 392, "16s", b"\xbb" * 16), 424, "16s", b"\xaa" * 16)
    case("vdi-loop-a.vdi", put(a, 440, "16s", bytes(16)), "error", "two differencing images that are each other's parent", "--references same-dir")
    case("vdi-loop-b.vdi", put(b2, 440, "16s", bytes(16)), "error", "", "--references same-dir")


# --------------------------------------------------------------------------------------------
# OVA (tar headers, OVF XML, manifests, gzip members)


def tar_member(name: bytes, data: bytes, flag: bytes = b"0", size: int | None = None) -> bytes:
    h = bytearray(512)
    h[: len(name[:100])] = name[:100]
    h[100:108] = b"0000644\0"
    h[124:136] = b"%011o\0" % (len(data) if size is None else size)
    h[156:157] = flag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"        "
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data + bytes(-len(data) % 512)


def ova_ovf(href: str = "disk.vmdk", extra: str = "", disk: str = "") -> bytes:
    disk = disk or '<Disk ovf:capacity="4194304" ovf:diskId="d1" ovf:fileRef="f1"/>'
    return (
        '<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
        'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>'
        f'<File ovf:href="{href}" ovf:id="f1"{extra}/></References><DiskSection>{disk}</DiskSection></Envelope>'
    ).encode()


def ova_cases(tmp: Path) -> None:
    disk = tmp / "ova-disk.vmdk"
    raw = tmp / "ova-disk.raw"
    raw.write_bytes(bytes(1 << 20) + bytes(range(256)) * 4096 + bytes(2 << 20))
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(disk))
    vmdk = disk.read_bytes()
    ovf = ova_ovf()
    good = tar_member(b"vm.ovf", ovf) + tar_member(b"disk.vmdk", vmdk) + bytes(1024)
    case("ova-good.ova", good, "any", "a valid OVA (baseline)")
    truncations("ova", good, [0, 100, 148, 257, 511, 512, 600, 1024, 1536, 2048, 4096, len(good) - 1030])
    case("ova-size-not-octal", good[:124] + b"99999999999\0" + good[136:], "error", "a size field that is not octal")
    g = bytearray(good)
    g[124:136] = b"\x80" + b"\xff" * 11
    g[148:156] = b"        "
    g[148:156] = b"%06o\0 " % sum(g[:512])
    case("ova-size-base256-huge", bytes(g), "error", "a base-256 size beyond 2^64")
    g[124:136] = b"\xff" * 12
    g[148:156] = b"        "
    g[148:156] = b"%06o\0 " % sum(g[:512])
    case("ova-size-base256-negative", bytes(g), "error", "a negative base-256 size")
    pax = b"30 size=99999999999999999999\n"
    case("ova-pax-size-huge", tar_member(b"PaxHeader", pax, b"x") + good, "error", "a pax size beyond the archive")
    case("ova-pax-garbage", tar_member(b"PaxHeader", b"zz nothing\n", b"x") + good, "error", "a malformed pax record")
    case("ova-pax-path-escape", tar_member(b"PaxHeader", b"22 path=../../x.vmdk\n", b"x") + good, "error",
         "a pax path with '..'")
    case("ova-long-name-huge", tar_member(b"././@LongLink", b"a" * (100 << 10), b"L") + good, "error",
         "a 100 KiB GNU long name")
    case("ova-ovf-huge", tar_member(b"vm.ovf", bytes(17 << 20)) + bytes(1024), "error", "a 17 MiB descriptor")
    deep = b"<Envelope>" + b"<a>" * 200000 + b"</a>" * 200000 + b"</Envelope>"
    case("ova-ovf-deep", tar_member(b"vm.ovf", deep) + bytes(1024), "error", "200000 nested elements")
    many = "".join(f'<Disk ovf:capacity="1" ovf:diskId="d{i}" ovf:fileRef="f1"/>' for i in range(5000))
    case("ova-ovf-many-disks", tar_member(b"vm.ovf", ova_ovf(disk=many)) + tar_member(b"disk.vmdk", vmdk) + bytes(1024),
         "error", "5000 disks")
    for tag, ovf2 in [("href-url", ova_ovf("http://example.invalid/disk.vmdk")),
                      ("href-absolute", ova_ovf("/etc/passwd")),
                      ("chunk-zero", ova_ovf(extra=' ovf:chunkSize="0"')),
                      ("compression-bzip2", ova_ovf(extra=' ovf:compression="bzip2"')),
                      ("capacity-huge", ova_ovf(disk='<Disk ovf:capacity="18446744073709551615" ovf:capacityAllocationUnits="byte * 2^63" ovf:diskId="d1" ovf:fileRef="f1"/>')),
                      ("fileref-missing", ova_ovf(disk='<Disk ovf:capacity="1" ovf:diskId="d1" ovf:fileRef="nope"/>')),
                      ("utf16", "\ufeff<Envelope/>".encode("utf-16")),
                      ("not-xml", b"\x00\x01\x02 not xml")]:
        case(f"ova-{tag}", tar_member(b"vm.ovf", ovf2) + tar_member(b"disk.vmdk", vmdk) + bytes(1024), "any")
    mf = b"SHA256(disk.vmdk)= " + b"0" * 64 + b"\n" + b"SHA1(../../etc/passwd)= " + b"0" * 40 + b"\n" + b"x" * 5000 + b"\n"
    case("ova-manifest-hostile", tar_member(b"vm.ovf", ovf) + tar_member(b"vm.mf", mf) + tar_member(b"disk.vmdk", vmdk) + bytes(1024),
         "any", "a manifest with a wrong digest, an escaping name and garbage (check reports them)")
    case("ova-manifest-huge", tar_member(b"vm.ovf", ovf) + tar_member(b"vm.mf", b"\n" * (2 << 20)) + tar_member(b"disk.vmdk", vmdk) + bytes(1024),
         "error", "a 2 MiB manifest")
    gz_ovf = ova_ovf(extra=' ovf:compression="gzip"')
    case("ova-gzip-zeros", tar_member(b"vm.ovf", gz_ovf) + tar_member(b"disk.vmdk", gzip.compress(bytes(64 << 20), 9, mtime=0)) + bytes(1024),
         "error", "64 MiB of gzip-compressed zeros: not a streamable disk")
    hdr = bytearray(vmdk[:512])
    struct.pack_into("<Q", hdr, 56, 0xFFFFFFFFFFFFFFFF)  # GD at the end, so a stream decoder needs no table
    struct.pack_into("<Q", hdr, 64, 1)  # overhead: just the header
    flood = bytes(hdr) + struct.pack("<QII", 0, 0, 1).ljust(512, b"\0") * 200000
    case("ova-gzip-marker-flood", tar_member(b"vm.ovf", gz_ovf) + tar_member(b"disk.vmdk", gzip.compress(flood, 9, mtime=0)) + bytes(1024),
         "any", "a compressed stream of 200000 empty grain-table markers")
    huge = bytearray(hdr)
    struct.pack_into("<Q", huge, 12, 1 << 31)  # 1 TiB
    grain = zlib.compress(bytes(range(256)) * 256)
    bomb = bytes(huge) + (struct.pack("<QI", 0, len(grain)) + grain).ljust(-(-(12 + len(grain)) // 512) * 512, b"\0")
    case("ova-gzip-1tib", tar_member(b"vm.ovf", gz_ovf) + tar_member(b"disk.vmdk", gzip.compress(bomb, 9, mtime=0)) + bytes(1024),
         "any", "a compressed stream of a 1 TiB disk holding one grain")
    nested = tar_member(b"vm.ovf", ova_ovf("inner.ova")) + tar_member(b"inner.ova", good) + bytes(1024)
    case("ova-nested", nested, "error", "an OVA as the disk of an OVA")


# --------------------------------------------------------------------------------------------
# Foreign formats and oddities


def misc_cases() -> None:
    case("empty", b"", "any", "an empty file is an empty raw disk")
    case("one-byte", b"Q", "any")
    case("qfi-only", b"QFI\xfb", "error")
    case("kdmv-only", b"KDMV", "error")
    case("vhdxfile-only", b"vhdxfile", "error")
    case("conectix-only", b"conectix", "error")
    case("qed", b"QED\0" + b"\0" * 508, "error", "QED is refused by name")
    vdi = bytearray(b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(512, b"\0"))
    vdi[0x40:0x44] = b"\x7f\x10\xda\xbe"
    case("vdi", bytes(vdi), "error", "a VDI signature and a zero header")
    tar = bytearray(1024)
    tar[0:8] = b"disk.ovf"
    tar[257:262] = b"ustar"
    case("ova", bytes(tar), "error", "a tar magic without a valid header")


def main() -> None:
    global OUT
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    OUT = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / ".work"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    qcow2_cases(tmp)
    vmdk_cases(tmp)
    vhd_cases(tmp)
    vhdx_cases(tmp)
    vdi_cases(tmp)
    ova_cases(tmp)
    misc_cases()
    shutil.rmtree(tmp)
    with open(OUT / "cases.tsv", "w") as f:
        f.write("name\tflags\texpect\twhy\n")
        for name, flags, expect, why in CASES:
            f.write(f"{name}\t{flags}\t{expect}\t{why}\n")
    print(f"{len(CASES)} hostile cases in {OUT}")


if __name__ == "__main__":
    main()
