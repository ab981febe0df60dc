#!/usr/bin/env bash
# The benchmark set for a CUDA host, one run after another, each run's output in DIR/NAME.log
# and its JSON result in DIR/NAME.json (default DIR: bench-results):
#   2b, 2b-compile, 7b      `secondlook bench --arch ...` at 1920x1080 (random weights)
#   2b-terse                the 2B against a naive path that generates 3 tokens, not 64
#   gil                     scripts/gil_contention.py on the full-size 2B, batches of 16
#   profile                 scripts/profile_pass.py: the same pass eager, profiled, compiled
#   pipeline-thread/process the daemon with the 2B model on a thread, then in its own process
# A run that fails or outlasts RUN_LIMIT_S (default 240) is reported and the next one starts.
# ONLY=name,name runs a subset; ALERTS scales the model benches (default 1024).
# Needs secondlook installed (`secondlook` on PATH, or SECONDLOOK=...) and mosquitto.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-results}
mkdir -p "$out"
secondlook=${SECONDLOOK:-secondlook}
python=${PYTHON:-python3}
alerts=${ALERTS:-1024}
limit=${RUN_LIMIT_S:-240}
only=${ONLY:-}

run() {
    local name=$1
    shift
    if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then
        return
    fi
    echo "== $name: $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep '^{' "$out/$name.log" | tail -n 1 >"$out/$name.json"
    echo "   exit $rc after $((SECONDS - start)) s: $(cut -c1-300 "$out/$name.json")"
}

size=(--image-size 1920x1080)
run 2b "$secondlook" bench --arch qwen2-vl-2b "${size[@]}" --alerts "$alerts" \
    --baseline-alerts 8 --json
run 2b-terse "$secondlook" bench --arch qwen2-vl-2b "${size[@]}" --alerts "$alerts" \
    --baseline-alerts 8 --baseline-new-tokens 3 --json
run 2b-compile "$secondlook" bench --arch qwen2-vl-2b "${size[@]}" --alerts "$alerts" \
    --baseline-alerts 1 --compile --json
run 7b "$secondlook" bench --arch qwen2-vl-7b "${size[@]}" --alerts "$((alerts / 2))" \
    --baseline-alerts 4 --json
run gil "$python" scripts/gil_contention.py --full --device cuda --batch 16 "${size[@]}"
run profile "$python" scripts/profile_pass.py --device cuda --batch 16 "${size[@]}"
for worker in thread process; do
    run "pipeline-$worker" "$secondlook" bench --backend pipeline --arch qwen2-vl-2b \
        --worker "$worker" "${size[@]}" --alerts "$((alerts * 2))" --json
done
