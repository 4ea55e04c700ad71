#!/bin/bash
# resync-client-latency.sh - a client's 4 KiB write latency at queue depth 1 during a full
# initial sync, with the replication link rate-limited (a LAN, not loopback).
#
# Two network namespaces joined by a veth with `tc tbf` at RATE in both directions; node-a
# holds a 1 GiB image of random data and is promoted, node-b starts empty, and fio (nbd
# engine) writes to node-a's export from node-a's own namespace (a hypervisor next to its
# disk) for RT seconds while the copy runs. Prints one line per run:
#   <label>: iops N p50 N us p99 N us p99.9 N us max N us
#
# Usage (root): NBDMIRROR=/path/to/nbdmirror [LABEL=x] [RATE=1gbit] [RT=4] [RUNS=1] \
#                 bench/resync-client-latency.sh
# Needs fio with the nbd engine, qemu-img, iproute2 with tc, /usr/bin/python3.
set -euo pipefail
B=${NBDMIRROR:?set NBDMIRROR to the nbdmirror binary}
RATE=${RATE:-1gbit} RT=${RT:-4} RUNS=${RUNS:-1} LABEL=${LABEL:-nbdmirror}
W=$(mktemp -d /var/tmp/nbdmirror-rcl.XXXXXX)
NA=rcl-a-$$ NB=rcl-b-$$
cleanup() {
  ip netns pids "$NA" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns pids "$NB" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$NA" 2>/dev/null || true
  ip netns del "$NB" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
dd if=/dev/urandom of="$W/seed.img" bs=1M count=1024 status=none
for run in $(seq "$RUNS"); do
  ip netns add "$NA"; ip netns add "$NB"
  ip -n "$NA" link set lo up; ip -n "$NB" link set lo up
  ip link add r0 netns "$NA" type veth peer name r0 netns "$NB"
  ip -n "$NA" addr add 10.234.0.1/24 dev r0; ip -n "$NB" addr add 10.234.0.2/24 dev r0
  ip -n "$NA" link set r0 up; ip -n "$NB" link set r0 up
  for n in "$NA" "$NB"; do
    ip netns exec "$n" tc qdisc add dev r0 root tbf rate "$RATE" burst 256kb latency 5ms
  done
  rm -rf "$W/a" "$W/b"; mkdir -p "$W/a" "$W/b"
  cp "$W/seed.img" "$W/a/disk0.img"
  qemu-img create -q -f raw -o preallocation=full "$W/b/disk0.img" 1G
  for n in a b; do
    if [ $n = a ]; then me=10.234.0.1:7801 peer=10.234.0.2:7802; else me=10.234.0.2:7802 peer=10.234.0.1:7801; fi
    cat > "$W/$n/node.toml" <<TOML
node = "node-$n"
data_dir = "."
secret = "resync-client-latency-bench-secret"
replication_listen = "$me"
peer = "$peer"
[[volume]]
name = "disk0"
image = "disk0.img"
size = "1G"
listen = "127.0.0.1:10820"
TOML
  done
  ip netns exec "$NA" "$B" serve --config "$W/a/node.toml" > "$W/a.log" 2>&1 &
  ip netns exec "$NB" "$B" serve --config "$W/b/node.toml" > "$W/b.log" 2>&1 &
  sleep 1.5
  ip netns exec "$NA" "$B" promote disk0 --force --config "$W/a/node.toml" > /dev/null
  sleep 1
  ip netns exec "$NA" fio --name=w --ioengine=nbd --uri=nbd://127.0.0.1:10820/disk0 \
    --rw=randwrite --bs=4k --iodepth=1 --time_based --runtime="$RT" --size=1g \
    --lat_percentiles=1 --percentile_list=50:99:99.9 --output-format=json \
    --output="$W/fio.json" > /dev/null 2>&1
  left=$(ip netns exec "$NA" "$B" status --json --config "$W/a/node.toml" |
    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["volumes"][0]["resync_bytes_left"])')
  /usr/bin/python3 - "$W/fio.json" "$LABEL" "$left" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
p = j["lat_ns"]["percentile"]
print("%s: iops %.0f p50 %.0f us p99 %.0f us p99.9 %.0f us max %.0f us (resync bytes left at the end: %s)" % (
    sys.argv[2], j["iops"], p["50.000000"] / 1e3, p["99.000000"] / 1e3,
    p["99.900000"] / 1e3, j["lat_ns"]["max"] / 1e3, sys.argv[3]))
PY
  ip netns pids "$NA" | xargs -r kill 2>/dev/null || true
  ip netns pids "$NB" | xargs -r kill 2>/dev/null || true
  sleep 1
  ip netns del "$NA"; ip netns del "$NB"
done
