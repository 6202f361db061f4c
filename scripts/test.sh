#!/usr/bin/env bash
# The whole test suite, as README's "Two commands" gives it and as .ci/run runs it:
#  1. `cargo test` (unit tests, and the integration tests that drive the real binary);
#  2. every table of a demo run opened by outside readers (tests/readers.py: pyarrow, DuckDB,
#     polars, Spark, deltalake), where those Python packages are installed (required where
#     PIPELINE_REQUIRE_READERS is set, as in CI);
#  3. the model tests once more under each other instruction set the CPU has: the kernels pick
#     the widest, and a model test whose verdict depended on it (a training trajectory that
#     rounds differently) once failed only on AVX-512 machines. The kernel tests compare every
#     instruction set with the reference themselves.
# Arguments go to `cargo test` (e.g. --locked).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test "$@"

if python3 -c "import deltalake, pyarrow, duckdb, polars, pyspark" >/dev/null 2>&1; then
    echo "== every table through outside readers (tests/readers.py)"
    python3 tests/readers.py target/debug/pipeline
elif [ -n "${PIPELINE_REQUIRE_READERS:-}" ]; then
    echo "PIPELINE_REQUIRE_READERS is set but deltalake, pyarrow, duckdb, polars or pyspark does not import" >&2
    exit 1
else
    echo "== skipped the outside readers: pip install deltalake pyarrow duckdb polars pyspark (and Java)"
fi

other_isas=""
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    other_isas="avx2 portable"
elif grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    other_isas="portable"
fi
for isa in $other_isas; do
    echo "== the model tests with PIPELINE_ISA=$isa"
    PIPELINE_ISA=$isa cargo test "$@" --lib -- models::
done
