#!/usr/bin/env bash
# bench-nbd.sh URI [LABEL]
#
# Runs a fixed fio battery against any NBD URI (fio's built-in `nbd` ioengine,
# i.e. libnbd) and prints one line per figure:   name value unit
#
#   URI     e.g. nbd://127.0.0.1:10809/   or   nbd+unix:///?socket=/tmp/x.sock
#   LABEL   optional prefix for the figure names (default: none)
#
# Environment knobs:
#   RUNTIME=8     seconds of measured time per test
#   RAMP=1        seconds of ramp (not measured) per test
#   TESTS="..."   space-separated subset of test names (default: all, see below)
#   SIZE=         limit the region tested (fio size=, e.g. 1g); default whole export
#   OUTDIR=       if set, raw fio JSON for every test is kept there
#   FIO=fio       fio binary
#
# WARNING: write tests overwrite the export's contents.
#
# Needs: fio built with the nbd ioengine (Debian/Ubuntu `fio` has it; check with
# `fio --enghelp | grep -w nbd`), python3 (stdlib only) to parse fio JSON.
# Each test is a separate fio run with its own NBD connection(s); *_mc4x8 uses
# 4 fio jobs = 4 NBD connections (server must accept >=4 clients).
# Latency percentiles are fio "lat" (submit->completion, includes client time).
#
# Provenance: copied into this repository from /work/shared/bench/bench-nbd.sh
# (sha256 2e34f02580394684...), the battery that produced the peer figures in
# /work/shared/bench/PEERS.md, so that bench/run-peers.sh measures nbdmirror with the
# very same fio jobs. Unchanged apart from this paragraph; keep it that way, or the
# figures stop being comparable with PEERS.md.
set -euo pipefail

URI=${1:?usage: bench-nbd.sh URI [LABEL]}
LABEL=${2:-}
RUNTIME=${RUNTIME:-8}
RAMP=${RAMP:-1}
FIO=${FIO:-fio}
SIZE=${SIZE:-}
ALL_TESTS="randread_4k_qd1 randwrite_4k_qd1 randwrite_4k_qd1_flush randread_4k_qd32 randwrite_4k_qd32 randread_4k_mc4x8 randwrite_4k_mc4x8 seqread_1m_qd8 seqwrite_1m_qd8"
TESTS=${TESTS:-$ALL_TESTS}

if ! "$FIO" --enghelp 2>/dev/null | grep -qw nbd; then
  echo "error: $FIO has no nbd ioengine" >&2; exit 2
fi

TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
[ -n "${OUTDIR:-}" ] && mkdir -p "$OUTDIR"

# name -> fio args
args_for() {
  case "$1" in
    randread_4k_qd1)        echo "--rw=randread  --bs=4k --iodepth=1" ;;
    randwrite_4k_qd1)       echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    randwrite_4k_qd1_flush) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;   # NBD_CMD_FLUSH after every write
    randread_4k_qd32)       echo "--rw=randread  --bs=4k --iodepth=32" ;;
    randwrite_4k_qd32)      echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    randread_4k_mc4x8)      echo "--rw=randread  --bs=4k --iodepth=8 --numjobs=4" ;;  # 4 NBD connections x QD8
    randwrite_4k_mc4x8)     echo "--rw=randwrite --bs=4k --iodepth=8 --numjobs=4" ;;
    seqread_1m_qd8)         echo "--rw=read      --bs=1m --iodepth=8" ;;
    seqwrite_1m_qd8)        echo "--rw=write     --bs=1m --iodepth=8" ;;
    *) echo "unknown test $1" >&2; return 1 ;;
  esac
}

pfx=""; [ -n "$LABEL" ] && pfx="${LABEL}."

for t in $TESTS; do
  a=$(args_for "$t")
  out="$TMPD/$t.json"
  # shellcheck disable=SC2086
  if ! "$FIO" --name="$t" --ioengine=nbd --uri="$URI" $a \
        ${SIZE:+--size=$SIZE} \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --group_reporting --lat_percentiles=1 --percentile_list=50:99:99.9 \
        --output-format=json --output="$out" >"$TMPD/$t.stdout" 2>"$TMPD/$t.err"; then
    echo "${pfx}${t}_error 1 flag"; sed 's/^/# /' "$TMPD/$t.err" >&2; continue
  fi
  [ -n "${OUTDIR:-}" ] && cp "$out" "$OUTDIR/${LABEL:+$LABEL.}$t.json"
  python3 - "$out" "${pfx}${t}" <<'PY'
import json, sys
path, name = sys.argv[1], sys.argv[2]
s = open(path).read()
d = json.loads(s[s.index('{'):])          # fio may print a banner before the JSON
j = d['jobs'][0]
if j.get('error'):
    print(f"{name}_error {j['error']} errno"); sys.exit(0)
ddir = 'read' if j['read']['io_bytes'] > 0 else 'write'
st = j[ddir]
def pct(stat, key):
    p = st.get(stat, {}).get('percentile', {})
    v = p.get(key)
    return None if v is None else v / 1000.0   # ns -> us
if '_1m_' in name:
    print(f"{name}_bw {st['bw_bytes']/1048576:.1f} MiB/s")
else:
    print(f"{name}_iops {st['iops']:.0f} IOPS")
if '_qd1' in name:
    for key, lab in (('50.000000', 'p50'), ('99.000000', 'p99')):
        v = pct('lat_ns', key) or pct('clat_ns', key)
        if v is not None:
            print(f"{name}_lat_{lab} {v:.1f} us")
    if name.endswith('_flush'):
        sy = j.get('sync', {})
        m = sy.get('lat_ns', {}).get('mean')
        if m:
            print(f"{name}_flushlat_mean {m/1000.0:.1f} us")
PY
done
