#!/usr/bin/env bash
# The multi-process tests (marked slow) while two CPU hogs hold both cores, N times in a row (default 3).
# Passes only if every round passes. Usage: scripts/stress.sh [ROUNDS] [extra pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"; shift || true
hogs=()
cleanup() { kill "${hogs[@]}" 2>/dev/null; wait "${hogs[@]}" 2>/dev/null; }
trap cleanup EXIT INT TERM
for _ in 1 2; do
    .venv/bin/python -c "while True: pass" &
    hogs+=($!)
done
failed=0
for round in $(seq 1 "$rounds"); do
    started=$(date +%s)
    if .venv/bin/python -m pytest -q -p no:cacheprovider -m slow "$@"; then
        echo "stress round $round/$rounds: passed in $(( $(date +%s) - started )) s (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    else
        echo "stress round $round/$rounds: FAILED after $(( $(date +%s) - started )) s"
        failed=1
    fi
done
exit "$failed"
