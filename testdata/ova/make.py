#!/usr/bin/env python3
"""Build OVA archives around disks of known content.

    python3 testdata/ova/make.py OUTDIR        # every case, and OUTDIR/cases.tsv (needs qemu-img)
    python3 testdata/ova/make.py --fixtures    # the small committed fixtures in testdata/ova/

The guest content of each disk is made here first; qemu-img turns it into streamOptimized and
monolithicSparse VMDKs and a qcow2, and this script writes VMware-layout streams itself (grain
markers, grain tables and directory at the end, footer, end-of-stream marker). The archives cover
ustar, GNU (long names, a base-256 size) and pax headers, one and two disks, gzip-compressed and
chunked (`ovf:chunkSize`) files, manifests in both spellings (SHA1, SHA256, SHA512) good and bad,
an OVF whose capacity disagrees, and hostile archives: members past the end, absolute and `..`
names, a bad checksum, an href outside the archive, a missing chunk, a DTD, a nested OVA, an
oversized pax header, a link as the disk, duplicate names, a gzip stream with a grain twice and a
corrupt gzip stream.

cases.tsv columns: name, flags (extra vdisk options), expect (`ok` or `error`), sha256 and
virtual_size (the selected disk's content, for `ok`), error (a substring of the one-line error),
check (the exit status `vdisk check` must give, or `-`), why.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

MIB = 1 << 20
STREAM_URI = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
SPARSE_URI = "http://www.vmware.com/interfaces/specifications/vmdk.html#monolithicSparse"
HERE = Path(__file__).resolve().parent
ROWS: list[tuple[str, ...]] = []


def content(size: int, seed: int, keep: float = 0.6) -> bytes:
    """Pseudo-random 4 KiB chunks kept with probability `keep`, zeros elsewhere."""
    rng = random.Random(seed)
    out = bytearray(size)
    for off in range(0, size, 4096):
        if rng.random() < keep:
            n = min(4096, size - off)
            out[off : off + n] = rng.randbytes(n)
    return bytes(out)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------
# VMDK streams written the VMware way


def stream_vmdk(guest: bytes, order_seed: int | None = None, dup: bool = False) -> bytes:
    """A streamOptimized VMDK of `guest` (a whole number of sectors): header, descriptor,
    deflated grains with markers (in LBA order, or shuffled), grain tables, directory, footer,
    end-of-stream marker. With `dup`, the first grain appears twice (hostile)."""
    assert len(guest) % 512 == 0
    grain = 64 << 10
    sectors = len(guest) // 512
    desc = (
        "# Disk DescriptorFile\nversion=1\nCID=7a1c0de5\nparentCID=ffffffff\n"
        'createType="streamOptimized"\n\n# Extent description\n'
        f'RW {sectors} SPARSE "disk.vmdk"\n\n# The Disk Data Base\n#DDB\n'
        'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "4"\n'
    ).encode()
    desc_sectors = -(-len(desc) // 512)

    def header(gd: int) -> bytes:
        h = struct.pack("<4sIIQQQQIQQQ", b"KDMV", 3, 0x30001, sectors, 128, 1, desc_sectors, 512, 0, gd, 1 + desc_sectors)
        h += b"\0\n \r\n" + struct.pack("<H", 1)
        return h.ljust(512, b"\0")

    out = bytearray(header(0xFFFFFFFFFFFFFFFF) + desc.ljust(desc_sectors * 512, b"\0"))
    grains = [g for g in range(-(-len(guest) // grain)) if any(guest[g * grain : (g + 1) * grain])]
    if order_seed is not None:
        random.Random(order_seed).shuffle(grains)
    if dup and grains:
        grains.append(grains[0])
    table: dict[int, int] = {}
    for g in grains:
        data = zlib.compress(guest[g * grain : (g + 1) * grain], 6)
        table[g] = len(out) // 512
        out += struct.pack("<QI", g * 128, len(data)) + data
        out.extend(bytes(-len(out) % 512))
    gts = -(-len(guest) // (grain * 512))
    gd = []
    for t in range(gts):
        entries = [table.get(t * 512 + i, 0) for i in range(512)]
        if not any(entries):
            gd.append(0)
            continue
        out += struct.pack("<QII", 4, 0, 1).ljust(512, b"\0")
        gd.append(len(out) // 512)
        out += b"".join(struct.pack("<I", e) for e in entries)
    gd_sectors = -(-gts * 4 // 512)
    out += struct.pack("<QII", gd_sectors, 0, 2).ljust(512, b"\0")
    gd_at = len(out) // 512
    out += b"".join(struct.pack("<I", e) for e in gd).ljust(gd_sectors * 512, b"\0")
    out += struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    out += header(gd_at)
    out += bytes(512)
    return bytes(out)


# ------------------------------------------------------------------------------------------------
# OVF, manifest, tar


def ovf(disks: list[dict]) -> bytes:
    """A VMware-style descriptor for `disks` (keys: href, id, size, capacity, units, format,
    compression, chunk, no_file)."""
    files, disk_lines = [], []
    for i, d in enumerate(disks, 1):
        fid = f"file{i}"
        if not d.get("no_file"):
            attrs = f'ovf:href="{d["href"]}" ovf:id="{fid}"'
            if d.get("size") is not None:
                attrs += f' ovf:size="{d["size"]}"'
            if d.get("compression"):
                attrs += f' ovf:compression="{d["compression"]}"'
            if d.get("chunk"):
                attrs += f' ovf:chunkSize="{d["chunk"]}"'
            files.append(f"    <File {attrs}/>")
        units = f' ovf:capacityAllocationUnits="{d["units"]}"' if d.get("units") else ""
        fmt = f' ovf:format="{d["format"]}"' if d.get("format") else ""
        ref = "" if d.get("no_file") else f' ovf:fileRef="{fid}"'
        disk_lines.append(f'    <Disk ovf:capacity="{d["capacity"]}"{units} ovf:diskId="vmdisk{i}"{ref}{fmt}/>')
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
        'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:vmw="http://www.vmware.com/schema/ovf" '
        'xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">\n'
        "  <References>\n" + "\n".join(files) + "\n  </References>\n"
        "  <DiskSection>\n    <Info>Virtual disk information</Info>\n" + "\n".join(disk_lines) + "\n  </DiskSection>\n"
        '  <VirtualSystem ovf:id="vm">\n    <Info>A virtual machine</Info>\n    <Name>vm</Name>\n  </VirtualSystem>\n'
        "</Envelope>\n"
    )
    return text.encode()


def manifest(files: list[tuple[str, bytes]], alg: str = "SHA256", spaced: bool = False) -> bytes:
    lines = []
    for name, data in files:
        digest = hashlib.new(alg.lower(), data).hexdigest()
        lines.append(f"{alg} ({name}) = {digest}" if spaced else f"{alg}({name})= {digest}")
    return ("\n".join(lines) + "\n").encode()


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def header_block(name: bytes, size: int, flag: bytes, gnu: bool = False, size_field: bytes | None = None) -> bytes:
    h = bytearray(512)
    h[: len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"15000000000\0"
    h[156:157] = flag
    if gnu:
        h[257:265] = b"ustar  \0"
    else:
        h[257:265] = b"ustar\x0000"
    fix_checksum(h, 0)
    return bytes(h)


def fix_checksum(b: bytearray, at: int) -> None:
    b[at + 148 : at + 156] = b"        "
    b[at + 148 : at + 156] = b"%06o\0 " % sum(b[at : at + 512])


def raw_tar(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A tar from (header block, data) pairs, with the end-of-archive blocks."""
    out = bytearray()
    for h, data in parts:
        out += h + data
        out.extend(bytes(-len(out) % 512))
    return bytes(out + bytes(1024))


# ------------------------------------------------------------------------------------------------
# Cases

OUT: Path
WORK: Path


def qemu(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def qemu_image(guest: bytes, fmt: str, opts: str = "") -> bytes:
    raw = WORK / "in.raw"
    raw.write_bytes(guest)
    out = WORK / f"out.{fmt}"
    out.unlink(missing_ok=True)
    args = ["convert", "-f", "raw", "-O", fmt]
    if opts:
        args += ["-o", opts]
    qemu(*args, str(raw), str(out))
    return out.read_bytes()


def write_sparse(path: Path, data: bytes) -> None:
    chunk = 64 << 10
    with open(path, "wb") as f:
        for i in range(0, len(data), chunk):
            piece = data[i : i + chunk]
            if piece.count(0) == len(piece):
                f.seek(len(piece), 1)
            else:
                f.write(piece)
        f.truncate(len(data))


def case(name: str, data: bytes, expect: str, guest: bytes | None = None, error: str = "", check: str = "-",
         why: str = "", flags: str = "") -> None:
    if data:
        write_sparse(OUT / name, data)
    row_sha = sha(guest) if guest is not None else "-"
    size = str(len(guest)) if guest is not None else "-"
    ROWS.append((name, flags, expect, row_sha, size, error, check, why))


def simple(disk_name: str, disk: bytes, guest_len: int, fmt_uri: str | None = STREAM_URI, **disk_kw) -> list[dict]:
    return [dict(href=disk_name, size=len(disk), capacity=guest_len, format=fmt_uri, **disk_kw)]


def ova(disks: list[dict], files: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT, mf: str | None = "SHA256",
        spaced: bool = False, ovf_last: bool = False) -> bytes:
    desc = ovf(disks)
    members = [("vm.ovf", desc)]
    if mf:
        members.append(("vm.mf", manifest([("vm.ovf", desc), *files], mf, spaced)))
    members += files
    if ovf_last:
        members = members[1:] + members[:1]
    return tar_bytes(members, fmt)


def make_cases() -> None:
    # Disk A has a 2 MiB hole in the middle (no grain there in a stream).
    a = bytearray(content(6 * MIB, 1))
    a[2 * MIB : 4 * MIB] = bytes(2 * MIB)
    a = bytes(a)
    b = content(3 * MIB + 512, 2)
    a_stream = qemu_image(a, "vmdk", "subformat=streamOptimized")
    a_sparse = qemu_image(a, "vmdk")
    b_sparse = qemu_image(b, "vmdk")
    b_qcow2 = qemu_image(b, "qcow2")
    a_vmware = stream_vmdk(a, order_seed=None)
    vmware_fixture = (HERE / "../vmdk/stream-vmware.vmdk").read_bytes()
    vmware_guest = WORK / "vmware.raw"
    qemu("convert", "-f", "vmdk", "-O", "raw", str(HERE / "../vmdk/stream-vmware.vmdk"), str(vmware_guest))
    vmware_content = vmware_guest.read_bytes()

    d = [("disk1.vmdk", a_stream)]
    case("ustar-stream.ova", ova(simple("disk1.vmdk", a_stream, len(a)), d), "ok", a, check="0",
         why="ustar, qemu streamOptimized, SHA256 manifest")
    d = [("disk1.vmdk", a_sparse)]
    case("gnu-sparse-sha1.ova", ova(simple("disk1.vmdk", a_sparse, len(a), SPARSE_URI), d, tarfile.GNU_FORMAT, "SHA1", True),
         "ok", a, check="0", why="GNU tar, monolithicSparse, SHA1 manifest with spaces")
    long = "a-directory-with-a-long-name/" + "x" * 120 + ".vmdk"
    d = [(long, b_sparse)]
    case("pax-longname.ova", ova(simple(long, b_sparse, len(b), SPARSE_URI), d, tarfile.PAX_FORMAT, "SHA512"), "ok", b,
         check="0", why="pax path record, SHA512 manifest")
    case("gnu-longname.ova", ova(simple(long, b_sparse, len(b), SPARSE_URI), d, tarfile.GNU_FORMAT), "ok", b, check="0",
         why="GNU long name member")
    # A GNU base-256 size field on the disk member.
    t = bytearray(ova(simple("disk1.vmdk", a_vmware, len(a)), [("disk1.vmdk", a_vmware)], tarfile.GNU_FORMAT))
    at = 0
    while t[at : at + 10] != b"disk1.vmdk":
        at += 512
    t[at + 124 : at + 136] = b"\x80" + bytes(3) + struct.pack(">Q", len(a_vmware))
    fix_checksum(t, at)
    case("gnu-base256.ova", bytes(t), "ok", a, check="0", why="base-256 size, VMware-layout stream")
    two = [dict(href="disk1.vmdk", size=len(a_stream), capacity=6, units="byte * 2^20", format=STREAM_URI),
           dict(href="disk2.vmdk", size=len(b_sparse), capacity=len(b), format=SPARSE_URI)]
    two_ova = ova(two, [("disk1.vmdk", a_stream), ("disk2.vmdk", b_sparse)])
    case("two-disks.ova", two_ova, "ok", a, check="0", flags="--disk 1", why="two disks, the first")
    case("two-disks.ova", b"", "ok", b, check="0", flags="--disk 2", why="two disks, the second")
    case("two-disks.ova", b"", "error", error="holds 2 disks", check="0", why="convert needs --disk with two disks")
    case("two-disks.ova", b"", "error", error="there is no disk 3", flags="--disk 3", why="a disk that does not exist")
    # gzip-compressed disks: streams convert front to back, a sparse extent cannot.
    gz = gzip.compress(a_stream, 6, mtime=0)
    case("gzip-stream.ova", ova(simple("disk1.vmdk.gz", gz, len(a), compression="gzip"), [("disk1.vmdk.gz", gz)]),
         "ok", a, check="0", why="gzip-compressed qemu stream")
    gz = gzip.compress(vmware_fixture, 6, mtime=0)
    case("gzip-vmware-stream.ova", ova(simple("disk.vmdk", gz, len(vmware_content), compression="gzip"), [("disk.vmdk", gz)]),
         "ok", vmware_content, check="0", why="gzip-compressed VMware-layout stream")
    gz = gzip.compress(stream_vmdk(a, order_seed=3), 6, mtime=0)
    case("gzip-shuffled-stream.ova", ova(simple("disk.vmdk", gz, len(a), compression="gzip"), [("disk.vmdk", gz)]),
         "ok", a, check="0", why="gzip stream whose grains are out of order")
    gz = gzip.compress(a_sparse, 6, mtime=0)
    case("gzip-sparse.ova", ova(simple("disk1.vmdk", gz, len(a), SPARSE_URI, compression="gzip"), [("disk1.vmdk", gz)]),
         "error", error="only streamOptimized", why="a gzip-compressed monolithicSparse needs random access")
    gz = gzip.compress(b_qcow2, 6, mtime=0)
    case("gzip-qcow2.ova", ova(simple("disk1.qcow2", gz, len(b), None, compression="gzip"), [("disk1.qcow2", gz)]),
         "error", error="needs random access", why="a gzip-compressed qcow2")
    # Chunked files: members href.000000000, href.000000001, ...
    chunk = MIB
    parts = [(f"disk1.vmdk.{i:09d}", a_sparse[o : o + chunk]) for i, o in enumerate(range(0, len(a_sparse), chunk))]
    case("chunked.ova", ova(simple("disk1.vmdk", a_sparse, len(a), SPARSE_URI, chunk=chunk), parts), "ok", a, check="0",
         why=f"monolithicSparse in {len(parts)} chunks")
    gz = gzip.compress(a_stream, 6, mtime=0)
    parts = [(f"disk1.vmdk.gz.{i:09d}", gz[o : o + 256 * 1024]) for i, o in enumerate(range(0, len(gz), 256 * 1024))]
    case("chunked-gzip.ova", ova(simple("disk1.vmdk.gz", gz, len(a), compression="gzip", chunk=256 * 1024), parts), "ok",
         a, check="0", why="gzip stream in chunks")
    missing = [p for i, p in enumerate(parts) if i != 1]
    case("chunk-missing.ova", ova(simple("disk1.vmdk.gz", gz, len(a), compression="gzip", chunk=256 * 1024), missing, mf=None),
         "error", error="chunk", why="a chunk in the middle is missing")
    # Manifests and OVF values that disagree with the archive: convert works, check says so.
    bad_mf = bytearray(ova(simple("disk1.vmdk", a_stream, len(a)), [("disk1.vmdk", a_stream)]))
    at = bad_mf.find(b"SHA256(disk1.vmdk)= ") + len(b"SHA256(disk1.vmdk)= ")
    bad_mf[at : at + 4] = b"0000" if bad_mf[at : at + 4] != b"0000" else b"1111"
    case("bad-manifest.ova", bytes(bad_mf), "ok", a, check="2", why="a wrong SHA256 in the manifest")
    mismatch = [dict(href="disk1.vmdk", size=len(a_stream) + 7, capacity=50, units="byte * 2^30", format=STREAM_URI)]
    case("capacity-mismatch.ova", ova(mismatch, [("disk1.vmdk", a_stream)]), "ok", a, check="2",
         why="ovf:capacity and ovf:size that disagree")
    desc = ovf(simple("disk1.vmdk", a_stream, len(a)))
    files = [("vm.ovf", desc), ("disk1.vmdk", a_stream)]
    sub = tar_bytes([("export/vm.ovf", desc), ("export/vm.mf", manifest(files)), ("export/disk1.vmdk", a_stream)])
    case("subfolder.ova", sub, "ok", a, check="0", why="descriptor, manifest and disk in a folder of the archive")
    case("ovf-last.ova", ova(simple("disk1.vmdk", a_stream, len(a)), [("disk1.vmdk", a_stream)], ovf_last=True), "ok", a,
         check="0", why="the .ovf after the disk")
    case("qcow2-labelled-vmdk.ova", ova(simple("disk1.vmdk", b_qcow2, len(b)), [("disk1.vmdk", b_qcow2)]), "ok", b,
         check="0", why="the OVF says VMDK, the content is qcow2: the content wins")
    raw = content(2 * MIB, 5)
    case("raw-disk.ova", ova(simple("disk.img", raw, len(raw), None), [("disk.img", raw)]), "ok", raw, check="0",
         why="a raw disk without a format URI")
    vdi = (HERE / "../vdi/dynamic-4k.vdi").read_bytes()
    vdi_sha, vdi_size = [l.split("\t")[2:4] for l in (HERE / "../vdi/expected.tsv").read_text().splitlines() if l.startswith("dynamic-4k.vdi")][0]
    case("vdi-disk.ova", ova(simple("disk.vdi", vdi, int(vdi_size), None), [("disk.vdi", vdi)]), "ok", None, check="0",
         why="a VDI inside an OVA")
    ROWS[-1] = ROWS[-1][:3] + (vdi_sha, vdi_size) + ROWS[-1][5:]
    hostile(a, a_stream)


def hostile(a: bytes, a_stream: bytes) -> None:
    good = ova(simple("disk1.vmdk", a_stream, len(a)), [("disk1.vmdk", a_stream)], mf=None)
    case("member-past-end.ova", good[: len(good) // 2], "error", error="past the end of the archive",
         why="the archive is cut inside the disk")
    desc = ovf(simple("disk1.vmdk", a_stream, len(a)))
    for name, err, why in [(b"/etc/disk1.vmdk", "absolute", "an absolute member name"),
                           (b"../disk1.vmdk", "'..'", "a member name with '..'")]:
        t = raw_tar([(header_block(b"vm.ovf", len(desc), b"0"), desc), (header_block(name, 5, b"0"), b"hello")])
        case(f"{'absolute' if name.startswith(b'/') else 'dotdot'}-name.ova", t, "error", error=err, why=why)
    t = bytearray(good)
    t[0] ^= 0x20
    case("bad-checksum.ova", bytes(t), "error", error="checksum", why="a header checksum that does not match")
    escape = ova(simple("../disk1.vmdk", a_stream, len(a)), [("disk1.vmdk", a_stream)], mf=None)
    case("href-escape.ova", escape, "error", error="not a name inside the archive", why="an href outside the archive")
    bomb = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>\n'
            b"<Envelope><References/>&lol2;</Envelope>\n")
    case("entity-bomb.ova", tar_bytes([("vm.ovf", bomb), ("disk1.vmdk", a_stream)]), "error",
         error="document type declaration", why="an OVF with entity definitions")
    nodisk = b'<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References/></Envelope>'
    case("no-disk.ova", tar_bytes([("vm.ovf", nodisk)]), "error", error="declares no disk", why="an OVF without disks")
    inner = ova(simple("disk1.vmdk", a_stream, len(a)), [("disk1.vmdk", a_stream)], mf=None)
    case("nested-ova.ova", ova(simple("inner.ova", inner, len(a), None), [("inner.ova", inner)], mf=None), "error",
         error="OVA inside an OVA", why="the disk is itself an OVA")
    big_pax = raw_tar([(header_block(b"PaxHeader", 2 * MIB, b"x"), b"30 comment=" + b"x" * (2 * MIB - 11)),
                       (header_block(b"vm.ovf", len(desc), b"0"), desc)])
    case("huge-pax.ova", big_pax, "error", error="pax extended header", why="a 2 MiB pax header")
    link = raw_tar([(header_block(b"vm.ovf", len(desc), b"0"), desc), (header_block(b"disk1.vmdk", 0, b"2"), b"")])
    case("link-disk.ova", link, "error", error="is a link", why="the disk member is a symlink")
    dup = tar_bytes([("vm.ovf", desc), ("disk1.vmdk", a_stream), ("disk1.vmdk", a_stream)])
    case("duplicate-members.ova", dup, "error", error="several members named", why="two members with the disk's name")
    case("not-an-ova.tar", tar_bytes([("disk1.vmdk", a_stream)]), "error", error="no .ovf descriptor",
         why="a tar without an OVF")
    small = content(512 << 10, 9)
    gz = gzip.compress(stream_vmdk(small, dup=True), 6, mtime=0)
    case("gzip-grain-twice.ova", ova(simple("d.vmdk", gz, len(small), compression="gzip"), [("d.vmdk", gz)], mf=None),
         "error", error="twice", why="a gzip stream holding a grain twice")
    gz = bytearray(gzip.compress(stream_vmdk(small), 6, mtime=0))
    gz[len(gz) // 2] ^= 0xFF
    case("gzip-corrupt.ova", ova(simple("d.vmdk", bytes(gz), len(small), compression="gzip"), [("d.vmdk", bytes(gz))], mf=None),
         "error", error="", why="a corrupt gzip stream")


def make_fixtures(out: Path) -> None:
    """Small OVAs committed to testdata/ova/ (fixture test, fuzz seeds): no qemu needed."""
    guest = content(160 << 10, 70, keep=0.1)
    stream = stream_vmdk(guest)
    gz = gzip.compress(stream, 9, mtime=0)
    rows = [
        ("stream.ova", ova(simple("disk1.vmdk", stream, len(guest)), [("disk1.vmdk", stream)]), guest),
        ("gzip-stream.ova", ova(simple("disk1.vmdk.gz", gz, len(guest), compression="gzip"), [("disk1.vmdk.gz", gz)],
                                tarfile.GNU_FORMAT, "SHA1"), guest),
    ]
    with open(out / "expected.tsv", "w") as f:
        f.write("name\tflags\tsha256\tvirtual_size\n")
        for name, data, g in rows:
            (out / name).write_bytes(data)
            f.write(f"{name}\t\t{sha(g)}\t{len(g)}\n")


def main() -> None:
    global OUT, WORK
    if sys.argv[1:] == ["--fixtures"]:
        make_fixtures(HERE)
        return
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    OUT = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    WORK = Path(tempfile.mkdtemp(dir=OUT))
    try:
        make_cases()
    finally:
        shutil.rmtree(WORK)
    with open(OUT / "cases.tsv", "w") as f:
        f.write("name\tflags\texpect\tsha256\tvirtual_size\terror\tcheck\twhy\n")
        for row in ROWS:
            f.write("\t".join(row) + "\n")
    print(f"{len(ROWS)} OVA cases in {OUT}")


if __name__ == "__main__":
    main()
