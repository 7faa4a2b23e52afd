#!/usr/bin/env bash
# Builds every fuzz target and runs each for N seconds (default 60) from its seeds
# (fuzz/seeds/<target>) and what earlier runs found (fuzz/corpus/<target>, not
# committed). Fails if any target crashes, panics, breaks an invariant or hangs.
#
#   fuzz/run-all.sh [seconds] [target=seconds ...]
#
# e.g. `fuzz/run-all.sh 120 policy_loader=900` gives the slow policy loader longer.
# Uses the nightly toolchain with AddressSanitizer when it is installed, else stable
# without a sanitizer (`-s none`); FUZZ_TOOLCHAIN=stable forces the latter. Installs
# cargo-fuzz if it is missing. A crash leaves its input in fuzz/artifacts/<target>/;
# reproduce with `cargo +nightly fuzz run <target> <that file>`.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift || true
declare -A seconds_for=()
for override in "$@"; do
    seconds_for["${override%%=*}"]="${override#*=}"
done
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked </dev/null
fi

toolchain=(+nightly)
sanitizer=()
if [ "${FUZZ_TOOLCHAIN:-}" = stable ] || ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=()
    sanitizer=(-s none)
fi
echo "fuzz: toolchain ${toolchain[*]:-stable}, sanitizer ${sanitizer[*]:-address}, ${seconds}s per target"

started=$SECONDS
cargo "${toolchain[@]}" fuzz build -O "${sanitizer[@]}" </dev/null
echo "fuzz: build took $((SECONDS - started))s"

failed=()
summary=()
for target in $(cargo "${toolchain[@]}" fuzz list); do
    mkdir -p "corpus/$target" "seeds/$target"
    log="$(mktemp)"
    time_limit="${seconds_for[$target]:-$seconds}"
    # The first directory gets what the run finds; the seeds are only read.
    if cargo "${toolchain[@]}" fuzz run -O "${sanitizer[@]}" "$target" \
        "corpus/$target" "seeds/$target" -- \
        -max_total_time="$time_limit" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        </dev/null >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$target")
        tail -n 60 "$log"
    fi
    # grep -o: libFuzzer's stderr may run into the line before the stats.
    runs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
    rate=$(grep -ao 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
    summary+=("$(printf '%-16s %-6s %12s executions %8s exec/s %6ss' "$target" "$status" "${runs:-?}" "${rate:-?}" "$time_limit")")
    rm -f "$log"
done

echo "fuzz summary:"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
