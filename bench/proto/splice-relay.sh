#!/bin/bash
# Runs bench/proto/splice-relay.c: copy vs splice/tee for a primary's large-write hop,
# ROUNDS interleaved rounds, each with and without the file write. Private loopback only.
# usage: [ROUNDS=3] [CHUNKS=3000] bench/proto/splice-relay.sh   (needs gcc and zlib1g-dev)
set -euo pipefail
if [ -z "${SPLICE_RELAY_NS:-}" ]; then
  export SPLICE_RELAY_NS=1
  exec unshare --net -r -- bash "$0" "$@"
fi
ip link set lo up
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /var/tmp/splice-relay.XXXXXX)
trap 'rm -rf "$work"' EXIT
gcc -O2 -Wall -o "$work/relay" "$here/splice-relay.c" -lz
chunks=${CHUNKS:-3000}
one() { # MODE [NOFILE]
  "$work/relay" sink "$chunks" "$work/sink.img" & local s=$!
  env ${2:+NOFILE=1} "$work/relay" relay "$chunks" "$1" "$work/relay.img" & local r=$!
  timeout 120 "$work/relay" src "$chunks"
  wait "$r" "$s"
}
echo "host: $(nproc) CPUs, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "${ROUNDS:-3}"); do
  echo "round $round"
  for mode in copy splice; do one "$mode" 2>&1 | grep relay; one "$mode" nofile 2>&1 | grep relay; done
done
