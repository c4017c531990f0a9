#!/bin/sh
# Rebuild the tiny qcow2 fixtures and expected.tsv (sha256 of the raw guest content as
# `qemu-img convert -O raw` writes it). Needs qemu-img, qemu-io and python3.
#
#   compressed.qcow2    v3, 4 KiB clusters, every cluster zlib-compressed (qemu-img convert -c)
#   zeros.qcow2         v3, 4 KiB clusters: data, zero clusters (with and without a host
#                       cluster), discarded clusters
#   subclusters.qcow2   v3, extended L2 (16 KiB clusters, 512-byte subclusters): allocated,
#                       zero and unallocated subclusters, and a compressed cluster; written by
#                       the generator below, since a qemu-made extended-L2 image is over 64 KiB
#                       (its refcount table lies past the end of the file: good for reading,
#                       not for `check`)
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 - "$tmp/src.raw" <<'PY'
import sys
words = b"qcow2 fixture: the quick brown fox jumps over the lazy dog 0123456789\n"
data = bytearray()
i = 0
while len(data) < 128 * 1024 + 1536:
    data += b"%06d " % i + words
    i += 1
open(sys.argv[1], "wb").write(bytes(data[: 128 * 1024 + 1536]))
PY
rm -f compressed.qcow2 zeros.qcow2 subclusters.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 "$tmp/src.raw" compressed.qcow2

qemu-img create -q -f qcow2 -o cluster_size=4096 zeros.qcow2 64K
qemu-io -f qcow2 \
    -c 'write -P 0x11 0 20K' \
    -c 'write -z 4K 4K' \
    -c 'write -z -u 8K 4K' \
    -c 'write -P 0x22 32K 4K' \
    -c 'write -z 36K 1K' \
    -c 'discard 32K 4K' \
    -c 'write -P 0x33 60K 4K' \
    zeros.qcow2 >/dev/null

python3 - subclusters.qcow2 <<'PY'
import struct, sys, zlib
CB = 14                      # 16 KiB clusters, the smallest extended L2 allows
CS = 1 << CB
SC = CS // 32                # 512-byte subclusters
SIZE = 4 * CS                # 64 KiB virtual disk
L1, L2, DATA = CS, 2 * CS, 3 * CS
img = bytearray(DATA)
hdr = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 3, 0, 0, CB, SIZE, 0, 1, L1, 4 * CS, 1, 0, 0)
hdr += struct.pack(">QQQII", 1 << 4, 0, 0, 4, 112) + bytes(8)   # incompatible: extended L2
img[0:len(hdr)] = hdr
struct.pack_into(">Q", img, L1, (1 << 63) | L2)
def pattern(c, n):
    return bytes(((c * 131) ^ (j * 7) ^ (j >> 9)) & 0xff for j in range(n))
# Cluster 0: host cluster at DATA; subclusters 0-3 and 8 allocated, 4-5 zero, others
# unallocated (zeros: no backing file). Only the bytes up to subcluster 8 are in the file.
alloc = 0b1_0000_1111
zero = 0b11_0000
data = bytearray(9 * SC)
content = pattern(1, CS)
for s in range(32):
    if alloc >> s & 1:
        data[s * SC:(s + 1) * SC] = content[s * SC:(s + 1) * SC]
    elif s < 9:
        data[s * SC:(s + 1) * SC] = b"\xee" * SC      # never read
img += data
struct.pack_into(">QQ", img, L2, (1 << 63) | DATA, (zero << 32) | alloc)
# Cluster 1: no host cluster, subclusters 0-15 read as zero.
struct.pack_into(">QQ", img, L2 + 16, 0, 0xffff << 32)
# Cluster 2: compressed (raw deflate), stored after the data at an unaligned offset.
c = zlib.compressobj(9, zlib.DEFLATED, -15)
blob = c.compress(pattern(2, CS)) + c.flush()
off = len(img) + 5
img += bytes(5) + blob
x = 62 - (CB - 8)
sectors = ((off % 512) + len(blob) + 511) // 512 - 1
struct.pack_into(">QQ", img, L2 + 32, (1 << 62) | (sectors << x) | off, 0)
# Cluster 3: unallocated.
open(sys.argv[1], "wb").write(bytes(img))
PY

printf 'name\tflags\tsha256\tvirtual_size\n' > expected.tsv
for f in compressed.qcow2 zeros.qcow2 subclusters.qcow2; do
    qemu-img convert -f qcow2 -O raw "$f" "$tmp/out.raw"
    sum=$(sha256sum "$tmp/out.raw" | cut -d' ' -f1)
    size=$(qemu-img info -f qcow2 --output json "$f" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    printf '%s\t\t%s\t%s\n' "$f" "$sum" "$size" >> expected.tsv
done
ls -l *.qcow2
