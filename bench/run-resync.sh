#!/usr/bin/env bash
# bench/run-resync.sh: full initial sync and 1 %-dirty resync of a 1 GiB nbdmirror pair, against
# nbdcopy copying the same image between two `nbdmirror export`s; interleaved rounds, one run
# (issue 3, "Speed": resync).
#
# Once per run: IMGDIR/data.raw, SIZE bytes of random data (head -c SIZE /dev/urandom: nothing to
# compress, nothing sparse; the worst case for zstd and the same bytes for every contender).
# Every round, in an order that rotates:
#   nbdcopy   nbdmirror export --read-only --image data.raw (127.0.0.1:10830) and
#             nbdmirror export --image dst.raw (127.0.0.1:10831; dst.raw a new sparse file, like
#             the daemon's new image); timed: `nbdcopy SRC DST` (defaults: multi-conn, threads)
#             and, on a new dst.raw, `nbdcopy --flush SRC DST` (written back to disk at the end)
#   full      a new pair (state wiped): node-a's image = a copy of data.raw, node-b has no image
#             (the daemon creates it empty and sparse). Both daemons started, node-a waits for
#             peer=connected, then timed: from `nbdmirror promote disk0 --config node-a.toml` to
#             node-a reporting sync=in-sync
#   dirty     right after `full`, same pair: node-b stopped (SIGTERM), node-a waits for
#             peer=disconnected, DIRTY_PCT % of the volume written through node-a's export as
#             random BLOCK writes (fio, nbd engine, each block once), then node-b restarted;
#             timed: from node-b's start to node-a reporting peer=connected and sync=in-sync
#             and resync_bytes_sent above its value before (also reported: from node-a's
#             "peer connected" log line to in-sync)
#   clocks    the times reported are read off node-a's log (UTC timestamps of "peer connected" and
#             "resync to the peer complete", against the script's `date` stamp taken just before
#             the promote / node-b's start; bench/mirror-log-times.py). A timed wait reads the
#             log every 2 ms until the resync's end is there, then confirms with `status`: status
#             calls back to back (a process start each, a few ms) are too coarse for a resync of
#             ~0.1 s, and took most of a core from the pair being timed (runs before 2026-12-07
#             did that). The status clock (*_poll_seconds: the confirming answer, an upper
#             bound) is kept as a cross-check, and is the fallback when the log has no such
#             lines.
#   check     both daemons stopped, `cmp` of the two images (a fast resync that copied nothing
#             would be worthless): a difference fails the round
# Before each timed step, the images involved are written back and evicted from the page cache
# (dd ... nocache), so every contender starts cold.
#
# Usage (from anywhere; build first with `cargo build --release -p nbdmirror`):
#   bench/run-resync.sh
#   ROUNDS=1 bench/run-resync.sh
#
# Environment knobs:
#   ROUNDS=3         interleaved rounds (nbdcopy first in odd rounds, the pair first in even)
#   SIZE=1G          volume size                   DIRTY_PCT=1  percent of it dirtied
#   BLOCK=64k        size of each dirtying write
#   OUTDIR=          results folder (default: bench/results-resync-YYYYmmdd-HHMMSS); new or empty
#   IMGDIR=          images and the pair's state (default: a fresh folder under ${TMPDIR:-/var/tmp},
#                    deleted at the end unless KEEP_IMAGES=1)
#   NBDMIRROR=       binary (default: target/release/nbdmirror in this repo; never built here);
#                    copied next to the images at start, every round runs that copy
#   SERVE_ARGS=      extra arguments for `nbdmirror serve`
#   MIRROR_EXTRA_TOML=  extra top-level TOML lines for both configs (e.g. 'resync_checksum = true')
#   SYNC_TIMEOUT=180 seconds to wait for each state (a stuck resync fails the round)
#   STEPS="nbdcopy pair"  what to run each round (nbdcopy alone works without the daemon)
#
# Network isolation: re-executes itself under `unshare --net`; all ports are private.
#
# Output in OUTDIR: meta.md; roundN/results.txt (`name value unit` lines); roundN/*.log (server
# logs); roundN/status-*.json (status answers at each step); summary.md (bench/summarize-resync.py).
# Exit status: 0 if every round completed and every image comparison matched, 1 otherwise.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
KNOBS="STEPS ROUNDS SIZE DIRTY_PCT BLOCK OUTDIR IMGDIR KEEP_IMAGES NBDMIRROR SERVE_ARGS MIRROR_EXTRA_TOML SYNC_TIMEOUT"

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "run-resync.sh takes no arguments (knobs are environment variables; see --help)" >&2; exit 2 ;;
esac

if [ "${RUN_RESYNC_NETNS:-}" != "$$" ]; then
  cmd=""
  for k in $KNOBS; do
    if [ -n "${!k+x}" ]; then cmd+="$k=$(printf '%q' "${!k}") "; fi
  done
  cmd+=$(printf '%q' "$0")
  export RUN_RESYNC_CMDLINE="$cmd" RUN_RESYNC_NETNS=$$
  userns=(); [ "$(id -u)" -eq 0 ] || userns=(--map-root-user)
  exec unshare --net "${userns[@]}" -- bash "$SELF"
fi
ip link set lo up
if [ -r /proc/1/ns/net ] && [ "$(readlink /proc/self/ns/net)" = "$(readlink /proc/1/ns/net)" ]; then
  echo "error: still in PID 1's network namespace after unshare --net" >&2; exit 2
fi

ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
DIRTY_PCT=${DIRTY_PCT:-1}
BLOCK=${BLOCK:-64k}
KEEP_IMAGES=${KEEP_IMAGES:-0}
NBDMIRROR=${NBDMIRROR:-$REPO/target/release/nbdmirror}
SERVE_ARGS=${SERVE_ARGS:-}
MIRROR_EXTRA_TOML=${MIRROR_EXTRA_TOML:-}
SYNC_TIMEOUT=${SYNC_TIMEOUT:-180}
STAMP=$(date +%Y%m%d-%H%M%S)
OUTDIR=${OUTDIR:-$REPO/bench/results-resync-$STAMP}

die() { echo "error: $*" >&2; exit 2; }
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[ -x "$NBDMIRROR" ] || die "$NBDMIRROR missing: run 'cargo build --release -p nbdmirror' first"
STEPS=${STEPS:-nbdcopy pair}
for s in $STEPS; do case "$s" in nbdcopy|pair) ;; *) die "unknown step '$s' (known: nbdcopy pair)" ;; esac; done
[[ " $STEPS " != *" pair "* ]] || "$NBDMIRROR" serve --help >/dev/null 2>&1 || die "$NBDMIRROR has no 'serve' subcommand (the mirror daemon): nothing to measure"
for tool in fio nbdcopy nbdinfo python3 dd cmp ip numfmt; do command -v "$tool" >/dev/null || die "$tool not found"; done
size_bytes=$(numfmt --from=iec "${SIZE^^}") || die "bad SIZE $SIZE"
block_bytes=$(numfmt --from=iec "${BLOCK^^}") || die "bad BLOCK $BLOCK"
# ceil(size * pct / 100 / block) blocks
DIRTY_BLOCKS=$(python3 -c "import math; print(math.ceil($size_bytes * $DIRTY_PCT / 100 / $block_bytes))")
DIRTY_BYTES=$((DIRTY_BLOCKS * block_bytes))
read -r -a SERVE_EXTRA <<<"$SERVE_ARGS"
if [ -d "$OUTDIR" ] && [ -n "$(ls -A "$OUTDIR")" ]; then die "OUTDIR $OUTDIR exists and is not empty"; fi
mkdir -p "$OUTDIR"; OUTDIR=$(cd "$OUTDIR" && pwd)
if [ -z "${IMGDIR:-}" ]; then
  IMGDIR=$(mktemp -d "${TMPDIR:-/var/tmp}/nbdmirror-resync.XXXXXX"); OWN_IMGDIR=1
else
  mkdir -p "$IMGDIR"; OWN_IMGDIR=0
fi
IMGDIR=$(cd "$IMGDIR" && pwd)
NBDMIRROR_SRC=$NBDMIRROR
NBDMIRROR="$IMGDIR/nbdmirror.bin"
cp "$NBDMIRROR_SRC" "$NBDMIRROR"
DATA="$IMGDIR/data.raw"; DST="$IMGDIR/dst.raw"
MDIR="$IMGDIR/pair"; CFG_A="$MDIR/node-a.toml"; CFG_B="$MDIR/node-b.toml"
IMG_A="$MDIR/node-a/disk0.img"; IMG_B="$MDIR/node-b/disk0.img"
URI_A="nbd://127.0.0.1:10840/disk0"
WAIT=(python3 "$HERE/mirror-wait.py" "$NBDMIRROR")
# Timed waits watch node-a's log for the end of the resync before they call `status`: status
# calls back to back took most of one of the two cores from the daemons being timed (nbdcopy,
# timed by its exit, had no such load).
DONE_TEXT="resync to the peer complete"
LOG_WAIT=(--log-text "$DONE_TEXT" --log)
log_done_count() { grep -c -F "$DONE_TEXT" "$1" 2>/dev/null || true; }

# ---- processes: started here, stopped by PID --------------------------------------------------
declare -A PIDS=()
stop_one() {  # stop_one LABEL: SIGTERM, wait <= 30 s, SIGKILL as a last resort
  local pid=${PIDS[$1]:-} rc=0
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "warning: $1 ignored SIGTERM for 30 s, killed" >&2; kill -KILL "$pid" 2>/dev/null || true
    echo "note $1 SIGKILLed after 30 s of SIGTERM" >>"$RES"
  fi
  wait "$pid" 2>/dev/null || rc=$?
  [ "$rc" = 0 ] || echo "note $1 exit status $rc" >>"$RES"
  unset "PIDS[$1]"
}
stop_all() { local k; for k in "${!PIDS[@]}"; do stop_one "$k"; done; }
RES=/dev/null
cleanup() {
  local rc=$?
  stop_all
  if [ "$KEEP_IMAGES" != 1 ]; then
    rm -rf "$MDIR"; rm -f "$DATA" "$DST" "$NBDMIRROR"
    [ "$OWN_IMGDIR" != 1 ] || rmdir "$IMGDIR" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

evict() { dd of="$1" oflag=nocache conv=notrunc,fdatasync count=0 status=none; dd if="$1" iflag=nocache count=0 status=none; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
wait_nbd() {  # wait_nbd URI LABEL
  for _ in $(seq 1 300); do
    kill -0 "${PIDS[$2]}" 2>/dev/null || return 1
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
field() { sed -n "s/^$1 //p" <<<"$2"; }   # field NAME OUTPUT-OF-mirror-wait
jget() {  # jget KEY STATUS-JSON: a field of volumes[0]
  python3 -c 'import json,sys; v=json.loads(sys.argv[2])["volumes"][0].get(sys.argv[1]); print("null" if v is None else v)' "$1" "$2"
}
write_cfg() {  # write_cfg NODE REPL PEER NBD FILE
  cat >"$5" <<EOF
# written by bench/run-resync.sh
node = "$1"
data_dir = "$1"
secret = "run-resync-bench-secret-loopback-only"
replication_listen = "127.0.0.1:$2"
peer = "127.0.0.1:$3"
$MIRROR_EXTRA_TOML

[[volume]]
name = "disk0"
image = "$1/disk0.img"
size = $size_bytes
listen = "127.0.0.1:$4"
EOF
}
start_node() {  # start_node a|b LOGFILE
  local cfg=$CFG_A; [ "$1" = b ] && cfg=$CFG_B
  ( cd "$MDIR" && exec "$NBDMIRROR" serve --config "$cfg" "${SERVE_EXTRA[@]}" ) </dev/null >>"$2" 2>&1 &
  PIDS[node-$1]=$!
}

# ---- header and data ----------------------------------------------------------------------
{
  echo "# run-resync.sh run $STAMP"
  echo
  echo "- command: \`${RUN_RESYNC_CMDLINE:-bench/run-resync.sh}\`"
  echo "- effective: \`ROUNDS=$ROUNDS SIZE=$SIZE ($size_bytes bytes) DIRTY_PCT=$DIRTY_PCT BLOCK=$BLOCK\` → $DIRTY_BLOCKS random blocks, $DIRTY_BYTES bytes dirtied"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- host: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), kernel $(uname -r), load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- network: private namespace (unshare --net), loopback only"
  echo "- repo: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
  echo "- nbdmirror binary: $NBDMIRROR_SRC, built $(date -u -r "$NBDMIRROR_SRC" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$NBDMIRROR" | cut -c1-16), run as a copy"
  echo "- tools: $(nbdcopy --version | head -1), $(fio --version)"
  echo "- data: $SIZE of /dev/urandom in $DATA"
  echo "- nbdcopy source: \`nbdmirror export --read-only --image $DATA --listen 127.0.0.1:10830\`, destination: \`nbdmirror export --image $DST --listen 127.0.0.1:10831\` (new sparse file each time)"
  echo "- pair: configs in $OUTDIR/pair/ (node-a 7821 → NBD 127.0.0.1:10840, node-b 7822 → 10841)"
} >"$OUTDIR/meta.md"
cat "$OUTDIR/meta.md"; echo
mkdir -p "$MDIR" "$OUTDIR/pair"
write_cfg node-a 7821 7822 10840 "$CFG_A"
write_cfg node-b 7822 7821 10841 "$CFG_B"
cp "$CFG_A" "$CFG_B" "$OUTDIR/pair/"
echo "generating $DATA ($SIZE random)"
head -c "$size_bytes" /dev/urandom >"$DATA"

# ---- steps --------------------------------------------------------------------------------
step_nbdcopy() {  # two timed copies, plain and --flush (which goes first alternates by round)
  local rdir=$1 flag t0 label flags=("" --flush)
  ((r % 2)) || flags=(--flush "")
  for flag in "${flags[@]}"; do
    label=nbdcopy${flag:+_flush}
    rm -f "$DST"; truncate -s "$size_bytes" "$DST"
    evict "$DATA"
    "$NBDMIRROR" export --read-only --image "$DATA" --listen 127.0.0.1:10830 </dev/null >>"$rdir/nbdcopy-src.log" 2>&1 &
    PIDS[copy-src]=$!
    "$NBDMIRROR" export --image "$DST" --listen 127.0.0.1:10831 </dev/null >>"$rdir/nbdcopy-dst.log" 2>&1 &
    PIDS[copy-dst]=$!
    wait_nbd nbd://127.0.0.1:10830/ copy-src && wait_nbd nbd://127.0.0.1:10831/ copy-dst \
      || { echo "error: nbdcopy's exports did not come up" >&2; return 1; }
    t0=$(now)
    nbdcopy $flag nbd://127.0.0.1:10830/ nbd://127.0.0.1:10831/ || { echo "error: nbdcopy failed" >&2; return 1; }
    echo "${label}_seconds $(since "$t0") s" >>"$RES"
    stop_one copy-src; stop_one copy-dst
    echo "    $label: $(grep "^${label}_seconds" "$RES" | cut -d' ' -f2) s"
  done
  if ! cmp -s "$DATA" "$DST"; then echo "error: nbdcopy's copy differs from the data" >&2; return 1; fi
}

step_full() {
  local rdir=$1 out t0 st lt done0
  rm -rf "$MDIR/node-a" "$MDIR/node-b"; mkdir -p "$MDIR/node-a" "$MDIR/node-b"
  cp "$DATA" "$IMG_A"; evict "$IMG_A"
  start_node a "$rdir/node-a.log"; start_node b "$rdir/node-b.log"
  out=$("${WAIT[@]}" "$CFG_A" --timeout "$SYNC_TIMEOUT" peer=connected) || { echo "error: no peer: $out" >&2; return 1; }
  echo "full_setup_connected_seconds $(field elapsed "$out") s" >>"$RES"
  field status "$out" >"$rdir/status-full-before.json"
  done0=$(log_done_count "$rdir/node-a.log")
  t0=$(now)
  if ! "$NBDMIRROR" promote disk0 --config "$CFG_A" >"$rdir/promote.txt" 2>&1; then
    echo "note promote refused without --force: $(tr '\n' ' ' <"$rdir/promote.txt")" >>"$RES"
    "$NBDMIRROR" promote disk0 --config "$CFG_A" --force >>"$rdir/promote.txt" 2>&1 || { cat "$rdir/promote.txt" >&2; return 1; }
  fi
  out=$("${WAIT[@]}" "$CFG_A" --since "$t0" --timeout "$SYNC_TIMEOUT" "${LOG_WAIT[@]}" "$rdir/node-a.log" \
    --log-count $((done0 + 1)) role=primary peer=connected sync=in-sync) \
    || { echo "error: full sync never finished: $out" >&2; return 1; }
  st=$(field status "$out"); echo "$st" >"$rdir/status-full-after.json"
  echo "full_sync_poll_seconds $(field elapsed "$out") s" >>"$RES"
  lt=$(python3 "$HERE/mirror-log-times.py" "$rdir/node-a.log" "$t0")
  if [ -n "$(field log_resync_complete "$lt")" ]; then
    echo "full_sync_seconds $(field log_resync_complete "$lt") s" >>"$RES"
    echo "full_resync_took_seconds $(field log_resync_took "$lt") s" >>"$RES"
  else
    echo "note full sync: no resync lines in node-a's log, polling clock used" >>"$RES"
    echo "full_sync_seconds $(field elapsed "$out") s" >>"$RES"
  fi
  echo "full_resync_bytes_sent $(jget resync_bytes_sent "$st") bytes" >>"$RES"
  [ "$(jget resync_bytes_sent "$st")" != 0 ] || echo "note full sync reported in-sync with resync_bytes_sent 0" >>"$RES"
  echo "full_status_polls $(field polls "$out") n" >>"$RES"
  "$NBDMIRROR" status --config "$CFG_B" --json >"$rdir/status-full-after-b.json" 2>&1 || true
  echo "    full sync: $(grep '^full_sync_seconds' "$RES" | cut -d' ' -f2) s (poll clock $(field elapsed "$out") s), resync_bytes_sent $(jget resync_bytes_sent "$st")"
}

step_dirty() {
  local rdir=$1 out t0 st sent0 lt done0
  sent0=$(jget resync_bytes_sent "$(cat "$rdir/status-full-after.json")")
  stop_one node-b
  out=$("${WAIT[@]}" "$CFG_A" --timeout "$SYNC_TIMEOUT" peer=disconnected) || { echo "error: node-a never noticed node-b left: $out" >&2; return 1; }
  echo "dirty_peer_gone_seconds $(field elapsed "$out") s" >>"$RES"
  # each block once (fio's random map), random offsets aligned to BLOCK, random data
  fio --name=dirty --ioengine=nbd --uri="$URI_A" --rw=randwrite --bs="$block_bytes" \
    --io_size="$DIRTY_BYTES" --randrepeat=0 --iodepth=8 --output-format=json \
    --output="$rdir/fio-dirty.json" >/dev/null 2>"$rdir/fio-dirty.err" || { cat "$rdir/fio-dirty.err" >&2; return 1; }
  st=$("$NBDMIRROR" status --config "$CFG_A" --json); echo "$st" >"$rdir/status-dirty-before.json"
  echo "dirty_written_bytes $DIRTY_BYTES bytes" >>"$RES"
  echo "dirty_bytes_reported $(jget dirty_bytes "$st") bytes" >>"$RES"
  evict "$IMG_A"; evict "$IMG_B"
  done0=$(log_done_count "$rdir/node-a.log")
  t0=$(now)
  start_node b "$rdir/node-b.log"
  # resync_bytes_sent must have moved: an in-sync answer from before the resync started (stale
  # state right after reconnection) must not stop the clock
  out=$("${WAIT[@]}" "$CFG_A" --since "$t0" --timeout "$SYNC_TIMEOUT" "${LOG_WAIT[@]}" "$rdir/node-a.log" \
    --log-count $((done0 + 1)) peer=connected sync=in-sync role=primary \
    "resync_bytes_sent>=$((sent0 + 1))") || { echo "error: resync never finished: $out" >&2; return 1; }
  st=$(field status "$out"); echo "$st" >"$rdir/status-dirty-after.json"
  echo "dirty_resync_poll_seconds $(field elapsed "$out") s" >>"$RES"
  lt=$(python3 "$HERE/mirror-log-times.py" "$rdir/node-a.log" "$t0")
  if [ -n "$(field log_resync_complete "$lt")" ] && [ -n "$(field log_peer_connected "$lt")" ]; then
    echo "dirty_resync_seconds $(field log_resync_complete "$lt") s" >>"$RES"
    echo "dirty_connected_seconds $(field log_peer_connected "$lt") s" >>"$RES"
    echo "dirty_resync_after_connect_seconds $(awk -v a="$(field log_peer_connected "$lt")" -v b="$(field log_resync_complete "$lt")" 'BEGIN { printf "%.3f", b - a }') s" >>"$RES"
    echo "dirty_resync_took_seconds $(field log_resync_took "$lt") s" >>"$RES"
  else
    echo "note 1% resync: no connect/resync lines in node-a's log, polling clock used" >>"$RES"
    echo "dirty_resync_seconds $(field elapsed "$out") s" >>"$RES"
  fi
  echo "dirty_resync_bytes_sent $(( $(jget resync_bytes_sent "$st") - sent0 )) bytes" >>"$RES"
  echo "dirty_status_polls $(field polls "$out") n" >>"$RES"
  "$NBDMIRROR" status --config "$CFG_B" --json >"$rdir/status-dirty-after-b.json" 2>&1 || true
  echo "    1% resync: $(grep '^dirty_resync_seconds' "$RES" | cut -d' ' -f2) s from node-b's start (connected at $(field log_peer_connected "$lt") s; poll clock $(field elapsed "$out") s), $(grep '^dirty_resync_bytes_sent' "$RES" | cut -d' ' -f2) bytes sent, dirty_bytes was $(grep '^dirty_bytes_reported' "$RES" | cut -d' ' -f2)"
}

step_check() {
  stop_one node-a; stop_one node-b
  if cmp -s "$IMG_A" "$IMG_B"; then echo "images_identical 1 flag" >>"$RES"; echo "    images identical"
  else
    echo "images_identical 0 flag" >>"$RES"
    echo "error: node-a's and node-b's images differ after resync: $(cmp "$IMG_A" "$IMG_B" 2>&1 | head -1)" >&2; return 1
  fi
}

FAILED=0
for ((r = 1; r <= ROUNDS; r++)); do
  rdir="$OUTDIR/round$r"; mkdir -p "$rdir"; RES="$rdir/results.txt"; : >"$RES"
  if ((r % 2)); then order=(nbdcopy pair); else order=(pair nbdcopy); fi
  echo "=== round $r/$ROUNDS: ${order[*]} ($(date -u +%H:%M:%S))"
  echo "- round $r order: ${order[*]}, load average $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUTDIR/meta.md"
  for step in "${order[@]}"; do
    [[ " $STEPS " == *" $step "* ]] || continue
    if [ "$step" = nbdcopy ]; then
      step_nbdcopy "$rdir" || { FAILED=1; echo "note round failed in step nbdcopy (see stderr)" >>"$RES"; stop_all; }
    else
      if step_full "$rdir" && step_dirty "$rdir" && step_check; then :; else
        FAILED=1; echo "note round failed in step pair (see stderr)" >>"$RES"; stop_all
      fi
    fi
  done
done
echo "- load average at end $(cut -d' ' -f1-3 /proc/loadavg), finished $(date -u '+%H:%M:%S UTC')" >>"$OUTDIR/meta.md"

python3 "$HERE/summarize-resync.py" "$OUTDIR" >"$OUTDIR/summary.md"
echo; cat "$OUTDIR/summary.md"; echo; echo "summary: $OUTDIR/summary.md"
exit "$FAILED"
