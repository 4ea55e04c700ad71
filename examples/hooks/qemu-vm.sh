#!/usr/bin/env bash
# qemu-vm.sh - nbdmirror group hook: start, stop and monitor a QEMU VM whose disks are the
# group's NBD exports.
#
#   [[group]] hooks = { start = "/path/qemu-vm.sh", stop = "/path/qemu-vm.sh",
#                       monitor = "/path/qemu-vm.sh", timeout = "60s" }
#
# The daemon runs it with NBDMIRROR_ACTION (start|stop|monitor), NBDMIRROR_GROUP, NBDMIRROR_NODE
# and NBDMIRROR_VOLUMES ("disk0=nbd://10.99.0.100:10809/disk0 disk1=..."): each volume becomes a
# virtio disk, in that order (vda, vdb, ...). The action may also be given as $1, for testing by
# hand. Exit codes: 0 done / VM healthy; 1 failed / VM not running; 2 usage error.
#
# Settings (environment; put them in the hook command, e.g.
#   start = "VM_KERNEL=/srv/vm1/vmlinux VM_MEM=1024 /path/qemu-vm.sh"):
#   VM_NAME       name of the VM                    (default: $NBDMIRROR_GROUP)
#   VM_RUN_DIR    pidfile, QMP socket, console log  (default: /run/nbdmirror-vm/$VM_NAME)
#   VM_QEMU       the emulator                      (default: qemu-system-x86_64)
#   VM_MEM        memory, MiB                       (default: 512)
#   VM_CPUS       virtual CPUs                      (default: 1)
#   VM_ACCEL      auto | kvm | tcg                  (default: auto: KVM only if /dev/kvm works)
#   VM_KERNEL     boot this kernel directly (else the first disk boots through the firmware)
#   VM_INITRD     its initramfs                     (only with VM_KERNEL)
#   VM_APPEND     its command line                  (default: "console=ttyS0 root=/dev/vda")
#   VM_ARGS       more QEMU arguments, split on white space (network: "-nic tap,ifname=tap0,...")
#   VM_DRIVE_OPTS extra -drive options              (default: cache=none)
#   VM_NBD_RECONNECT_DELAY  seconds QEMU keeps retrying a lost NBD connection, holding the
#                 guest's I/O meanwhile, before failing it (default: unset = 0 = fail at once)
#   VM_STOP_TIMEOUT seconds to wait for an ACPI shutdown before killing QEMU (default: 30;
#                 keep it below the hook timeout)
#
# Topologies:
# - VM on the primary node (this hook's main use): the VM is started on promotion, stopped on
#   demotion; its disks are the local exports. No reconnect delay is needed: the VM never
#   outlives its export.
# - VM on a separate hypervisor that reaches the export through the group's virtual IP: the VM
#   is not restarted on failover. Start it there (by hand, or with this script and
#   NBDMIRROR_VOLUMES set to the VIP URIs) with VM_NBD_RECONNECT_DELAY=15 (more than the
#   heartbeat timeout plus the promotion, a few seconds): when the primary dies, QEMU keeps
#   reconnecting to the VIP and the guest only sees its I/O stall until the survivor serves.
#   With the default 0 the guest gets I/O errors at once (ext4 then aborts its journal). The
#   drive is then given with explicit options, because QEMU does not take reconnect-delay
#   together with an nbd:// URI:
#     -drive driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=10.99.0.100,
#            file.server.port=10809,file.export=disk0,file.reconnect-delay=15,if=virtio
set -euo pipefail

action=${1:-${NBDMIRROR_ACTION:-}}
VM_NAME=${VM_NAME:-${NBDMIRROR_GROUP:-}}
if [ -z "$VM_NAME" ]; then
  echo "qemu-vm.sh: set VM_NAME or NBDMIRROR_GROUP" >&2
  exit 2
fi
case $VM_NAME in
  */* | .* | *[[:space:]]*) echo "qemu-vm.sh: bad VM name '$VM_NAME'" >&2; exit 2 ;;
esac
VM_RUN_DIR=${VM_RUN_DIR:-/run/nbdmirror-vm/$VM_NAME}
VM_QEMU=${VM_QEMU:-qemu-system-x86_64}
VM_MEM=${VM_MEM:-512}
VM_CPUS=${VM_CPUS:-1}
VM_ACCEL=${VM_ACCEL:-auto}
VM_APPEND=${VM_APPEND:-console=ttyS0 root=/dev/vda}
VM_DRIVE_OPTS=${VM_DRIVE_OPTS:-cache=none}
VM_STOP_TIMEOUT=${VM_STOP_TIMEOUT:-30}
PIDFILE=$VM_RUN_DIR/qemu.pid
QMP=$VM_RUN_DIR/qmp.sock

log() { echo "qemu-vm.sh[$VM_NAME]: $*" >&2; }

# The pid of our QEMU, if it runs: the pidfile's process whose command line names our pidfile
# (so a recycled pid is never mistaken for it).
vm_pid() {
  local pid
  [ -r "$PIDFILE" ] || return 1
  pid=$(tr -dc '0-9' <"$PIDFILE")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF "$PIDFILE" || return 1
  # A zombie is not running.
  [ "$(sed 's/^.*) //' "/proc/$pid/stat" | cut -c1)" != Z ] || return 1
  echo "$pid"
}

# One QMP command on the VM's socket (python3, else socat); fails quietly when neither exists.
qmp() {
  local cmd=$1
  [ -S "$QMP" ] || return 1
  if command -v python3 >/dev/null; then
    python3 - "$QMP" "$cmd" <<'PY' >/dev/null 2>&1
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()                                            # greeting
for c in ("qmp_capabilities", sys.argv[2]):
    f.write(json.dumps({"execute": c}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            break
PY
  elif command -v socat >/dev/null; then
    printf '{"execute":"qmp_capabilities"}\n{"execute":"%s"}\n' "$cmd" |
      socat -t 2 - "UNIX-CONNECT:$QMP" >/dev/null 2>&1
  else
    return 1
  fi
}

wait_gone() { # PID SECONDS
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    [ -d "/proc/$1" ] && [ "$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" != Z ] || return 0
    sleep 0.1
  done
  return 1
}

# KVM only when it really works: /dev/kvm present and usable, and QEMU can start a KVM
# machine with it (on nested set-ups /dev/kvm may exist and still fail).
use_kvm() {
  case $VM_ACCEL in
    kvm) return 0 ;;
    tcg) return 1 ;;
    auto) ;;
    *) log "VM_ACCEL must be auto, kvm or tcg, not '$VM_ACCEL'"; exit 2 ;;
  esac
  [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
  printf '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n' |
    timeout 10 "$VM_QEMU" -accel kvm -machine pc -cpu host -display none -nodefaults -S \
      -qmp stdio >/dev/null 2>&1
}

# -drive arguments for one NBD URI.
drive_args() { # URI
  local uri=$1 rest hostport name host port
  if [ -z "${VM_NBD_RECONNECT_DELAY:-}" ] || [ "${VM_NBD_RECONNECT_DELAY}" = 0 ]; then
    echo "file=$uri,format=raw,if=virtio,$VM_DRIVE_OPTS"
    return
  fi
  case $uri in
    nbd://*)
      rest=${uri#nbd://}
      hostport=${rest%%/*}
      name=${rest#"$hostport"}
      name=${name#/}
      host=${hostport%:*}
      port=10809
      [ "$hostport" != "$host" ] && port=${hostport##*:}
      echo "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=$host,file.server.port=$port,file.export=$name,file.reconnect-delay=$VM_NBD_RECONNECT_DELAY,if=virtio,$VM_DRIVE_OPTS"
      ;;
    nbd+unix:///*\?socket=*)
      rest=${uri#nbd+unix:///}
      name=${rest%%\?*}
      echo "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=${rest#*\?socket=},file.export=$name,file.reconnect-delay=$VM_NBD_RECONNECT_DELAY,if=virtio,$VM_DRIVE_OPTS"
      ;;
    *)
      log "cannot apply VM_NBD_RECONNECT_DELAY to '$uri' (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
      exit 2
      ;;
  esac
}

start() {
  if pid=$(vm_pid); then
    log "already running (pid $pid)"
    return 0
  fi
  local vols=${NBDMIRROR_VOLUMES:-}
  if [ -z "$vols" ]; then
    log "NBDMIRROR_VOLUMES is empty: no disk to boot from"
    return 1
  fi
  mkdir -p "$VM_RUN_DIR"
  rm -f "$PIDFILE" "$QMP"
  local args=(-name "$VM_NAME" -m "$VM_MEM" -smp "$VM_CPUS" -nodefaults -display none
    -serial "file:$VM_RUN_DIR/console.log" -qmp "unix:$QMP,server=on,wait=off"
    -pidfile "$PIDFILE" -daemonize)
  if use_kvm; then
    args+=(-accel kvm -cpu host)
  else
    args+=(-accel tcg -cpu max)
  fi
  local pair
  for pair in $vols; do
    case $pair in
      *=*) ;;
      *) log "bad NBDMIRROR_VOLUMES entry '$pair' (want name=uri)"; return 2 ;;
    esac
    args+=(-drive "$(drive_args "${pair#*=}")")
  done
  if [ -n "${VM_KERNEL:-}" ]; then
    args+=(-kernel "$VM_KERNEL" -append "$VM_APPEND")
    if [ -n "${VM_INITRD:-}" ]; then args+=(-initrd "$VM_INITRD"); fi
  fi
  # shellcheck disable=SC2206 # VM_ARGS is split on white space on purpose
  if [ -n "${VM_ARGS:-}" ]; then args+=(${VM_ARGS}); fi
  log "starting: $VM_QEMU ${args[*]}"
  # -daemonize: QEMU returns once the VM is set up (or failed); its output goes to a log,
  # never to the hook's pipes.
  if ! "$VM_QEMU" "${args[@]}" </dev/null >>"$VM_RUN_DIR/qemu.log" 2>&1; then
    log "QEMU failed to start; last lines of $VM_RUN_DIR/qemu.log:"
    tail -n 5 "$VM_RUN_DIR/qemu.log" >&2
    return 1
  fi
  if pid=$(vm_pid); then
    log "started (pid $pid)"
    return 0
  fi
  log "QEMU exited at once; see $VM_RUN_DIR/qemu.log"
  return 1
}

stop() {
  local pid
  if ! pid=$(vm_pid); then
    log "not running"
    rm -f "$PIDFILE"
    return 0
  fi
  log "ACPI shutdown (waiting up to ${VM_STOP_TIMEOUT}s)"
  if qmp system_powerdown && wait_gone "$pid" "$VM_STOP_TIMEOUT"; then
    log "stopped"
  else
    # QEMU flushes its disks when it quits on SIGTERM.
    log "no clean shutdown; terminating QEMU"
    qmp quit || kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 5; then
      log "QEMU still there; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || { log "cannot kill pid $pid"; return 1; }
    fi
  fi
  rm -f "$PIDFILE" "$QMP"
}

monitor() {
  # Healthy while QEMU runs (without -no-shutdown, a guest that powers off ends QEMU).
  vm_pid >/dev/null
}

case $action in
  start) start ;;
  stop) stop ;;
  monitor) monitor ;;
  fence) log "this hook does not fence (use a power switch or IPMI hook)"; exit 2 ;;
  *) echo "usage: qemu-vm.sh start|stop|monitor (or NBDMIRROR_ACTION)" >&2; exit 2 ;;
esac
