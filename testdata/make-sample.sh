#!/usr/bin/env bash
# Builds testdata/sample.qcow2: a 64 MiB disk holding an ext4 file system with a few real files,
# stored as a zlib-compressed qcow2 (well under 1 MiB), and records the sha256 of its raw guest
# content in testdata/expected.tsv. Needs qemu-img and mkfs.ext4 (e2fsprogs). Run from anywhere.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/etc" "$work/root/usr/share/doc/vdisk"
cp "$here/../README.md" "$work/root/usr/share/doc/vdisk/README.md" 2>/dev/null || echo "vdisk sample" > "$work/root/usr/share/doc/vdisk/README.md"
printf 'sample\n' > "$work/root/etc/hostname"
seq 1 20000 > "$work/root/usr/share/doc/vdisk/numbers.txt"
head -c 300000 /dev/urandom > "$work/root/usr/share/doc/vdisk/random.bin"
truncate -s 64M "$work/disk.raw"
E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L vdisk-sample -U 6f1c4c52-2a3b-4d6e-9f00-112233445566 \
  -E hash_seed=0b7c8d9e-aaaa-bbbb-cccc-ddddeeeeffff,lazy_itable_init=0,lazy_journal_init=0 \
  -d "$work/root" "$work/disk.raw"
rm -f "$here/sample.qcow2"
qemu-img convert -c -f raw -O qcow2 "$work/disk.raw" "$here/sample.qcow2"
sha=$(sha256sum "$work/disk.raw" | cut -d' ' -f1)
size=$(stat -c %s "$work/disk.raw")
printf 'name\tflags\tsha256\tvirtual_size\nsample.qcow2\t\t%s\t%s\n' "$sha" "$size" > "$here/expected.tsv"
echo "sample.qcow2: $(stat -c %s "$here/sample.qcow2") bytes, content sha256 $sha"
