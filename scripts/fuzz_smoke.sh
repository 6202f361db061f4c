#!/usr/bin/env bash
# A short bounded libFuzzer run of every cargo-fuzz target, as CI does it: the stable toolchain
# (`--sanitizer none`: no AddressSanitizer, which needs nightly; Rust's own checks and debug
# assertions still turn memory and arithmetic bugs into crashes), a debug build (minutes, not the
# ten of a release build on two cores), SECONDS per target (default 10) from the committed seeds.
# Fails when any target finds a crash; libFuzzer writes the input to fuzz/artifacts/<target>/.
# Longer runs: `cd fuzz && cargo +nightly fuzz run TARGET corpus/TARGET seeds/TARGET`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET="${1:-10}"
TOOLS="$PWD/target/tools"
if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$TOOLS/bin/cargo-fuzz" ]; then
    echo "== installing cargo-fuzz (crates.io) into $TOOLS"
    cargo install --quiet cargo-fuzz --version 0.13.2 --locked --root "$TOOLS"
fi
export PATH="$TOOLS/bin:$PATH"
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
echo "== cargo fuzz build (stable, debug, no sanitizer)"
if ! cargo fuzz build --sanitizer none --dev >"$corpus/build.log" 2>&1; then
    cat "$corpus/build.log" >&2
    exit 1
fi
tail -n 1 "$corpus/build.log"
for target in $(cargo fuzz list); do
    mkdir -p "$corpus/$target"
    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s"
    status=0
    cargo fuzz run --sanitizer none --dev "$target" "$corpus/$target" "seeds/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=20 \
        >"$corpus/$target.log" 2>&1 || status=$?
    grep -E '^Done' "$corpus/$target.log" || true
    if [ "$status" != 0 ]; then
        tail -n 40 "$corpus/$target.log" >&2
        echo "fuzz target $target failed; the input is under fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
