#!/usr/bin/env bash
# The main job: the daemon, with the default config, reviews every sample alert.
#   ./scripts/demo.sh                        # default model Qwen/Qwen2-VL-2B-Instruct (hub)
#   MODEL=/path/to/model ./scripts/demo.sh   # a local snapshot directory
# Starts a mosquitto on 127.0.0.1:1883 if none listens there, publishes sample_alerts/*.json
# to secondlook-demo-<pid>/alerts/<box_id>, and prints the verdicts that come back over MQTT.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
./scripts/setup.sh --with-broker
MODEL=${MODEL:-Qwen/Qwen2-VL-2B-Instruct}
# a directory given relative to here (the daemon runs in a folder of its own)
[ -e "$MODEL" ] && MODEL=$(realpath "$MODEL")
py=$repo/.venv/bin/python

# the default config reads rules/ and writes var/ in the working directory: a fresh one
work=$(mktemp -d /tmp/secondlook-demo.XXXXXX)
# topics of its own, a client id of its own, no session kept on the broker and a free HTTP
# port: the demo never disturbs a secondlook daemon (or an alarm system) using the same broker
prefix=secondlook-demo-$$
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir "$work/rules"
for rule in "$repo"/rules/*.toml; do  # a rule's own topic moves under the prefix too
    sed "s#^topic = \"#topic = \"$prefix/#" "$rule" >"$work/rules/$(basename "$rule")"
done
cat >"$work/secondlook.toml" <<EOF
[mqtt]
client_id = "$prefix"
session_expiry_s = 0
subscribe = ["$prefix/alerts/#"]
verdict_topic = "$prefix/verdicts/{verdict}/{box_id}/{camera_id}/{event_type}"
shadow_prefix = "$prefix/shadow"
status_topic = "$prefix/status"
feedback_topic = ""
[http]
listen = "127.0.0.1:$port"
EOF
pids=()
# each process is asked to stop, then given 30 s before it is killed
stop() {
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    echo "pid $1 did not stop in 30 s: killing it"
    kill -KILL "$1" 2>/dev/null || true
}
# the daemon first (its retained `offline` then cleared: the broker keeps nothing of the demo),
# then a broker started here
cleanup() {
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop "${pids[i]}"
        if [ "${pids[i]}" = "${daemon:-}" ]; then
            mosquitto_pub -h 127.0.0.1 -q 1 -r -n -t "$prefix/status" 2>/dev/null || true
        fi
    done
}
trap cleanup EXIT

if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
    echo "starting mosquitto on 127.0.0.1:1883"
    # /usr/sbin is not on a user's PATH on Debian
    "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -p 1883 >"$work/mosquitto.log" 2>&1 &
    pids+=($!)
    sleep 1
fi

echo "starting secondlook with model $MODEL (logs: $work/secondlook.log)"
# a session of its own: Ctrl-C here reaches the script alone, whose cleanup then stops the
# daemon with one SIGTERM (a second one would make it exit at once)
(cd "$work" && exec setsid "$repo/.venv/bin/secondlook" run --config secondlook.toml \
    --model "$MODEL") >"$work/secondlook.log" 2>&1 &
daemon=$!
pids+=($daemon)
if ! "$py" - "$daemon" "$port" <<'PY'
import json, os, sys, time, urllib.request
pid, port = int(sys.argv[1]), sys.argv[2]
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("secondlook exited during start-up; its log:")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            if json.load(r)["status"] == "ok":
                break
    except Exception:
        pass
    time.sleep(1)
PY
then
    tail -n 20 "$work/secondlook.log"
    exit 1
fi

samples=(sample_alerts/*.json)
echo "ready; publishing ${#samples[@]} sample alerts"
mosquitto_sub -h 127.0.0.1 -q 1 -v -t "$prefix/verdicts/#" -t "$prefix/alarms/#" \
    -C "${#samples[@]}" -W 3600 >"$work/verdicts.txt" &
sub=$!
pids+=($sub)
sleep 0.5
for file in "${samples[@]}"; do
    box=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["box_id"])' "$file")
    mosquitto_pub -h 127.0.0.1 -q 1 -t "$prefix/alerts/$box" -f "$file"
done
complete=yes
while kill -0 "$sub" 2>/dev/null; do
    if ! kill -0 "$daemon" 2>/dev/null; then
        echo "secondlook exited before every verdict came; its log:"
        tail -n 20 "$work/secondlook.log"
        complete=no
        break
    fi
    sleep 1
done
[ "$complete" = yes ] && { wait "$sub" || complete=no; }

"$py" - "$work/verdicts.txt" <<'PY'
import json, sys
print(f"{'alert':<12} {'event':<20} {'rule':<22} {'verdict':<11} {'P(real)':>7}  topic / reason")
lines = [line.strip().partition(" ") for line in open(sys.argv[1], encoding="utf-8")]
for topic, _, payload in sorted(lines, key=lambda line: json.loads(line[2])["alert_id"]):
    v = json.loads(payload)
    p = "" if v["confidence"] is None else f"{v['confidence']:.3f}"
    print(f"{v['alert_id']:<12} {v['event_type']:<20} {v['rule'] or '-':<22} {v['verdict']:<11} {p:>7}  {topic}")
    print(f"{'':<12} {v['reason'][:110]}" + (f" {v['fields']}" if v["fields"] else ""))
PY
stop "$daemon"
echo "(verdicts of rules in shadow mode go to $prefix/shadow/...: see the log)"
echo "journal: $work/var/journal.sqlite3"
if [ "$complete" = no ] || [ "$(wc -l <"$work/verdicts.txt")" -lt "${#samples[@]}" ]; then
    echo "not every sample alert got its verdict" >&2
    exit 1
fi
