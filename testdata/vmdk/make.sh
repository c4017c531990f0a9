#!/usr/bin/env bash
# Rebuilds the VMDK fixtures with the generator in vdisk-core/tests/vmdk_generated.rs
# (`write_fixtures`) and records the sha256 and size of their guest content as qemu-img reads it,
# so the expectations do not come from vdisk:
#   sparse-zeroed.vmdk   monolithicSparse, 4 KiB grains, zeroed-grain entries, redundant GD
#   stream-vmware.vmdk   streamOptimized written VMware's way (GD at the end, footer, markers)
#   sesparse.vmdk        seSparse descriptor over sesparse-extent.vmdk (needs --references same-dir)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
VMDK_FIXTURE_DIR="$here" cargo test -q -p vdisk-core --test vmdk_generated -- --ignored --exact write_fixtures
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'name\tflags\tsha256\tvirtual_size\n' >"$here/expected.tsv"
for row in "sparse-zeroed.vmdk|" "stream-vmware.vmdk|" "sesparse.vmdk|--references same-dir"; do
  name=${row%%|*}
  flags=${row#*|}
  qemu-img convert -f vmdk -O raw "$here/$name" "$tmp/out.raw"
  sha=$(sha256sum "$tmp/out.raw" | cut -d' ' -f1)
  size=$(stat -c %s "$tmp/out.raw")
  printf '%s\t%s\t%s\t%s\n' "$name" "$flags" "$sha" "$size" >>"$here/expected.tsv"
done
cat "$here/expected.tsv"
