#!/usr/bin/env bash
# Checks the artifacts packaging/build.sh put in dist/, as .ci/run does after building them:
#  1. every wheel passes `auditwheel show` with the manylinux2014 (glibc 2.17) tag for its arch;
#  2. no symbol in a wheel's extension module or a standalone binary needs glibc > 2.17
#     (checked from the ELF symbol versions; the offending symbols are named);
#  3. the x86_64 wheel installs into a fresh venv, and its `vdisk` command, `python -m vdisk`,
#     `import vdisk` and the standalone binary all convert testdata/sample.qcow2 to exactly what
#     `qemu-img convert -O raw` writes, and report the version with the commit it was built from;
#  4. the sdist carries the commit stamp and every crate the build needs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
GLIBC_FLOOR=2.17
venv=$root/target/packaging-venv
py=$venv/bin/python
[ -x "$py" ] || { echo "packaging/check.sh: run packaging/build.sh first" >&2; exit 1; }

say() { printf '\n--- %s\n' "$*"; }
fail() { echo "packaging/check.sh: $*" >&2; exit 1; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
commit=$(git rev-parse --short=12 HEAD)

shopt -s nullglob
wheels=(dist/vdisk-"$version"-cp39-abi3-*.whl)
binaries=(dist/vdisk-"$version"-*-linux-gnu)
[ ${#wheels[@]} -gt 0 ] || fail "no wheel in dist/"
[ ${#binaries[@]} -gt 0 ] || fail "no standalone binary in dist/"

say "auditwheel show"
for whl in "${wheels[@]}"; do
  case $whl in *x86_64.whl) arch=x86_64 ;; *aarch64.whl) arch=aarch64 ;; *) fail "$whl: unknown architecture" ;; esac
  report=$("$venv/bin/auditwheel" show "$whl")
  grep -q "\"manylinux_2_17_$arch\"" <<<"$report" || { echo "$report" >&2; fail "$whl is not manylinux_2_17_$arch"; }
  case $(basename "$whl") in *manylinux2014_"$arch"*) ;; *) fail "$whl is not tagged manylinux2014_$arch" ;; esac
  echo "$(basename "$whl"): manylinux_2_17_$arch"
done

say "glibc symbol versions (floor $GLIBC_FLOOR)"
"$py" packaging/check_glibc.py "$GLIBC_FLOOR" "${wheels[@]}" "${binaries[@]}"

say "install the wheel into a fresh venv"
wheel=$(ls dist/vdisk-"$version"-cp39-abi3-*x86_64*.whl)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check --no-index "$wheel"

say "sample conversion: installed command, python -m vdisk, import vdisk, standalone binary"
qemu-img convert -f qcow2 -O raw testdata/sample.qcow2 "$work/expected.raw"
"$work/venv/bin/vdisk" convert -p testdata/sample.qcow2 "$work/cmd.raw"
"$work/venv/bin/python" -m vdisk convert testdata/sample.qcow2 "$work/module.raw"
"$work/venv/bin/python" - "$work/api.raw" <<'PY'
import sys
import vdisk
report = vdisk.convert("testdata/sample.qcow2", sys.argv[1])
print(f"import vdisk {vdisk.__version__}: {report.bytes_written} bytes written in {report.seconds:.2f} s")
PY
standalone=$(ls dist/vdisk-"$version"-x86_64-linux-gnu)
"$standalone" convert testdata/sample.qcow2 "$work/binary.raw"
for out in cmd module api binary; do
  cmp "$work/expected.raw" "$work/$out.raw" || fail "$out.raw differs from qemu-img's conversion"
done
echo "all four outputs equal qemu-img convert -O raw ($(stat -c %s "$work/expected.raw") bytes)"

say "versions name the commit"
for v in "$("$work/venv/bin/vdisk" --version)" "$("$standalone" --version)"; do
  echo "$v"
  [[ $v == "vdisk $version ($commit"* ]] || fail "'$v' does not name commit $commit"
done
pyver=$("$work/venv/bin/python" -c 'import vdisk; print(vdisk.__version__)')
echo "vdisk.__version__ = $pyver"
[[ $pyver == "$version+g$commit"* ]] || fail "vdisk.__version__ '$pyver' does not name commit $commit"

say "sdist"
sdist=dist/vdisk-$version.tar.gz
listing=$(tar tzf "$sdist")
for f in pyproject.toml Cargo.lock vdisk-cli/BUILD-COMMIT vdisk-cli/build.rs vdisk-core/src/lib.rs vdisk-py/src/lib.rs python/vdisk/__init__.py; do
  grep -qx "vdisk-$version/$f" <<<"$listing" || fail "$sdist lacks $f"
done
stamp=$(tar xzf "$sdist" -O "vdisk-$version/vdisk-cli/BUILD-COMMIT")
[[ $stamp == "$commit"* ]] || fail "the sdist's commit stamp '$stamp' is not $commit"
echo "$sdist: complete, stamped $stamp"

say "packaging checks passed"
