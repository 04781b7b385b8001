#!/usr/bin/env bash
# Runs mqlite's fuzz targets one after another, each for SECONDS, from a fresh corpus seeded by
# Fuzz/seeds.py (in a temporary folder, or under $FUZZ_CORPUS/<target> to keep and grow it).
# Exits non-zero if any target found a crash, a hang (-timeout) or ran out of memory; the input
# that did it is left in .build-fuzz/findings/ and the log's end is printed.
#
#   Fuzz/run.sh SECONDS [TARGET...]      targets: decoder connection json config proxy (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=$1
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decoder connection json config proxy)
bin=${FUZZ_BIN:-.build-fuzz/debug/mqlite-fuzz}
findings=.build-fuzz/findings
mkdir -p "$findings"

# A crash must end the process at once (no backtracer), and ASan's leak check at exit is off:
# the Swift runtime's caches read as leaks. Memory that grows per input is caught by -rss_limit_mb.
export SWIFT_BACKTRACE=enable=no
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}

status=0
for target in "${targets[@]}"; do
    if [ -n "${FUZZ_CORPUS:-}" ]; then
        corpus=$FUZZ_CORPUS/$target
        mkdir -p "$corpus"
    else
        corpus=$(mktemp -d "${TMPDIR:-/tmp}/mqlite-fuzz-$target.XXXXXX")
    fi
    python3 Fuzz/seeds.py "$target" "$corpus"
    options=(-max_total_time="$seconds" -timeout="${FUZZ_TIMEOUT:-10}" -rss_limit_mb="${FUZZ_RSS_MB:-2048}"
        -max_len="${FUZZ_MAX_LEN:-4096}" -detect_leaks=0 -print_final_stats=1 -artifact_prefix="$findings/$target-")
    [ -f "Fuzz/$target.dict" ] && options+=(-dict="Fuzz/$target.dict")
    log=$findings/$target.log
    start=$(date +%s)
    if MQLITE_FUZZ_TARGET=$target "$bin" "${options[@]}" "$corpus" >"$log" 2>&1; then
        runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log")
        echo "fuzz $target: $runs executions in $(($(date +%s) - start)) s, no crash or hang ($(ls "$corpus" | wc -l) inputs in the corpus)"
    else
        echo "fuzz $target: FAILED after $(($(date +%s) - start)) s; the end of $log:"
        tail -n 40 "$log"
        ls -l "$findings/$target-"* 2>/dev/null || true
        status=1
    fi
    [ -n "${FUZZ_CORPUS:-}" ] || rm -rf "$corpus"
done
exit $status
