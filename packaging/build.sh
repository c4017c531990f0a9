#!/usr/bin/env bash
# Builds vdisk's release artifacts into dist/, portable to every Linux with glibc >= 2.17
# (Oracle Linux / RHEL / Rocky 7 and 8, Ubuntu 18.04+, Amazon Linux 2, Debian 9+):
#
#   dist/vdisk-VERSION-cp39-abi3-manylinux_2_17_ARCH.manylinux2014_ARCH.whl
#        the Python package (CPython >= 3.9, one wheel for all versions); installing it also puts
#        the `vdisk` command on PATH
#   dist/vdisk-VERSION-ARCH-linux-gnu     the standalone `vdisk` binary
#   dist/vdisk-VERSION.tar.gz             the sdist, for platforms no wheel fits (needs Rust)
#   dist/SHA256SUMS
#
# for x86_64, and for aarch64 when rustup can install that target's standard library. Linking
# goes through zig (cargo-zigbuild, maturin --zig) against glibc 2.17's symbol versions, so the
# build machine's newer glibc never leaks in. Everything it needs comes from PyPI into a venv under
# target/. Environment: VDISK_ARCHES (default "x86_64 aarch64"), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

say() { printf '\n--- %s\n' "$*"; }

# glibc floor and the manylinux tag that names it (PEP 599: manylinux2014 = glibc 2.17).
GLIBC_FLOOR=2.17
MANYLINUX=manylinux2014
arches=${VDISK_ARCHES:-x86_64 aarch64}

# Build tools, pinned; the venv is rebuilt when this list changes.
tools=("maturin==1.16.0" "ziglang==0.17.1" "cargo-zigbuild==0.24.1" "auditwheel==6.8.2")
venv=$root/target/packaging-venv
stamp="${tools[*]}"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.tools" 2>/dev/null)" != "$stamp" ]; then
  say "installing ${tools[*]} into $venv"
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${tools[@]}"
  echo "$stamp" >"$venv/.tools"
fi
export PATH=$venv/bin:$PATH

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit=$commit-dirty; fi
date=$(git log -1 --format=%cs HEAD 2>/dev/null || true)

rm -rf dist
mkdir -p dist

for arch in $arches; do
  triple=$arch-unknown-linux-gnu
  if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
    if ! rustup target add "$triple" >/dev/null 2>&1; then
      if [ "$arch" = x86_64 ]; then
        echo "packaging: cannot install the Rust standard library for $triple" >&2
        exit 1
      fi
      say "skipping $arch: rustup cannot install the standard library for $triple here"
      continue
    fi
  fi
  say "$arch: vdisk binary (glibc $GLIBC_FLOOR)"
  cargo zigbuild -q --locked --profile dist --target "$triple.$GLIBC_FLOOR" -p vdisk-cli
  cp "target/$triple/dist/vdisk" "dist/vdisk-$version-$arch-linux-gnu"

  say "$arch: wheel ($MANYLINUX)"
  maturin build -q --locked --profile dist --zig --target "$triple" --compatibility "$MANYLINUX" \
    -m vdisk-py/Cargo.toml --out dist
done

say "sdist"
# An sdist has no git history: it carries the commit in vdisk-cli/BUILD-COMMIT, which the build
# script reads first (the file exists only while the sdist is made; cargo packages it as an
# untracked file).
stampfile=vdisk-cli/BUILD-COMMIT
trap 'rm -f "$root/$stampfile"' EXIT
echo "$commit $date" >"$stampfile"
maturin sdist -m vdisk-py/Cargo.toml --out dist >/dev/null
rm -f "$stampfile"

(cd dist && sha256sum -- * >SHA256SUMS)
say "dist/"
ls -l dist
