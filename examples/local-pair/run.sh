#!/usr/bin/env bash
# Brings up the two-node pair of this folder on one machine, over loopback: starts node-b and
# node-a, waits until they are connected, and promotes node-a for disk0. Its export then
# answers at nbd://127.0.0.1:10809/disk0 (try `qemu-img info nbd://127.0.0.1:10809/disk0`).
# Runs in the foreground; Ctrl-C stops both daemons cleanly. Logs: state/node-*.log.
#
# Set NBDMIRROR=/path/to/nbdmirror to use an existing binary instead of building one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${NBDMIRROR:-}
if [ -z "$bin" ]; then
    echo "building nbdmirror (cargo build --release)..." >&2
    (cd "$root" && cargo build --release -q -p nbdmirror)
    bin=$root/target/release/nbdmirror
fi
mkdir -p "$here/state"
log_a=$here/state/node-a.log
log_b=$here/state/node-b.log

"$bin" serve --config "$here/node-b.toml" 2>>"$log_b" &
pid_b=$!
"$bin" serve --config "$here/node-a.toml" 2>>"$log_a" &
pid_a=$!

stop() {
    trap - INT TERM EXIT
    kill -TERM "$pid_a" "$pid_b" 2>/dev/null || true
    wait "$pid_a" "$pid_b" 2>/dev/null || true
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

status_a() { "$bin" status --config "$here/node-a.toml" --json 2>/dev/null || true; }

# Bounded wait (30 s) for the two daemons to find each other.
connected=no
for _ in $(seq 1 300); do
    if ! kill -0 "$pid_a" 2>/dev/null || ! kill -0 "$pid_b" 2>/dev/null; then
        echo "a daemon exited at start; its log says:" >&2
        tail -n 5 "$log_a" "$log_b" >&2
        exit 1
    fi
    if status_a | grep -q '"peer": "connected"'; then
        connected=yes
        break
    fi
    sleep 0.1
done
if [ "$connected" != yes ]; then
    echo "node-a and node-b did not connect within 30 s; see $log_a and $log_b" >&2
    exit 1
fi

if ! status_a | grep -q '"role": "primary"'; then
    "$bin" promote disk0 --config "$here/node-a.toml"
fi
"$bin" status --config "$here/node-a.toml"
echo
echo "ready: nbd://127.0.0.1:10809/disk0 (node-a primary, mirrored to node-b). Ctrl-C stops the pair."
# Until a signal, or until a daemon dies (then stop the other one too).
wait -n "$pid_a" "$pid_b" || true
echo "a daemon exited; stopping the pair (logs: $here/state/)" >&2
exit 1
