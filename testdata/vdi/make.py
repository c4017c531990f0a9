#!/usr/bin/env python3
"""Build VDI images that qemu-img cannot make or read, from known content.

    python3 testdata/vdi/make.py OUTDIR        # every case, and OUTDIR/cases.tsv
    python3 testdata/vdi/make.py --fixtures    # the small committed fixtures in testdata/vdi/

Each case's guest content is built here first (deterministic pseudo-random data with zero
runs), then laid out as a VDI: so the expected sha256 is known without any VDI reader. Cases:
block sizes other than 1 MiB (512 B to 8 MiB), header version 0, the 384-byte and 400-byte v1.1
headers with VirtualBox's 1 MiB-aligned block map and data, cbBlockExtra (filled with garbage
that must never reach the output), disk sizes that are not whole blocks or sectors, a last block
cut short by the end of the file, static images, zero (0xfffffffe) and free (0xffffffff) map
entries, blocks stored out of order, differencing chains found by UUID beside the child, and
hostile block maps and headers.

cases.tsv columns: name, flags (extra vdisk options), expect (`ok` or `error`), sha256 and
virtual_size (for `ok`), error (a substring of the one-line error, for `error`), why.
No third-party module and no qemu needed.
"""

from __future__ import annotations

import hashlib
import random
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

FREE = 0xFFFFFFFF
ZERO = 0xFFFFFFFE
SIGNATURE = 0xBEDA107F
MIB = 1 << 20

ROWS: list[tuple[str, str, str, str, str, str, str]] = []


def uuid(seed: int) -> bytes:
    return hashlib.sha256(b"vdi-uuid-%d" % seed).digest()[:16]


def content(size: int, seed: int, keep: float = 0.8) -> bytearray:
    """Pseudo-random 4 KiB chunks, each kept with probability `keep`, zeros elsewhere (so zero
    detection and holes are exercised too)."""
    rng = random.Random(seed)
    out = bytearray(size)
    step = 4096
    for off in range(0, size, step):
        if rng.random() < keep:
            n = min(step, size - off)
            out[off : off + n] = rng.randbytes(n)
    return out


@dataclass
class Vdi:
    """A VDI to write: the header fields, the map, and the data of each allocated block index."""

    disk: int
    block: int
    version: int = 0x00010001
    header_size: int = 400
    image_type: int = 1
    extra: int = 0
    align: int = 512
    blocks: int | None = None
    entries: list[int] = field(default_factory=list)
    data: dict[int, bytes] = field(default_factory=dict)  # block index in the file -> block bytes
    uuid_create: bytes = b""
    uuid_modify: bytes = b""
    uuid_link: bytes = bytes(16)
    uuid_parent_modify: bytes = bytes(16)
    text: bytes = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    allocated: int | None = None
    truncate: int | None = None  # cut the file here
    blocks_offset: int | None = None
    data_offset: int | None = None

    def layout(self) -> tuple[int, int]:
        n = self.blocks if self.blocks is not None else len(self.entries)
        if self.version >> 16 == 0:
            return 72 + 348, 72 + 348 + 4 * n
        bo = self.blocks_offset if self.blocks_offset is not None else -(-(72 + self.header_size) // self.align) * self.align
        do = self.data_offset if self.data_offset is not None else -(-(bo + 4 * n) // self.align) * self.align
        return bo, do

    def bytes(self) -> bytes:
        n = self.blocks if self.blocks is not None else len(self.entries)
        bo, do = self.layout()
        allocated = self.allocated if self.allocated is not None else sum(1 for e in self.entries if e < ZERO)
        pre = self.text.ljust(64, b"\0")[:64] + struct.pack("<II", SIGNATURE, self.version)
        geometry = struct.pack("<IIII", 0, 0, 0, 512)
        if self.version >> 16 == 0:
            hdr = struct.pack("<II", self.image_type, 0) + b"v0 test image".ljust(256, b"\0") + geometry
            hdr += struct.pack("<QIII", self.disk, self.block, n, allocated)
            hdr += self.uuid_create + self.uuid_modify + self.uuid_link
            assert len(hdr) == 348
        else:
            hdr = struct.pack("<III", self.header_size, self.image_type, 0) + b"vdisk test image".ljust(256, b"\0")
            hdr += struct.pack("<II", bo, do) + geometry + struct.pack("<I", 0)
            hdr += struct.pack("<QIIII", self.disk, self.block, self.extra, n, allocated)
            hdr += self.uuid_create + self.uuid_modify + self.uuid_link + self.uuid_parent_modify
            assert len(hdr) == 384
            if self.header_size >= 400:
                hdr += struct.pack("<IIII", 1024, 16, 63, 512)
        out = bytearray(pre + hdr)
        out.extend(bytes(max(0, bo - len(out))))
        out[bo : bo + 4 * len(self.entries)] = b"".join(struct.pack("<I", e) for e in self.entries)
        stride = self.extra + self.block
        for index, block in sorted(self.data.items()):
            at = do + index * stride
            if len(out) < at:
                out.extend(bytes(at - len(out)))
            extra = (b"EXTRA-GARBAGE-" * (self.extra // 14 + 1))[: self.extra]
            out[at : at + stride] = extra + block.ljust(self.block, b"\0")
        if len(out) < do:
            out.extend(bytes(do - len(out)))
        if self.truncate is not None:
            del out[self.truncate :]
        return bytes(out)


def dynamic(guest: bytes, block: int, *, order_seed: int, zero_blocks: set[int] = frozenset(), **kw) -> Vdi:
    """A dynamic VDI of `guest`: all-zero blocks unallocated, `zero_blocks` as ZERO entries, the
    rest stored in a shuffled order."""
    disk = kw.pop("disk", len(guest))
    n = -(-disk // block)
    entries = [FREE] * n
    stored = [i for i in range(n) if i not in zero_blocks and any(guest[i * block : (i + 1) * block])]
    order = stored[:]
    random.Random(order_seed).shuffle(order)
    v = Vdi(disk=disk, block=block, entries=entries, **kw)
    for slot, i in enumerate(order):
        entries[i] = slot
        v.data[slot] = bytes(guest[i * block : (i + 1) * block])
    for i in zero_blocks:
        entries[i] = ZERO
    return v


def static(guest: bytes, block: int, **kw) -> Vdi:
    n = -(-len(guest) // block)
    v = Vdi(disk=len(guest), block=block, image_type=2, entries=list(range(n)), **kw)
    for i in range(n):
        v.data[i] = bytes(guest[i * block : (i + 1) * block])
    return v


def sha_of(guest: bytes, virtual_size: int) -> str:
    h = hashlib.sha256(guest[:virtual_size])
    if virtual_size > len(guest):
        h.update(bytes(virtual_size - len(guest)))
    return h.hexdigest()


def write_sparse(path: Path, data: bytes) -> None:
    """Write `data`, leaving 64 KiB runs of zeros as holes."""
    chunk = 64 << 10
    with open(path, "wb") as f:
        for i in range(0, len(data), chunk):
            piece = data[i : i + chunk]
            if piece.count(0) == len(piece):
                f.seek(len(piece), 1)
            else:
                f.write(piece)
        f.truncate(len(data))


def write(out: Path, name: str, v: Vdi) -> None:
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_sparse(path, v.bytes())


def ok(out: Path, name: str, v: Vdi, guest: bytes, why: str, flags: str = "") -> None:
    write(out, name, v)
    size = -(-v.disk // 512) * 512
    ROWS.append((name, flags, "ok", sha_of(guest, size), str(size), "", why))


def error(out: Path, name: str, v: Vdi | None, err: str, why: str, flags: str = "") -> None:
    if v is not None:
        write(out, name, v)
    ROWS.append((name, flags, "error", "-", "-", err, why))


def ids(seed: int) -> dict[str, bytes]:
    return {"uuid_create": uuid(seed), "uuid_modify": uuid(seed + 1000)}


def overlay(base: bytes, top: bytes, block: int, present: set[int], size: int) -> bytes:
    """`top`'s blocks in `present` over `base` (zero-extended to `size`)."""
    out = bytearray(base[:size].ljust(size, b"\0"))
    for i in present:
        out[i * block : min((i + 1) * block, size)] = top[i * block : min((i + 1) * block, size)]
    return bytes(out)


def make_cases(out: Path) -> None:
    # Block sizes qemu refuses (it reads only 1 MiB), dynamic, blocks stored out of order, some
    # ZERO entries over stored data (the map wins: zeros).
    for k, block in enumerate([512, 4096, 64 << 10, 2 * MIB, 8 * MIB]):
        big = block > MIB
        size = max(block * (3 if big else 9), 3 * MIB) + block // 2
        guest = content(size, 100 + k, keep=0.005 if big else 0.8)
        zb = {1} if big else {1, 5}
        v = dynamic(guest, block, order_seed=k, zero_blocks=zb, **ids(10 + k))
        expect = bytearray(guest)
        for i in zb:
            expect[i * block : (i + 1) * block] = bytes(len(expect[i * block : (i + 1) * block]))
        ok(out, f"dynamic-block-{block}.vdi", v, bytes(expect), f"{block}-byte blocks, shuffled, ZERO entries")

    # VirtualBox's own layout: a 400-byte header, map and data aligned to 1 MiB.
    guest = content(6 * MIB, 7)
    ok(out, "vbox-1mib-aligned.vdi", dynamic(guest, MIB, order_seed=7, align=MIB, **ids(20)), guest, "VirtualBox layout")
    # The 384-byte header (qemu's) with a block size qemu refuses.
    guest = content(5 * MIB, 8)
    v = dynamic(guest, 256 << 10, order_seed=8, header_size=384, **ids(21))
    ok(out, "hdr384-256k-blocks.vdi", v, guest, "384-byte header, 256 KiB blocks")
    # Header version 0 (VirtualBox 1.x): no offsets, map right after the header.
    guest = content(3 * MIB + 4096, 9)
    v = dynamic(guest, 64 << 10, order_seed=9, version=0x00000002, **ids(22))
    ok(out, "version0.vdi", v, guest, "header version 0")
    # cbBlockExtra: service data before each block, garbage that must not reach the output.
    for extra in (512, 4096):
        guest = content(4 * MIB, 10 + extra)
        v = dynamic(guest, MIB, order_seed=extra, extra=extra, **ids(23 + extra))
        ok(out, f"block-extra-{extra}.vdi", v, guest, f"cbBlockExtra {extra}")
    # A disk size that is not a whole number of blocks, nor of sectors (rounded up, as qemu does).
    guest = content(3 * MIB + 700, 11)
    ok(out, "odd-disk-size.vdi", dynamic(guest, MIB, order_seed=11, **ids(30)), guest, "disk size not a multiple of 512")
    # A floppy converted by VBoxManage: 1440 KiB in 1 MiB blocks, the file ending where the disk
    # does, inside its last block.
    guest = content(1474560, 12, keep=0.99)
    v = Vdi(disk=len(guest), block=MIB, align=MIB, entries=[0, 1], **ids(31))
    v.data = {0: bytes(guest[:MIB]), 1: bytes(guest[MIB:])}
    v.truncate = v.layout()[1] + 1474560
    ok(out, "floppy-short-last-block.vdi", v, guest, "the last block is cut short by the end of the file")
    # Static images with a block size qemu refuses, and with extra data.
    guest = content(2 * MIB + 3 * 4096, 13)
    ok(out, "static-64k.vdi", static(guest, 64 << 10, **ids(32)), guest, "static, 64 KiB blocks")
    guest = content(2 * MIB, 14)
    ok(out, "static-extra.vdi", static(guest, 512 << 10, extra=1024, **ids(33)), guest, "static with extra data")
    # Undo images (type 3) read like dynamic ones.
    guest = content(2 * MIB, 15)
    ok(out, "undo-type3.vdi", dynamic(guest, MIB, order_seed=15, image_type=3, **ids(34)), guest, "undo image")
    # An image whose map is entirely FREE or ZERO.
    v = Vdi(disk=4 * MIB, block=MIB, entries=[FREE, ZERO, FREE, ZERO], **ids(35))
    ok(out, "empty-free-and-zero.vdi", v, bytes(4 * MIB), "only FREE and ZERO entries")

    chains(out)
    hostile(out)


def chains(out: Path) -> None:
    # A base, a child and a grandchild found by UUID in their folder; a decoy copy of the base
    # with another modification UUID, a foreign VDI and a text file beside them.
    size = 6 * MIB
    base_guest = content(size, 40, keep=0.3)
    base = dynamic(base_guest, MIB, order_seed=40, align=MIB, uuid_create=uuid(400), uuid_modify=uuid(401))
    write(out, "chain/base.vdi", base)
    decoy = dynamic(content(size, 41, keep=0.1), MIB, order_seed=41, uuid_create=uuid(400), uuid_modify=uuid(499))
    write(out, "chain/base-old-copy.vdi", decoy)
    write(out, "chain/other.vdi", dynamic(content(MIB, 42), MIB, order_seed=0, **ids(402)))
    (out / "chain" / "notes.txt").write_text("not a disk\n")
    # The child: 64 KiB blocks (a different block size from its parent), a larger disk, some
    # blocks of its own, a ZERO block hiding parent data.
    child_size = size + 2 * MIB
    child_block = 64 << 10
    child_guest = content(child_size, 43, keep=0.5)
    present = {0, 3, 17, 40, 95, 120}
    top = bytearray(child_size)
    for i in present:
        top[i * child_block : (i + 1) * child_block] = child_guest[i * child_block : (i + 1) * child_block]
    n = child_size // child_block
    child = Vdi(disk=child_size, block=child_block, image_type=4, entries=[FREE] * n,
                uuid_create=uuid(410), uuid_modify=uuid(411), uuid_link=uuid(400), uuid_parent_modify=uuid(401))
    for slot, i in enumerate(sorted(present, reverse=True)):
        child.entries[i] = slot
        child.data[slot] = bytes(top[i * child_block : (i + 1) * child_block])
    child.entries[10] = ZERO
    write(out, "chain/snap1.vdi", child)
    mid = bytearray(overlay(base_guest, bytes(top), child_block, present, child_size))
    mid[10 * child_block : 11 * child_block] = bytes(child_block)
    ROWS.append(("chain/snap1.vdi", "--references same-dir", "ok", sha_of(bytes(mid), child_size), str(child_size), "", "differencing over a dynamic base"))
    # The grandchild (1 MiB blocks again).
    g_guest = content(child_size, 44, keep=0.5)
    g_present = {2, 7}
    g = Vdi(disk=child_size, block=MIB, image_type=4, entries=[FREE] * (child_size // MIB),
            uuid_create=uuid(420), uuid_modify=uuid(421), uuid_link=uuid(410), uuid_parent_modify=uuid(411))
    for slot, i in enumerate(sorted(g_present)):
        g.entries[i] = slot
        g.data[slot] = bytes(g_guest[i * MIB : (i + 1) * MIB])
    write(out, "chain/snap2.vdi", g)
    final = overlay(bytes(mid), g_guest, MIB, g_present, child_size)
    ROWS.append(("chain/snap2.vdi", "--references same-dir", "ok", sha_of(final, child_size), str(child_size), "", "two differencing levels"))
    ROWS.append(("chain/snap2.vdi", "", "error", "-", "-", "--references same-dir", "parents are denied by default"))
    # A child whose parent is not beside it.
    orphan = Vdi(disk=MIB, block=MIB, image_type=4, entries=[FREE], uuid_create=uuid(430), uuid_modify=uuid(431),
                 uuid_link=uuid(439), uuid_parent_modify=uuid(438))
    error(out, "orphan/child.vdi", orphan, "has the parent's UUID", "the parent is missing", "--references same-dir")
    # A child whose parent changed after it was made.
    write(out, "stale/parent.vdi", dynamic(content(MIB, 45), MIB, order_seed=0, uuid_create=uuid(440), uuid_modify=uuid(441)))
    stale = Vdi(disk=MIB, block=MIB, image_type=4, entries=[FREE], uuid_create=uuid(442), uuid_modify=uuid(443),
                uuid_link=uuid(440), uuid_parent_modify=uuid(449))
    error(out, "stale/child.vdi", stale, "modification UUID", "the parent was modified later", "--references same-dir")
    # A differencing image that names no parent.
    nolink = Vdi(disk=MIB, block=MIB, image_type=4, entries=[FREE], **ids(450))
    error(out, "diff-null-parent.vdi", nolink, "parent UUID is null", "type 4 without a parent UUID")


def hostile(out: Path) -> None:
    guest = content(4 * MIB, 50, keep=0.05)
    base = lambda **kw: dynamic(guest, MIB, order_seed=50, **ids(500), **kw)  # noqa: E731
    v = base()
    v.entries[2] = 7
    error(out, "bad-entry-out-of-range.vdi", v, "entry 2", "an entry beyond the block count")
    v = base()
    v.entries[3] = v.entries[0]
    error(out, "bad-entry-duplicate.vdi", v, "also used by entry", "two entries share a data block")
    v = base()
    v.truncate = v.layout()[1] + MIB
    error(out, "bad-entry-past-end.vdi", v, "past the end of the file", "truncated: data blocks past the end")
    v = base()
    v.truncate = v.layout()[0] + 8
    error(out, "bad-map-past-end.vdi", v, "block map", "the block map runs past the end")
    v = Vdi(disk=5 * MIB, block=MIB, entries=[FREE] * 4, **ids(501))
    error(out, "bad-disk-larger-than-map.vdi", v, "larger than the block map covers", "disk size beyond the map")
    v = Vdi(disk=3 * MIB, block=3 << 19, entries=[FREE] * 2, **ids(502))
    error(out, "bad-block-size.vdi", v, "power of two", "block size not a power of two")
    v = Vdi(disk=MIB, block=MIB, extra=100, entries=[FREE], **ids(503))
    error(out, "bad-extra-size.vdi", v, "extra block data", "cbBlockExtra not a power of two")
    v = Vdi(disk=MIB, block=MIB, entries=[FREE], version=0x00030001, **ids(504))
    error(out, "bad-version.vdi", v, "version 3", "an unknown major version")
    v = Vdi(disk=MIB, block=MIB, entries=[FREE], image_type=9, **ids(505))
    error(out, "bad-type.vdi", v, "image type 9", "an unknown image type")
    v = Vdi(disk=MIB, block=MIB, entries=[FREE], header_size=200, **ids(506))
    error(out, "bad-header-size.vdi", v, "header size 200", "a v1 header smaller than 384 bytes")
    v = Vdi(disk=1 << 46, block=MIB, blocks=1 << 26, entries=[], **ids(507))
    error(out, "bad-huge-map.vdi", v, "past the end of the file", "a 64 TiB disk whose 256 MiB map is missing")


def make_fixtures(out: Path) -> None:
    """Small images committed to testdata/vdi/ for the fixture test and the fuzz seeds."""
    rows = []
    guest = content(64 << 10, 60)
    v = dynamic(guest, 4096, order_seed=60, zero_blocks={3}, **ids(600))
    expect = bytearray(guest)
    expect[3 * 4096 : 4 * 4096] = bytes(4096)
    rows.append(("dynamic-4k.vdi", v, bytes(expect)))
    guest = content(32 << 10, 61)
    rows.append(("static-16k-extra.vdi", static(guest, 16 << 10, extra=512, **ids(601)), guest))
    guest = content((40 << 10) + 1000, 62)
    rows.append(("version0.vdi", dynamic(guest, 8192, order_seed=62, version=0x00000002, **ids(602)), guest))
    with open(out / "expected.tsv", "w") as f:
        f.write("name\tflags\tsha256\tvirtual_size\n")
        for name, v, g in rows:
            (out / name).write_bytes(v.bytes())
            size = -(-v.disk // 512) * 512
            f.write(f"{name}\t\t{sha_of(g, size)}\t{size}\n")


def main() -> None:
    if sys.argv[1:] == ["--fixtures"]:
        make_fixtures(Path(__file__).resolve().parent)
        return
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    make_cases(out)
    with open(out / "cases.tsv", "w") as f:
        f.write("name\tflags\texpect\tsha256\tvirtual_size\terror\twhy\n")
        for row in ROWS:
            f.write("\t".join(row) + "\n")
    print(f"{len(ROWS)} VDI cases in {out}")


if __name__ == "__main__":
    main()
