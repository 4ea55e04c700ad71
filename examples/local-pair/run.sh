#!/usr/bin/env bash
# Brings up the two-node pair of this folder on one machine, over loopback: starts node-b and
# node-a, waits until they are connected, and promotes node-a for disk0. Its export then
# answers at nbd://127.0.0.1:10809/disk0 (try `qemu-img info nbd://127.0.0.1:10809/disk0`).
# Runs in the foreground; Ctrl-C stops both daemons cleanly. Logs: state/node-*.log.
# A daemon that dies (try `kill -9 $(cat state/node-b.pid)`) is restarted after 3 s while the
# other keeps serving: it comes back secondary and resyncs only what changed meanwhile. One
# that keeps dying at start (a broken config) is left down; the other keeps running.
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

declare -A pid started
start_node() { # a | b
    "$bin" serve --config "$here/node-$1.toml" 2>>"$here/state/node-$1.log" &
    pid[$1]=$!
    started[$1]=$SECONDS
    echo "${pid[$1]}" > "$here/state/node-$1.pid"
}
start_node b
start_node a
pid_a=${pid[a]}
pid_b=${pid[b]}

stop() {
    trap - INT TERM EXIT
    kill -TERM "${pid[a]}" "${pid[b]}" 2>/dev/null || true
    wait "${pid[a]}" "${pid[b]}" 2>/dev/null || true
    rm -f "$here/state/node-a.pid" "$here/state/node-b.pid"
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
# Until a signal. A daemon that dies is restarted (it comes back secondary); one that dies
# twice within 10 s of its start is left down. The loop ends when no daemon is left.
declare -A quick=([a]=0 [b]=0)
while :; do
    alive=()
    for n in a b; do
        [ -n "${pid[$n]}" ] && kill -0 "${pid[$n]}" 2>/dev/null && alive+=("${pid[$n]}")
    done
    [ ${#alive[@]} -eq 0 ] && break
    wait -n "${alive[@]}" || true
    for n in a b; do
        [ -n "${pid[$n]}" ] || continue
        kill -0 "${pid[$n]}" 2>/dev/null && continue
        rc=0; wait "${pid[$n]}" 2>/dev/null || rc=$?
        if [ $((SECONDS - ${started[$n]})) -lt 10 ]; then quick[$n]=$((quick[$n] + 1)); else quick[$n]=0; fi
        if [ "${quick[$n]}" -ge 2 ]; then
            echo "node-$n exited again right after its start (status $rc): left down, see $here/state/node-$n.log" >&2
            pid[$n]=""
            rm -f "$here/state/node-$n.pid"
            continue
        fi
        echo "node-$n exited (status $rc); the other node keeps serving. Restarting node-$n in 3 s: it comes back secondary and resyncs what changed." >&2
        sleep 3
        start_node "$n"
    done
done
echo "no daemon left; logs: $here/state/" >&2
exit 1
