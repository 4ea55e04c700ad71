#!/usr/bin/env bash
# bench/run-mirror.sh: the mirrored export against the unmirrored export and QEMU's synchronous
# mirror, same fio battery, interleaved rounds, one run (issue 3, "Speed").
#
# Runs bench/bench-nbd.sh (fio's nbd engine; a copy of /work/shared/bench/bench-nbd.sh) with the
# write tests of issue 3 against, in every round:
#   export      nbdmirror export --image IMG --listen 127.0.0.1:10809          (no mirror)
#   qsd-mirror  qemu-storage-daemon exporting IMG (cache.direct=on, io_uring) at 127.0.0.1:10910,
#               blockdev-mirror sync=full copy-mode=write-blocking to a qemu-nbd peer
#               (qemu-nbd --cache=none --aio=io_uring, 127.0.0.1:10911) serving PEER.raw; the
#               recipe of /work/shared/bench/servers.sh `start qsd_mirror`, with our own ports,
#               paths and PIDs. Each turn waits for BLOCK_JOB_READY (initial copy done) first.
#   mirror      two `nbdmirror serve --config` daemons on loopback (node-a: replication
#               127.0.0.1:7801, NBD 127.0.0.1:10820; node-b: 7802, NBD 10821), one 1 GiB volume
#               `disk0`; each turn starts both, waits for peer=connected, promotes node-a
#               (`nbdmirror promote disk0 --config node-a.toml`; the first promotion of the run
#               retries with --force when refused), waits for sync=in-sync, then runs the battery
#               against nbd://127.0.0.1:10820/disk0. The pair's state (images, metadata) is kept
#               across rounds, as a real pair would; each turn ends with SIGTERM to node-a, then
#               node-b. Enabled by default only when `nbdmirror serve --help` works.
# The pair and the qsd mirror each do their initial copy at start-up, before any test; every
# server's image(s) are evicted from the page cache before it starts.
# Every image is a 1 GiB fully allocated raw file (qemu-img create -f raw -o preallocation=full),
# created once per invocation and reused by every round (the mirror's two images included).
#
# Usage (from anywhere; build first with `cargo build --release -p nbdmirror`):
#   bench/run-mirror.sh
#   ROUNDS=1 RUNTIME=3 bench/run-mirror.sh                          # quick check
#   SERVERS="export mirror" TESTS="randwrite_4k_qd1" bench/run-mirror.sh
#
# Environment knobs:
#   ROUNDS=3        interleaved rounds; round r starts with the r-th server of SERVERS
#   INTERLEAVE=test test: every round starts all servers at once (distinct ports; idle ones
#                   cost next to nothing), then runs each test against every server back to
#                   back, the order rotating from test to test, so the figures a ratio compares
#                   are taken ~RUNTIME s apart, not a whole battery apart (this 2-core machine's
#                   background load changes within a minute). server: one server at a time,
#                   the whole battery, as run-peers.sh does
#   RUNTIME=6       measured seconds per fio test          RAMP=1  ramp seconds per test
#   TESTS="..."     subset of bench-nbd.sh's tests (default: the 4 figures of issue 3:
#                   randwrite_4k_qd1 randwrite_4k_qd1_flush randwrite_4k_qd32 seqwrite_1m_qd8)
#   SERVERS="..."   subset of: export qsd-mirror mirror (default: all three; mirror only when the
#                   binary has `serve`)
#   OUTDIR=         results folder (default: bench/results-mirror-YYYYmmdd-HHMMSS); new or empty
#   IMGDIR=         where images and the pair's state go (default: a fresh folder under
#                   ${TMPDIR:-/var/tmp}, deleted at the end unless KEEP_IMAGES=1)
#   CACHE=cold      before each turn, write back and evict that server's image(s) from the page
#                   cache (dd ... nocache, only those files); CACHE=keep leaves it alone
#   NBDMIRROR=      binary (default: target/release/nbdmirror in this repo; never built here).
#                   Copied next to the images at start; every round runs that copy
#   NBDMIRROR_ARGS= extra arguments for `nbdmirror export`   SERVE_ARGS= for `nbdmirror serve`
#   MIRROR_EXTRA_TOML=  extra top-level TOML lines for both nodes' configs (e.g. 'peer_timeout = "2s"')
#   SYNC_TIMEOUT=600    seconds to wait for peer=connected and for sync=in-sync
#
# Network isolation: re-executes itself under `unshare --net` (a private network namespace with
# only `lo`), so the fixed ports above never touch the host's. It stays the parent of every
# server and stops each one (SIGTERM, wait; SIGKILL only after 30 s) at the end of its round
# (INTERLEAVE=test) or turn (server).
#
# Output in OUTDIR:
#   meta.md                     command line, date, CPUs, kernel, versions, exact server commands
#   roundN/SERVER.txt           the battery's `name value unit` lines for that round, plus
#                               TEST_server_cpu_per_io (per_mib for 1 MiB writes): CPU time of
#                               the server's processes per I/O, in us (INTERLEAVE=test only)
#   roundN/SERVER.err           the battery's stderr;  roundN/SERVER*.log  the server logs
#   roundN/SERVER.turn          load average around each test, set-up timings (mirror: connect/
#                               promote/in-sync seconds and status JSON before and after), exit
#                               status, stop time
#   roundN/fio/SERVER/TEST.json raw fio JSON
#   mirror/                     the pair's configs
#   summary.md                  medians and per-round ratios against the issue's goals
#                               (bench/summarize-mirror.py, python3 stdlib only)
# Exit status: 0 if every server started and every test produced figures, 1 otherwise.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
KNOBS="INTERLEAVE ROUNDS RUNTIME RAMP TESTS SERVERS OUTDIR IMGDIR CACHE KEEP_IMAGES NBDMIRROR NBDMIRROR_ARGS SERVE_ARGS MIRROR_EXTRA_TOML SYNC_TIMEOUT"

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "run-mirror.sh takes no arguments (knobs are environment variables; see --help)" >&2; exit 2 ;;
esac

# ---- 1. private network namespace ---------------------------------------------------------
if [ "${RUN_MIRROR_NETNS:-}" != "$$" ]; then
  cmd=""
  for k in $KNOBS; do
    if [ -n "${!k+x}" ]; then cmd+="$k=$(printf '%q' "${!k}") "; fi
  done
  cmd+=$(printf '%q' "$0")
  export RUN_MIRROR_CMDLINE="$cmd" RUN_MIRROR_NETNS=$$
  userns=(); [ "$(id -u)" -eq 0 ] || userns=(--map-root-user)
  exec unshare --net "${userns[@]}" -- bash "$SELF"
fi
ip link set lo up
if [ -r /proc/1/ns/net ] && [ "$(readlink /proc/self/ns/net)" = "$(readlink /proc/1/ns/net)" ]; then
  echo "error: still in PID 1's network namespace after unshare --net" >&2; exit 2
fi

# ---- 2. settings and checks ---------------------------------------------------------------
ALL_TESTS="randread_4k_qd1 randwrite_4k_qd1 randwrite_4k_qd1_flush randread_4k_qd32 randwrite_4k_qd32 randread_4k_mc4x8 randwrite_4k_mc4x8 seqread_1m_qd8 seqwrite_1m_qd8"
DEFAULT_TESTS="randwrite_4k_qd1 randwrite_4k_qd1_flush randwrite_4k_qd32 seqwrite_1m_qd8"
ALL_SERVERS="export qsd-mirror mirror"
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-6}
RAMP=${RAMP:-1}
TESTS=${TESTS:-$DEFAULT_TESTS}
CACHE=${CACHE:-cold}
INTERLEAVE=${INTERLEAVE:-test}
KEEP_IMAGES=${KEEP_IMAGES:-0}
NBDMIRROR=${NBDMIRROR:-$REPO/target/release/nbdmirror}
NBDMIRROR_ARGS=${NBDMIRROR_ARGS:-}
SERVE_ARGS=${SERVE_ARGS:-}
MIRROR_EXTRA_TOML=${MIRROR_EXTRA_TOML:-}
SYNC_TIMEOUT=${SYNC_TIMEOUT:-600}
STAMP=$(date +%Y%m%d-%H%M%S)
OUTDIR=${OUTDIR:-$REPO/bench/results-mirror-$STAMP}
IMG_SIZE=1G
QMP_PY=$HERE/qmp.py  # see below: servers.sh's QMP client, copied in at run time if absent

die() { echo "error: $*" >&2; exit 2; }
[ -x "$NBDMIRROR" ] || die "$NBDMIRROR missing: run 'cargo build --release -p nbdmirror' first (this script builds nothing)"
HAVE_SERVE=0
if "$NBDMIRROR" serve --help >/dev/null 2>&1; then HAVE_SERVE=1; fi
if [ -z "${SERVERS:-}" ]; then
  if [ "$HAVE_SERVE" = 1 ]; then SERVERS=$ALL_SERVERS; else
    SERVERS="export qsd-mirror"
    echo "note: $NBDMIRROR has no 'serve' subcommand yet: the mirrored pair is skipped" >&2
  fi
fi
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer (seconds)"
[[ "$RAMP" =~ ^[0-9]+$ ]] || die "RAMP must be a non-negative integer (seconds)"
case "$CACHE" in cold|keep) ;; *) die "CACHE must be cold or keep" ;; esac
case "$INTERLEAVE" in test|server) ;; *) die "INTERLEAVE must be test or server" ;; esac
for s in $SERVERS; do [[ " $ALL_SERVERS " == *" $s "* ]] || die "unknown server '$s' (known: $ALL_SERVERS)"; done
for t in $TESTS; do [[ " $ALL_TESTS " == *" $t "* ]] || die "unknown test '$t' (known: $ALL_TESTS)"; done
if [[ " $SERVERS " == *" mirror "* ]] && [ "$HAVE_SERVE" != 1 ]; then die "SERVERS has mirror but '$NBDMIRROR serve --help' fails"; fi
read -r -a SERVER_LIST <<<"$SERVERS"
[ "${#SERVER_LIST[@]}" -gt 0 ] || die "SERVERS is empty"
read -r -a NBDMIRROR_EXTRA <<<"$NBDMIRROR_ARGS"
read -r -a SERVE_EXTRA <<<"$SERVE_ARGS"
for tool in fio qemu-img qemu-nbd qemu-storage-daemon nbdinfo python3 dd ip; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
if [ -d "$OUTDIR" ] && [ -n "$(ls -A "$OUTDIR")" ]; then die "OUTDIR $OUTDIR exists and is not empty"; fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if [ -z "${IMGDIR:-}" ]; then
  IMGDIR=$(mktemp -d "${TMPDIR:-/var/tmp}/nbdmirror-mbench.XXXXXX"); OWN_IMGDIR=1
else
  mkdir -p "$IMGDIR"; OWN_IMGDIR=0
fi
IMGDIR=$(cd "$IMGDIR" && pwd)
[ -f "$QMP_PY" ] || QMP_PY=/work/shared/bench/qmp.py
[ -f "$QMP_PY" ] || die "no QMP client: neither bench/qmp.py nor /work/shared/bench/qmp.py"

NBDMIRROR_SRC=$NBDMIRROR
NBDMIRROR="$IMGDIR/nbdmirror.bin"
cp "$NBDMIRROR_SRC" "$NBDMIRROR"

# ---- servers ------------------------------------------------------------------------------
MDIR="$IMGDIR/mirror"               # the pair's state: configs, data dirs, images
CFG_A="$MDIR/node-a.toml"; CFG_B="$MDIR/node-b.toml"
QSD_QMP="$IMGDIR/qsd.qmp"
port_of() { case "$1" in export) echo 10809 ;; qsd-mirror) echo 10910 ;; mirror) echo 10820 ;; esac; }
uri_of() {
  case "$1" in
    export) echo "nbd://127.0.0.1:10809/" ;;
    qsd-mirror) echo "nbd://127.0.0.1:10910/disk" ;;
    mirror) echo "nbd://127.0.0.1:10820/disk0" ;;
  esac
}
imgs_of() {
  case "$1" in
    export) echo "$IMGDIR/export.raw" ;;
    qsd-mirror) echo "$IMGDIR/qsd-src.raw $IMGDIR/qsd-peer.raw" ;;
    mirror) echo "$MDIR/node-a/disk0.img $MDIR/node-b/disk0.img" ;;
  esac
}
write_node_cfg() {  # write_node_cfg NODE REPL_PORT PEER_PORT NBD_PORT FILE
  cat >"$5" <<EOF
# written by bench/run-mirror.sh
node = "$1"
data_dir = "$1"
secret = "run-mirror-bench-secret-loopback-only"
replication_listen = "127.0.0.1:$2"
peer = "127.0.0.1:$3"
$MIRROR_EXTRA_TOML

[[volume]]
name = "disk0"
image = "$1/disk0.img"
size = "$IMG_SIZE"
listen = "127.0.0.1:$4"
EOF
}
quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }
describe_server() {
  case "$1" in
    export) quote "$NBDMIRROR" export --image "$IMGDIR/export.raw" --listen 127.0.0.1:10809 "${NBDMIRROR_EXTRA[@]}" ;;
    qsd-mirror)
      echo "$(quote qemu-nbd -f raw --cache=none --aio=io_uring -b 127.0.0.1 -p 10911 -x '' -t -e 4 "$IMGDIR/qsd-peer.raw")\` + \`$(quote qemu-storage-daemon "${QSD_ARGS[@]}")\` + QMP \`$QSD_ADD\` + \`$QSD_MIRROR" ;;
    mirror)
      echo "$(quote "$NBDMIRROR" serve --config "$CFG_A" "${SERVE_EXTRA[@]}")\` and \`$(quote "$NBDMIRROR" serve --config "$CFG_B" "${SERVE_EXTRA[@]}")\`, then \`$(quote "$NBDMIRROR" promote disk0 --config "$CFG_A")" ;;
  esac
}
QSD_ARGS=(
  --blockdev "driver=file,node-name=srcfile,filename=$IMGDIR/qsd-src.raw,cache.direct=on,aio=io_uring"
  --blockdev driver=raw,node-name=src,file=srcfile
  --nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port=10910,max-connections=16
  --export type=nbd,id=exp0,node-name=src,name=disk,writable=on
  --chardev "socket,id=qmp,path=$QSD_QMP,server=on,wait=off"
  --monitor chardev=qmp
)
QSD_ADD='{"execute":"blockdev-add","arguments":{"driver":"nbd","node-name":"peer","server":{"type":"inet","host":"127.0.0.1","port":"10911"},"export":""}}'
QSD_MIRROR='{"execute":"blockdev-mirror","arguments":{"job-id":"m0","device":"src","target":"peer","sync":"full","copy-mode":"write-blocking","filter-node-name":"mtop","auto-finalize":false,"auto-dismiss":false}}'

# ---- 3. cleanup: stop what we started, delete the images -----------------------------------
SPIDS=()     # PIDs of the running servers' processes (SPID_LABELS, SPID_SERVERS alongside)
stop_pid() {  # stop_pid PID LABEL TURNFILE: SIGTERM, wait (<= 30 s), SIGKILL as a last resort
  local pid=$1 rc=0 t0 t1 killed=0
  t0=$(date +%s.%N)
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; killed=1; fi
  wait "$pid" 2>/dev/null || rc=$?
  t1=$(date +%s.%N)
  if [ -n "${3:-}" ]; then
    printf '%s_exit_status %s\n%s_sigkilled %s\n%s_stop_seconds %.2f\n' "$2" "$rc" "$2" "$killed" \
      "$2" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" >>"$3"
  fi
  [ "$killed" -eq 0 ] || echo "warning: $2 ignored SIGTERM for 30 s, killed" >&2
}
stop_server_procs() {  # stop_server_procs SERVER TURNFILE: that server's processes, in start order
  local i keep_p=() keep_l=() keep_s=()
  for i in "${!SPIDS[@]}"; do
    if [ "${SPID_SERVERS[$i]}" = "$1" ]; then stop_pid "${SPIDS[$i]}" "${SPID_LABELS[$i]}" "${2:-}"
    else keep_p+=("${SPIDS[$i]}"); keep_l+=("${SPID_LABELS[$i]}"); keep_s+=("${SPID_SERVERS[$i]}"); fi
  done
  SPIDS=("${keep_p[@]}"); SPID_LABELS=("${keep_l[@]}"); SPID_SERVERS=("${keep_s[@]}")
}
stop_all() {  # every process we started, in start order (interrupted runs)
  local i
  for i in "${!SPIDS[@]}"; do stop_pid "${SPIDS[$i]}" "${SPID_LABELS[$i]}" ""; done
  SPIDS=(); SPID_LABELS=(); SPID_SERVERS=()
}
SPID_LABELS=(); SPID_SERVERS=()
BPID=""
cleanup() {
  local rc=$?
  if [ -n "$BPID" ]; then
    pkill -TERM -P "$BPID" 2>/dev/null || true
    kill -TERM "$BPID" 2>/dev/null || true
    wait "$BPID" 2>/dev/null || true
  fi
  stop_all
  if [ "$KEEP_IMAGES" != 1 ]; then
    for s in $ALL_SERVERS; do for i in $(imgs_of "$s"); do rm -f "$i"; done; done
    rm -rf "$MDIR" "$QSD_QMP"
    rm -f "$IMGDIR/nbdmirror.bin"
    [ "$OWN_IMGDIR" != 1 ] || rmdir "$IMGDIR" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- 4. header ----------------------------------------------------------------------------
{
  echo "# run-mirror.sh run $STAMP"
  echo
  echo "- command: \`${RUN_MIRROR_CMDLINE:-bench/run-mirror.sh}\`"
  echo "- effective: \`INTERLEAVE=$INTERLEAVE ROUNDS=$ROUNDS RUNTIME=$RUNTIME RAMP=$RAMP CACHE=$CACHE SERVERS='$SERVERS' TESTS='$TESTS'\`"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- host: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r), load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- network: private namespace (unshare --net), loopback only"
  echo "- repo: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
  echo "- nbdmirror binary: $NBDMIRROR_SRC, built $(date -u -r "$NBDMIRROR_SRC" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$NBDMIRROR" | cut -c1-16), copied to $NBDMIRROR at start; every round runs that copy; serve: $([ "$HAVE_SERVE" = 1 ] && echo yes || echo 'no (mirror skipped)')"
  echo "- tools: $(fio --version), $(qemu-nbd --version | head -1), $(qemu-storage-daemon --version | head -1), python $(python3 -c 'import platform; print(platform.python_version())')"
  echo "- images: $IMG_SIZE raw, \`qemu-img create -f raw -o preallocation=full\`, in $IMGDIR; page cache before each turn: $CACHE"
  echo "- battery: bench/bench-nbd.sh (fio nbd engine), $RUNTIME s measured + $RAMP s ramp per test"
  echo "- servers (exact commands):"
  for s in "${SERVER_LIST[@]}"; do echo "  - $s: \`$(describe_server "$s")\` → $(uri_of "$s")"; done
} >"$OUTDIR/meta.md"

# ---- 5. images and configs ----------------------------------------------------------------
mkdir -p "$MDIR/node-a" "$MDIR/node-b"
for s in "${SERVER_LIST[@]}"; do
  for img in $(imgs_of "$s"); do
    rm -f "$img"
    echo "creating $img ($IMG_SIZE, preallocation=full)"
    qemu-img create -q -f raw -o preallocation=full "$img" "$IMG_SIZE"
  done
done
if [[ " $SERVERS " == *" mirror "* ]]; then
  write_node_cfg node-a 7801 7802 10820 "$CFG_A"
  write_node_cfg node-b 7802 7801 10821 "$CFG_B"
  mkdir -p "$OUTDIR/mirror"; cp "$CFG_A" "$CFG_B" "$OUTDIR/mirror/"
  { echo "- mirror configs: $OUTDIR/mirror/node-a.toml, node-b.toml (node-a promoted; battery on node-a's export)"; } >>"$OUTDIR/meta.md"
fi
cat "$OUTDIR/meta.md"; echo

evict() {  # write back and drop one file's pages from the page cache (that file only)
  dd of="$1" oflag=nocache conv=notrunc,fdatasync count=0 status=none
  dd if="$1" iflag=nocache count=0 status=none
}
wait_nbd() {  # wait_nbd URI PID: until the export answers (30 s) while PID lives
  for _ in $(seq 1 300); do
    kill -0 "$2" 2>/dev/null || return 1
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
PROMOTED_ONCE=0

# start_server SERVER RDIR TURNFILE: starts it and leaves it ready for the battery; SPIDS set.
start_server() {
  local s=$1 rdir=$2 turn=$3 t0 out base=${#SPIDS[@]}
  case "$s" in
    export)
      "$NBDMIRROR" export --image "$IMGDIR/export.raw" --listen 127.0.0.1:10809 "${NBDMIRROR_EXTRA[@]}" \
        </dev/null >"$rdir/$s.log" 2>&1 &
      SPIDS+=($!); SPID_LABELS+=(export); SPID_SERVERS+=("$s")
      wait_nbd "$(uri_of "$s")" "${SPIDS[$base]}" ;;
    qsd-mirror)
      rm -f "$QSD_QMP"
      # the peer first: qemu-storage-daemon is stopped before it (SPIDS order)
      qemu-nbd -f raw --cache=none --aio=io_uring -b 127.0.0.1 -p 10911 -x '' -t -e 4 "$IMGDIR/qsd-peer.raw" \
        </dev/null >"$rdir/$s.peer.log" 2>&1 &
      local ppid=$!
      qemu-storage-daemon "${QSD_ARGS[@]}" </dev/null >"$rdir/$s.log" 2>&1 &
      SPIDS+=($!); SPID_LABELS+=(qsd); SPID_SERVERS+=("$s")
      SPIDS+=("$ppid"); SPID_LABELS+=(peer); SPID_SERVERS+=("$s")
      wait_nbd nbd://127.0.0.1:10911/ "$ppid" || return 1
      for _ in $(seq 1 100); do [ -S "$QSD_QMP" ] && break; sleep 0.1; done
      python3 "$QMP_PY" "$QSD_QMP" "$QSD_ADD" >>"$rdir/$s.log" || return 1
      t0=$(date +%s.%N)
      python3 "$QMP_PY" "$QSD_QMP" "$QSD_MIRROR" --wait-event BLOCK_JOB_READY --timeout "$SYNC_TIMEOUT" \
        >"$rdir/$s.mirror-start.qmp" || { cat "$rdir/$s.mirror-start.qmp" >&2; return 1; }
      echo "setup_initial_sync_seconds $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')" >>"$turn"
      wait_nbd "$(uri_of "$s")" "${SPIDS[$base]}" ;;
    mirror)
      ( cd "$MDIR" && exec "$NBDMIRROR" serve --config "$CFG_A" "${SERVE_EXTRA[@]}" ) </dev/null >"$rdir/$s.node-a.log" 2>&1 &
      SPIDS+=($!); SPID_LABELS+=(node_a); SPID_SERVERS+=("$s")
      ( cd "$MDIR" && exec "$NBDMIRROR" serve --config "$CFG_B" "${SERVE_EXTRA[@]}" ) </dev/null >"$rdir/$s.node-b.log" 2>&1 &
      SPIDS+=($!); SPID_LABELS+=(node_b); SPID_SERVERS+=("$s")
      t0=$(date +%s.%N)
      out=$(python3 "$HERE/mirror-wait.py" "$NBDMIRROR" "$CFG_A" --since "$t0" --timeout "$SYNC_TIMEOUT" peer=connected) \
        || { echo "error: node-a never saw its peer: $out" >&2; return 1; }
      echo "setup_connected_seconds $(sed -n 's/^elapsed //p' <<<"$out")" >>"$turn"
      echo "status_before_promote $(sed -n 's/^status //p' <<<"$out")" >>"$turn"
      t0=$(date +%s.%N)
      if ! "$NBDMIRROR" promote disk0 --config "$CFG_A" >"$rdir/$s.promote.out" 2>&1; then
        if [ "$PROMOTED_ONCE" = 0 ]; then
          # a first promotion over a peer image holding data (here: preallocated zeroes) may
          # be refused by design (issue 3, point 7); the bench's images are equal, so force it
          echo "note: promote refused ($(tr '\n' ' ' <"$rdir/$s.promote.out")); retrying with --force" >&2
          echo "note promote refused, retried with --force: $(tr '\n' ' ' <"$rdir/$s.promote.out")" >>"$turn"
          "$NBDMIRROR" promote disk0 --config "$CFG_A" --force >>"$rdir/$s.promote.out" 2>&1 \
            || { cat "$rdir/$s.promote.out" >&2; return 1; }
        else
          cat "$rdir/$s.promote.out" >&2; return 1
        fi
      fi
      PROMOTED_ONCE=1
      out=$(python3 "$HERE/mirror-wait.py" "$NBDMIRROR" "$CFG_A" --since "$t0" --timeout "$SYNC_TIMEOUT" \
        role=primary peer=connected sync=in-sync) || { echo "error: never in sync: $out" >&2; return 1; }
      echo "setup_promote_to_in_sync_seconds $(sed -n 's/^elapsed //p' <<<"$out")" >>"$turn"
      echo "status_after_promote $(sed -n 's/^status //p' <<<"$out")" >>"$turn"
      wait_nbd "$(uri_of "$s")" "${SPIDS[$base]}" ;;
  esac
}

# ---- 6. rounds ----------------------------------------------------------------------------
FAILED=0
turn_start() {  # turn_start SERVER: evict its images, start it; 1 if it did not come up
  local s=$1 turn="$rdir/$1.turn"
  : >"$turn"; : >"$rdir/$s.txt"; : >"$rdir/$s.err"
  if [ "$CACHE" = cold ]; then for img in $(imgs_of "$s"); do evict "$img"; done; fi
  echo "--- start $s ($(date -u +%H:%M:%S))"
  if ! start_server "$s" "$rdir" "$turn"; then
    echo "error: $s did not come up; its logs:" >&2
    for l in "$rdir/$s".*log "$rdir/$s.log"; do [ -f "$l" ] || continue; echo "  == $l" >&2; tail -n 30 "$l" | sed 's/^/  /' >&2; done
    echo "server_start_error 1 flag" >"$rdir/$s.txt"
    stop_server_procs "$s" "$turn"; FAILED=1; return 1
  fi
  grep '^setup_' "$turn" | sed 's/^/    /' || true
}
cpu_ticks() {  # cpu_ticks SERVER: user+system clock ticks used so far by that server's processes
  local i tot=0 v
  for i in "${!SPIDS[@]}"; do
    [ "${SPID_SERVERS[$i]}" = "$1" ] || continue
    v=$(awk '{ print $14 + $15 }' "/proc/${SPIDS[$i]}/stat" 2>/dev/null) || v=0
    tot=$((tot + ${v:-0}))
  done
  echo "$tot"
}
CLK_TCK=$(getconf CLK_TCK)
turn_battery() {  # turn_battery SERVER TESTS: run (part of) the battery, append the figures
  local s=$1 t=$2 turn="$rdir/$1.turn" rc=0 out c0 c1 one
  out=$(mktemp)
  echo "loadavg_before_${t// /+} $(cut -d' ' -f1-3 /proc/loadavg)" >>"$turn"
  c0=$(cpu_ticks "$s")
  # In the background plus `wait`, so that SIGINT/SIGTERM reach the traps at once.
  OUTDIR="$rdir/fio/$s" RUNTIME="$RUNTIME" RAMP="$RAMP" TESTS="$t" \
    bash "$HERE/bench-nbd.sh" "$(uri_of "$s")" >"$out" 2>>"$rdir/$s.err" &
  BPID=$!
  wait "$BPID" || rc=$?
  BPID=""
  c1=$(cpu_ticks "$s")
  echo "loadavg_after_${t// /+} $(cut -d' ' -f1-3 /proc/loadavg)" >>"$turn"
  echo "battery_exit_status_${t// /+} $rc" >>"$turn"
  # Server CPU per I/O (per MiB for the 1 MiB test): the CPU time of all of this server's
  # processes (both daemons; qemu-storage-daemon and its qemu-nbd peer) over the test, ramp
  # included, divided by rate x (RUNTIME + RAMP). It tells what a write costs the server, but
  # it is not immune to other load: a starved server batches more per wake-up and spends less
  # per I/O (the pair's QD32 figure moved 2.5x between two loaded runs).
  if [ "${#TEST_LIST[@]}" -gt 0 ] && [[ "$t" != *" "* ]]; then
    one=$(awk -v t="$t" -v c="$((c1 - c0))" -v hz="$CLK_TCK" -v d="$((RUNTIME + RAMP))" '
      $1 == t "_iops" && $2 > 0 { printf "%s_server_cpu_per_io %.1f us\n", t, c / hz * 1e6 / ($2 * d) }
      $1 == t "_bw" && $2 > 0   { printf "%s_server_cpu_per_mib %.1f us\n", t, c / hz * 1e6 / ($2 * d) }' "$out")
    [ -z "$one" ] || echo "$one" >>"$out"
  fi
  sed "s/^/    $s: /" "$out"; cat "$out" >>"$rdir/$s.txt"; rm -f "$out"
  if [ "$rc" -ne 0 ] || grep -q '_error ' "$rdir/$s.txt"; then
    echo "warning: $s round $r had errors, see $rdir/$s.err" >&2; FAILED=1
  fi
}
turn_end() {  # turn_end SERVER: check it is still up, record state, stop it
  local s=$1 turn="$rdir/$1.turn" i
  for i in "${!SPIDS[@]}"; do
    [ "${SPID_SERVERS[$i]}" = "$s" ] || continue
    if ! kill -0 "${SPIDS[$i]}" 2>/dev/null; then
      echo "warning: $s (${SPID_LABELS[$i]}) exited during its turn; see $rdir/$s*.log" >&2; FAILED=1
    fi
  done
  if [ "$s" = mirror ]; then
    echo "status_after_battery $("$NBDMIRROR" status --config "$CFG_A" --json 2>&1 | tr '\n' ' ')" >>"$turn"
    echo "status_b_after_battery $("$NBDMIRROR" status --config "$CFG_B" --json 2>&1 | tr '\n' ' ')" >>"$turn"
  fi
  if [ "$s" = qsd-mirror ]; then  # still a synchronous mirror at the end? (job state, errors)
    echo "qsd_jobs $(python3 "$QMP_PY" "$QSD_QMP" '{"execute":"query-block-jobs"}' 2>&1 | tr '\n' ' ')" >>"$turn"
  fi
  stop_server_procs "$s" "$turn"
}
rotate() {  # rotate K WORDS...: the words, starting with the K-th (0-based, modulo)
  local k=$1; shift; local a=("$@") n=$# i
  for ((i = 0; i < n; i++)); do printf '%s ' "${a[$(((k + i) % n))]}"; done
}
n=${#SERVER_LIST[@]}
read -r -a TEST_LIST <<<"$TESTS"
for ((r = 1; r <= ROUNDS; r++)); do
  rdir="$OUTDIR/round$r"; mkdir -p "$rdir"
  read -r -a order <<<"$(rotate $((r - 1)) "${SERVER_LIST[@]}")"
  echo "=== round $r/$ROUNDS: ${order[*]} ($(date -u +%H:%M:%S), interleave by $INTERLEAVE)"
  echo "- round $r order: ${order[*]}" >>"$OUTDIR/meta.md"
  if [ "$INTERLEAVE" = server ]; then
    for s in "${order[@]}"; do
      turn_start "$s" || continue
      turn_battery "$s" "$TESTS"
      turn_end "$s"
    done
  else
    up=()
    for s in "${order[@]}"; do if turn_start "$s"; then up+=("$s"); fi; done
    for ((k = 0; k < ${#TEST_LIST[@]}; k++)); do
      t=${TEST_LIST[$k]}
      [ "${#up[@]}" -gt 0 ] || break
      read -r -a torder <<<"$(rotate "$k" "${up[@]}")"
      echo "  -- $t: ${torder[*]} ($(date -u +%H:%M:%S))"
      for s in "${torder[@]}"; do turn_battery "$s" "$t"; done
    done
    for s in "${up[@]}"; do turn_end "$s"; done
  fi
done
echo "- load average at end $(cut -d' ' -f1-3 /proc/loadavg), finished $(date -u '+%H:%M:%S UTC')" >>"$OUTDIR/meta.md"

# ---- 7. summary ---------------------------------------------------------------------------
python3 "$HERE/summarize-mirror.py" "$OUTDIR" >"$OUTDIR/summary.md"
echo
cat "$OUTDIR/summary.md"
echo
echo "summary: $OUTDIR/summary.md"
exit "$FAILED"
