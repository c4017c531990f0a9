#!/bin/sh
# Rebuild the VHD fixtures of this folder and expected.tsv.
#  - fixed-qemu.vhd: qemu-img create -f vpc -o subformat=fixed, filled by qemu-io;
#  - dynamic-small-blocks.vhd and differencing-child.vhd: made from known content by the
#    generator in vdisk-core/tests/vhd_generated.rs (8 KiB blocks, partial sector bitmaps, a
#    W2ru and a W2ku parent locator); their expected sha256 comes from that content, not from
#    a reader.
# Needs qemu-img, qemu-io, cargo. Run from anywhere.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$here"

rm -f fixed-qemu.vhd
qemu-img create -q -f vpc -o subformat=fixed fixed-qemu.vhd 30000
# qemu-img writes random ids and the time into the footer; pin them so the file is reproducible.
python3 - <<'PY'
import struct
p = "fixed-qemu.vhd"
b = bytearray(open(p, "rb").read())
f = len(b) - 512
b[f + 24:f + 28] = struct.pack(">I", 0x2c000000)      # timestamp
b[f + 68:f + 84] = bytes(range(0x10, 0x20))            # unique id
b[f + 64:f + 68] = b"\0\0\0\0"
b[f + 64:f + 68] = struct.pack(">I", ~sum(b[f:f + 512]) & 0xffffffff)
open(p, "wb").write(b)
PY
qemu-io -f vpc -c 'write -P 0x61 0 4096' -c 'write -P 0x62 12800 3000' -c 'write -P 0x63 33792 1024' fixed-qemu.vhd >/dev/null
qemu-img convert -f vpc -O raw fixed-qemu.vhd fixed-qemu.raw
sha=$(sha256sum fixed-qemu.raw | cut -d' ' -f1)
size=$(stat -c %s fixed-qemu.raw)
rm -f fixed-qemu.raw

VHD_FIXTURE_DIR="$here" cargo test -q --manifest-path "$repo/Cargo.toml" -p vdisk-core --test vhd_generated \
    -- --ignored --exact write_fixtures >/dev/null

{
    printf 'name\tflags\tsha256\tvirtual_size\n'
    printf 'fixed-qemu.vhd\t\t%s\t%s\n' "$sha" "$size"
    cat generated.tsv
} > expected.tsv
rm -f generated.tsv
ls -l "$here"
