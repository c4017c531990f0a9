#!/usr/bin/env bash
# The Python package's checks, as .ci/run runs them: build the wheel with maturin in a venv under
# target/, install it, check the stubs against the built module (mypy.stubtest), run pytest
# (API, errors, threads, fork, signals, and the Airflow DAG under real Airflow 3).
#
# Environment: PYTHON (interpreter for the venv, default python3), VDISK_WHEEL (test this wheel
# instead of building one), VDISK_PYTEST_ARGS (extra pytest arguments, e.g. "-k 'not airflow'").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

say() { printf '\n--- %s\n' "$*"; }

python=${PYTHON:-python3}
venv=$root/target/py-venv
# Tools for building and testing; the venv is rebuilt when this line changes.
tools=("maturin>=1.5,<2" "pytest>=7" "mypy>=1.10")
stamp="${tools[*]}"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.tools" 2>/dev/null)" != "$stamp" ]; then
  say "creating $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${tools[@]}"
  echo "$stamp" >"$venv/.tools"
fi
py=$venv/bin/python

say "vdisk CLI (for comparisons)"
cargo build -q -p vdisk-cli
export VDISK_BIN=$root/target/debug/vdisk

if [ -n "${VDISK_WHEEL:-}" ]; then
  # A wheel built elsewhere: .ci/run tests the portable one packaging/build.sh put in dist/.
  wheel=$(realpath "$VDISK_WHEEL")
  say "testing the given wheel $(basename "$wheel")"
else
  say "maturin build --release"
  wheels=$root/target/wheels/py
  rm -rf "$wheels"
  "$venv/bin/maturin" build --release -q -m vdisk-py/Cargo.toml --out "$wheels"
  wheel=$(ls "$wheels"/vdisk-*.whl)
fi
"$py" -m pip install -q --force-reinstall --no-deps "$wheel"
export VDISK_WHEEL=$wheel

say "stubtest and mypy"
# Run from an empty directory so that the installed package, not the source tree, is checked.
(cd "$(mktemp -d)" && "$py" -m mypy.stubtest vdisk && "$py" -m mypy --strict -p vdisk)
# The tests use the API as a typed caller would: type-check them against the stubs.
(cd vdisk-py/tests && "$py" -m mypy --strict --no-incremental --cache-dir=/dev/null .)

say "pytest"
eval "set -- ${VDISK_PYTEST_ARGS:-}"
(cd "$(mktemp -d)" && "$py" -m pytest -p no:cacheprovider -ra --rootdir "$root/vdisk-py" "$root/vdisk-py/tests" "$@")
