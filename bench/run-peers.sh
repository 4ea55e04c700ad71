#!/usr/bin/env bash
# bench/run-peers.sh: nbdmirror against its peer NBD servers, same fio battery, interleaved rounds.
#
# Runs bench/bench-nbd.sh (fio's nbd engine; copied from /work/shared/bench, see its header)
# against, in every round:
#   nbdmirror    target/release/nbdmirror export --image IMG --listen 127.0.0.1:10809
#                (default I/O engine: io_uring when available; extra flags via NBDMIRROR_ARGS)
#   qemu-nbd     qemu-nbd -f raw --cache=none --aio=io_uring -b 127.0.0.1 -p 10901 -x '' -t -e 16 IMG
#   nbdkit-file  nbdkit -f -i 127.0.0.1 -p 10903 file file=IMG      (page cache)
#   nbdkit-null  nbdkit -f -i 127.0.0.1 -p 10906 null 1G            (protocol ceiling, no disk)
# Every IMG is a 1 GiB fully allocated raw file (qemu-img create -f raw -o preallocation=full),
# created once per invocation and reused by every round.
#
# Usage (from anywhere; build first with `cargo build --release -p nbdmirror`):
#   bench/run-peers.sh
#   ROUNDS=1 RUNTIME=3 bench/run-peers.sh                 # quick check
#   SERVERS="nbdmirror nbdkit-file" TESTS="randwrite_4k_qd1" bench/run-peers.sh
#
# Environment knobs:
#   ROUNDS=3        interleaved rounds; round r starts with the r-th server of SERVERS
#                   (the order rotates so no server always runs first or last)
#   RUNTIME=6       measured seconds per fio test          RAMP=1  ramp seconds per test
#   TESTS="..."     subset of the battery (default: the 9 tests below)
#   SERVERS="..."   subset of: nbdmirror qemu-nbd nbdkit-file nbdkit-null (default: all four)
#   OUTDIR=         results folder (default: bench/results-YYYYmmdd-HHMMSS in the repo); must be
#                   new or empty
#   IMGDIR=         where the images go (default: a fresh folder under ${TMPDIR:-/var/tmp},
#                   deleted at the end unless KEEP_IMAGES=1)
#   CACHE=cold      before each server's turn, write back and evict its image from the page
#                   cache (dd ... nocache, only that file), so every page-cache server starts
#                   every turn in the same state; CACHE=keep leaves the page cache alone
#   NBDMIRROR=      binary (default: target/release/nbdmirror in this repo; never built here).
#                   It is copied next to the images at start and the copy is what runs, so a
#                   rebuild during the run cannot mix two binaries in one result set
#   NBDMIRROR_ARGS= extra arguments for `nbdmirror export`, e.g. "--io-engine sync"
#
# Network isolation: the script re-executes itself under `unshare --net` (a private network
# namespace with only `lo`, brought up here), so the fixed ports above never touch the host's
# ports and never collide with anyone else's listeners. It stays the parent of every server it
# starts (nbdkit started from a shell that has exited quits after its first client) and stops
# each one (SIGTERM, then wait; SIGKILL only after 30 s) at the end of its turn.
#
# Output in OUTDIR:
#   meta.md                      command line, date, CPUs, kernel, versions, exact server commands
#   roundN/SERVER.txt            the battery's `name value unit` lines for that round
#   roundN/SERVER.err            the battery's stderr;   roundN/SERVER.log   the server's log
#   roundN/SERVER.turn           load average before/after, server exit status, stop time
#   roundN/fio/SERVER/TEST.json  raw fio JSON
#   summary.md                   medians over rounds and nbdmirror/best-peer ratios
#                                (bench/summarize-peers.py, python3 stdlib only)
# Exit status: 0 if every server started and every test produced figures, 1 otherwise.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
KNOBS="ROUNDS RUNTIME RAMP TESTS SERVERS OUTDIR IMGDIR CACHE KEEP_IMAGES NBDMIRROR NBDMIRROR_ARGS"

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "run-peers.sh takes no arguments (knobs are environment variables; see --help)" >&2; exit 2 ;;
esac

# ---- 1. private network namespace ---------------------------------------------------------
# The marker holds our PID: `exec unshare` (no --fork) keeps the PID, so only the process that
# made the namespace sees its own PID there; a child run-peers.sh would unshare again.
if [ "${RUN_PEERS_NETNS:-}" != "$$" ]; then
  cmd=""
  for k in $KNOBS; do
    if [ -n "${!k+x}" ]; then cmd+="$k=$(printf '%q' "${!k}") "; fi
  done
  cmd+=$(printf '%q' "$0")
  export RUN_PEERS_CMDLINE="$cmd" RUN_PEERS_NETNS=$$
  userns=(); [ "$(id -u)" -eq 0 ] || userns=(--map-root-user)
  exec unshare --net "${userns[@]}" -- bash "$SELF"
fi
ip link set lo up
if [ -r /proc/1/ns/net ] && [ "$(readlink /proc/self/ns/net)" = "$(readlink /proc/1/ns/net)" ]; then
  echo "error: still in PID 1's network namespace after unshare --net" >&2; exit 2
fi

# ---- 2. settings and checks ---------------------------------------------------------------
ALL_TESTS="randread_4k_qd1 randwrite_4k_qd1 randwrite_4k_qd1_flush randread_4k_qd32 randwrite_4k_qd32 randread_4k_mc4x8 randwrite_4k_mc4x8 seqread_1m_qd8 seqwrite_1m_qd8"
ALL_SERVERS="nbdmirror qemu-nbd nbdkit-file nbdkit-null"
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-6}
RAMP=${RAMP:-1}
TESTS=${TESTS:-$ALL_TESTS}
SERVERS=${SERVERS:-$ALL_SERVERS}
CACHE=${CACHE:-cold}
KEEP_IMAGES=${KEEP_IMAGES:-0}
NBDMIRROR=${NBDMIRROR:-$REPO/target/release/nbdmirror}
NBDMIRROR_ARGS=${NBDMIRROR_ARGS:-}
STAMP=$(date +%Y%m%d-%H%M%S)
OUTDIR=${OUTDIR:-$REPO/bench/results-$STAMP}
IMG_SIZE=1G

die() { echo "error: $*" >&2; exit 2; }
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer (seconds)"
[[ "$RAMP" =~ ^[0-9]+$ ]] || die "RAMP must be a non-negative integer (seconds)"
case "$CACHE" in cold|keep) ;; *) die "CACHE must be cold or keep" ;; esac
for s in $SERVERS; do [[ " $ALL_SERVERS " == *" $s "* ]] || die "unknown server '$s' (known: $ALL_SERVERS)"; done
for t in $TESTS; do [[ " $ALL_TESTS " == *" $t "* ]] || die "unknown test '$t' (known: $ALL_TESTS)"; done
read -r -a SERVER_LIST <<<"$SERVERS"
[ "${#SERVER_LIST[@]}" -gt 0 ] || die "SERVERS is empty"
read -r -a NBDMIRROR_EXTRA <<<"$NBDMIRROR_ARGS"
for tool in fio qemu-img qemu-nbd nbdkit nbdinfo python3 dd ip; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
if [[ " $SERVERS " == *" nbdmirror "* ]] && [ ! -x "$NBDMIRROR" ]; then
  die "$NBDMIRROR missing: run 'cargo build --release -p nbdmirror' first (this script builds nothing)"
fi
if [ -d "$OUTDIR" ] && [ -n "$(ls -A "$OUTDIR")" ]; then die "OUTDIR $OUTDIR exists and is not empty"; fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if [ -z "${IMGDIR:-}" ]; then
  IMGDIR=$(mktemp -d "${TMPDIR:-/var/tmp}/nbdmirror-bench.XXXXXX"); OWN_IMGDIR=1
else
  mkdir -p "$IMGDIR"; OWN_IMGDIR=0
fi

# Run a private copy of the binary: target/release/nbdmirror may be rebuilt while we run (other
# work in the same tree), and one run must measure one binary.
NBDMIRROR_SRC=$NBDMIRROR
if [[ " $SERVERS " == *" nbdmirror "* ]]; then
  NBDMIRROR="$IMGDIR/nbdmirror.bin"
  cp "$NBDMIRROR_SRC" "$NBDMIRROR"
fi

port_of() {
  case "$1" in nbdmirror) echo 10809 ;; qemu-nbd) echo 10901 ;; nbdkit-file) echo 10903 ;; nbdkit-null) echo 10906 ;; esac
}
uri_of() { echo "nbd://127.0.0.1:$(port_of "$1")/"; }
img_of() { case "$1" in nbdkit-null) echo "" ;; *) echo "$IMGDIR/$1.raw" ;; esac; }
# server_cmd SERVER: sets the array CMD to the exact command line of that server.
server_cmd() {
  local port; port=$(port_of "$1")
  case "$1" in
    nbdmirror)   CMD=("$NBDMIRROR" export --image "$(img_of "$1")" --listen "127.0.0.1:$port" "${NBDMIRROR_EXTRA[@]}") ;;
    qemu-nbd)    CMD=(qemu-nbd -f raw --cache=none --aio=io_uring -b 127.0.0.1 -p "$port" -x '' -t -e 16 "$(img_of "$1")") ;;
    nbdkit-file) CMD=(nbdkit -f -i 127.0.0.1 -p "$port" file "file=$(img_of "$1")") ;;
    nbdkit-null) CMD=(nbdkit -f -i 127.0.0.1 -p "$port" null "$IMG_SIZE") ;;
  esac
}
quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

# ---- 3. cleanup: stop what we started, delete the images -----------------------------------
SPID=""
stop_server() {  # stop_server NAME TURNFILE: SIGTERM, wait (<= 30 s), SIGKILL as a last resort
  local pid=$SPID rc=0 t0 t1 killed=0
  [ -n "$pid" ] || return 0
  t0=$(date +%s.%N)
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; killed=1; fi
  wait "$pid" 2>/dev/null || rc=$?
  t1=$(date +%s.%N)
  SPID=""
  if [ -n "${2:-}" ]; then
    printf 'server_exit_status %s\nserver_sigkilled %s\nserver_stop_seconds %.2f\n' \
      "$rc" "$killed" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" >>"$2"
  fi
  [ "$killed" -eq 0 ] || echo "warning: $1 ignored SIGTERM for 30 s, killed" >&2
}
BPID=""
cleanup() {
  local rc=$?
  if [ -n "$BPID" ]; then  # an interrupted battery: its fio first, then the battery itself
    pkill -TERM -P "$BPID" 2>/dev/null || true
    kill -TERM "$BPID" 2>/dev/null || true
    wait "$BPID" 2>/dev/null || true
  fi
  if [ -n "$SPID" ]; then stop_server "(interrupted)" ""; fi
  if [ "$KEEP_IMAGES" != 1 ]; then
    for s in $ALL_SERVERS; do [ -z "$(img_of "$s")" ] || rm -f "$(img_of "$s")"; done
    rm -f "$IMGDIR/nbdmirror.bin"
    [ "$OWN_IMGDIR" != 1 ] || rmdir "$IMGDIR" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- 4. header: command line, machine, versions ------------------------------------------
{
  echo "# run-peers.sh run $STAMP"
  echo
  echo "- command: \`${RUN_PEERS_CMDLINE:-bench/run-peers.sh}\`"
  echo "- effective: \`ROUNDS=$ROUNDS RUNTIME=$RUNTIME RAMP=$RAMP CACHE=$CACHE SERVERS='$SERVERS' TESTS='$TESTS'\`"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- host: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r), load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- network: private namespace (unshare --net), loopback only"
  echo "- repo: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
  if [[ " $SERVERS " == *" nbdmirror "* ]]; then
    echo "- nbdmirror binary: $NBDMIRROR_SRC, built $(date -u -r "$NBDMIRROR_SRC" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$NBDMIRROR" | cut -c1-16), copied to $NBDMIRROR at start; every round runs that copy"
  fi
  echo "- tools: $(fio --version), $(qemu-nbd --version | head -1), $(nbdkit --version | head -1), $(qemu-img --version | head -1 | cut -d' ' -f1-3), python $(python3 -c 'import platform; print(platform.python_version())')"
  echo "- images: $IMG_SIZE raw, \`qemu-img create -f raw -o preallocation=full\`, in $IMGDIR; page cache before each turn: $CACHE"
  echo "- battery: bench/bench-nbd.sh (fio nbd engine), $RUNTIME s measured + $RAMP s ramp per test"
  echo "- servers (exact commands):"
  for s in "${SERVER_LIST[@]}"; do server_cmd "$s"; echo "  - $s: \`$(quote "${CMD[@]}")\` → $(uri_of "$s")"; done
} >"$OUTDIR/meta.md"
cat "$OUTDIR/meta.md"
echo

# ---- 5. images ----------------------------------------------------------------------------
for s in "${SERVER_LIST[@]}"; do
  img=$(img_of "$s"); [ -n "$img" ] || continue
  rm -f "$img"
  echo "creating $img ($IMG_SIZE, preallocation=full)"
  qemu-img create -q -f raw -o preallocation=full "$img" "$IMG_SIZE"
done

evict() {  # write back and drop one file's pages from the page cache (that file only)
  dd of="$1" oflag=nocache conv=notrunc,fdatasync count=0 status=none
  dd if="$1" iflag=nocache count=0 status=none
}

# ---- 6. rounds ----------------------------------------------------------------------------
FAILED=0
n=${#SERVER_LIST[@]}
for ((r = 1; r <= ROUNDS; r++)); do
  rdir="$OUTDIR/round$r"; mkdir -p "$rdir"
  order=(); for ((i = 0; i < n; i++)); do order+=("${SERVER_LIST[$(((r - 1 + i) % n))]}"); done
  echo "=== round $r/$ROUNDS: ${order[*]} ($(date -u +%H:%M:%S))"
  echo "- round $r order: ${order[*]}" >>"$OUTDIR/meta.md"
  for s in "${order[@]}"; do
    turn="$rdir/$s.turn"; : >"$turn"
    img=$(img_of "$s")
    if [ -n "$img" ] && [ "$CACHE" = cold ]; then evict "$img"; fi
    server_cmd "$s"
    echo "--- $s: $(quote "${CMD[@]}")"
    "${CMD[@]}" </dev/null >"$rdir/$s.log" 2>&1 &
    SPID=$!
    up=0
    for _ in $(seq 1 300); do
      kill -0 "$SPID" 2>/dev/null || break
      if nbdinfo --size "$(uri_of "$s")" >/dev/null 2>&1; then up=1; break; fi
      sleep 0.1
    done
    if [ "$up" != 1 ]; then
      echo "error: $s did not come up; its log:" >&2; sed 's/^/  /' "$rdir/$s.log" >&2
      echo "server_start_error 1 flag" >"$rdir/$s.txt"
      stop_server "$s" "$turn"; FAILED=1; continue
    fi
    echo "loadavg_before $(cut -d' ' -f1-3 /proc/loadavg)" >>"$turn"
    rc=0
    # In the background plus `wait`, so that SIGINT/SIGTERM reach the traps at once.
    OUTDIR="$rdir/fio/$s" RUNTIME="$RUNTIME" RAMP="$RAMP" TESTS="$TESTS" \
      bash "$HERE/bench-nbd.sh" "$(uri_of "$s")" >"$rdir/$s.txt" 2>"$rdir/$s.err" &
    BPID=$!
    wait "$BPID" || rc=$?
    BPID=""
    echo "loadavg_after $(cut -d' ' -f1-3 /proc/loadavg)" >>"$turn"
    echo "battery_exit_status $rc" >>"$turn"
    sed 's/^/    /' "$rdir/$s.txt"
    if [ "$rc" -ne 0 ] || grep -q '_error ' "$rdir/$s.txt"; then
      echo "warning: $s round $r had errors, see $rdir/$s.err" >&2; FAILED=1
    fi
    if ! kill -0 "$SPID" 2>/dev/null; then
      echo "warning: $s exited during its turn; its log:" >&2; sed 's/^/  /' "$rdir/$s.log" >&2; FAILED=1
    fi
    stop_server "$s" "$turn"
    if [ "$s" = nbdmirror ]; then  # which disk I/O engine it actually used
      echo "note engine=$(sed -n 's/.*image opened.* engine="\{0,1\}\([a-z_]*\).*/\1/p' "$rdir/$s.log" | head -1)" >>"$turn"
    fi
  done
done
echo "- load average at end $(cut -d' ' -f1-3 /proc/loadavg), finished $(date -u '+%H:%M:%S UTC')" >>"$OUTDIR/meta.md"

# ---- 7. summary ---------------------------------------------------------------------------
python3 "$HERE/summarize-peers.py" "$OUTDIR" >"$OUTDIR/summary.md"
echo
cat "$OUTDIR/summary.md"
echo
echo "summary: $OUTDIR/summary.md"
exit "$FAILED"
