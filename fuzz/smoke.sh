#!/usr/bin/env bash
# Short fuzz smoke for CI: the stable deterministic smoke test and the named regressions, then,
# when cargo-fuzz and a nightly toolchain are present, each libFuzzer target for a few seconds
# on a seed corpus built from testdata/.
set -euo pipefail
cd "$(dirname "$0")"
cargo test --release --no-default-features --quiet
if cargo fuzz --version >/dev/null 2>&1 && rustup run nightly rustc --version >/dev/null 2>&1; then
  seconds=${FUZZ_SMOKE_SECONDS:-8}
  for target in probe qcow2 vmdk vhd vhdx vdi ova convert; do
    corpus=$(mktemp -d)
    find ../testdata -type f -size -1024k ! -name '*.sh' ! -name '*.py' ! -name '*.tsv' ! -name '*.md' -exec cp {} "$corpus/" \;
    # Leak detection is off: the copy threads' thread-local destructors are reported as leaks.
    cargo +nightly fuzz run "$target" "$corpus" -- -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -detect_leaks=0 2>&1 | tail -n 2
    rm -rf "$corpus"
  done
else
  echo "SKIP: cargo-fuzz or nightly not installed; libFuzzer smoke not run (stable smoke above ran)"
fi
