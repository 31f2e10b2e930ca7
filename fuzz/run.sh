#!/usr/bin/env bash
# Runs every cargo-fuzz target of shoal for a bounded time, from the committed corpus.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      (default: 60 s, every target)
#
# Environment:
#   FUZZ_SANITIZER  address (default) | none   (none: faster, but no AddressSanitizer checks)
#   FUZZ_MERGE      1: add new small inputs that raise coverage to fuzz/corpus/<target>,
#                   smallest first, while it holds fewer than FUZZ_MAX_FILES files
#                   (default 1, 0 when CI=true: a CI clone is thrown away anyway)
#   FUZZ_MAX_SEED   largest input (bytes) merged into the committed corpus (default 2048)
#   FUZZ_MAX_FILES  most files a target's committed corpus may hold (default 150)
#   FUZZ_JOBS       cargo build jobs (default: cargo's choice)
#
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it accept cargo-fuzz's -Z flags.
# Inputs in fuzz/regressions/<target>/ are replayed whole before fuzzing (known crashers and
# inputs longer than -max_len); a target that fails on one is not fuzzed this run.
# Exit status: 0 when no target crashed; 1 otherwise (crashing inputs are in fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$0")"
FUZZ_DIR=$(pwd)
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

SECONDS_PER_TARGET=${1:-60}
shift || true
ALL_TARGETS=(heartbeat codec config proxy_header http_request http_serve grpc h1_engine h1_differential)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
SANITIZER=${FUZZ_SANITIZER:-address}
if [ "${CI:-}" = true ]; then MERGE=${FUZZ_MERGE:-0}; else MERGE=${FUZZ_MERGE:-1}; fi
MAX_SEED=${FUZZ_MAX_SEED:-2048}
MAX_FILES=${FUZZ_MAX_FILES:-150}
[ -z "${FUZZ_JOBS:-}" ] || export CARGO_BUILD_JOBS="$FUZZ_JOBS"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

start=$(date +%s)
echo "==> building fuzz targets (sanitizer: $SANITIZER)"
# --fuzz-dir: cargo-fuzz would otherwise look for ./fuzz below the current directory.
cargo fuzz build --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER"
echo "==> built in $(( $(date +%s) - start ))s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
summary=()
for t in "${TARGETS[@]}"; do
    corpus="$FUZZ_DIR/corpus/$t"
    mkdir -p "$corpus" "$work/$t"
    log="$work/$t.log"
    # Known crashers and other inputs worth replaying whole (the corpus is cut to -max_len).
    mapfile -t regressions < <(find "$FUZZ_DIR/regressions/$t" -type f 2>/dev/null | sort)
    if [ ${#regressions[@]} -gt 0 ]; then
        echo "==> replaying ${#regressions[@]} regression inputs of $t"
        if ! cargo fuzz run --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" "$t" "${regressions[@]}" \
            -- -rss_limit_mb=2048 >"$log" 2>&1; then
            failed+=("$t")
            summary+=("$t: FAILED replaying fuzz/regressions/$t")
            echo "---- $t failed on a regression input:"
            grep -E "^Running: " "$log" | tail -1
            grep -m1 -E -A12 "panicked at|ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)" "$log" || tail -n 40 "$log"
            continue
        fi
    fi
    echo "==> fuzzing $t for ${SECONDS_PER_TARGET}s ($(find "$corpus" -type f | wc -l) seed files)"
    # New inputs go to the scratch dir (the first corpus dir); the committed corpus is only read.
    set +e
    cargo fuzz run --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" "$t" "$work/$t" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len=4096 -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 || true)
    if [ $rc -ne 0 ]; then
        failed+=("$t")
        summary+=("$t: FAILED (exit $rc) after ${runs:-?} runs")
        echo "---- $t failed; the error and the input (whole log: fuzz/artifacts/$t.log):"
        mkdir -p "$FUZZ_DIR/artifacts"
        cp "$log" "$FUZZ_DIR/artifacts/$t.log"
        grep -m1 -E -A24 "panicked at|ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)" "$log" || tail -n 40 "$log"
        sed -n '/^Failing input:/,/^Reproduce with:/p' "$log"
        echo "---- crashing inputs: $(ls -1 "$FUZZ_DIR/artifacts/$t" 2>/dev/null | tr '\n' ' ')"
        echo "---- reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $t fuzz/artifacts/$t/<file>"
        continue
    fi
    summary+=("$t: ${runs:-?} runs, ${eps:-?} exec/s, ${cov:-cov: ?}")
    if [ "$MERGE" = 1 ]; then
        find "$work/$t" -type f -size +"${MAX_SEED}"c -delete
        before=$(find "$corpus" -type f | wc -l)
        cp -r "$corpus" "$work/$t.merged"
        # Adds to the copy only the scratch inputs that bring new coverage.
        if cargo fuzz run --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" "$t" \
            "$work/$t.merged" "$work/$t" -- -merge=1 -max_len=4096 >"$work/$t.merge.log" 2>&1; then
            # New files that raise coverage, smallest first, up to the cap.
            room=$(( MAX_FILES - before ))
            added=0
            while IFS= read -r f; do
                [ "$added" -lt "$room" ] || break
                name=$(basename "$f")
                [ -e "$corpus/$name" ] || { cp "$f" "$corpus/$name"; added=$((added + 1)); }
            done < <(find "$work/$t.merged" -type f -printf '%s %p\n' | sort -n | cut -d' ' -f2-)
            echo "    corpus/$t: $before -> $(find "$corpus" -type f | wc -l) files"
        else
            echo "    corpus/$t: merge failed (see below); corpus unchanged"
            tail -n 20 "$work/$t.merge.log"
        fi
    fi
done

echo "==> fuzz summary ($(( $(date +%s) - start ))s in all)"
printf '    %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "==> crashes in: ${failed[*]} (inputs in fuzz/artifacts/ and fuzz/regressions/)"
    exit 1
fi
