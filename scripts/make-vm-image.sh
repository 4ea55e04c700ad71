#!/usr/bin/env bash
# make-vm-image.sh [DIR] - build the tiny test guest of the real-VM failover test into DIR
# (default: ${CARGO_TARGET_DIR:-target}/vm), idempotently; a second run with everything cached
# takes a few milliseconds.
#
#   DIR/vmlinux          Debian bookworm's kernel, decompressed to its ELF (PVH entry): under
#                        TCG it boots ~5 s faster than the bzImage, which spends them in xz
#   DIR/initrd.cpio.gz   busybox-static, the modules for virtio-blk + ext4, and /init
#   DIR/kernel-version   the kernel's version
#   DIR/mkdisk.sh IMG SIZE   makes the guest's disk (an empty ext4, label NBMVM)
#
# The kernel comes from the linux-image .deb that linux-image-amd64 points at (apt-get
# download + dpkg-deb: extracted, never installed, so nothing on the host changes); only the
# modules the guest needs are kept (DIR/modules/), so changing /init never downloads again.
# Needs busybox-static, cpio, kmod, e2fsprogs, python3, and apt
# access to Debian the first time (scripts/install-deps.sh runs this script in CI).
#
# The guest's /init (kernel command line: labmode=loop|oneshot):
#   - mounts /dev/vda (ext4) read-write; a crash replays the journal here;
#   - increments /counter (the boot counter; write to a temporary file, fsync, rename, fsync);
#   - reads the last tick of /ticks.log and prints on the serial console (ttyS0)
#       LAB-MARKER boot=N last_tick=T ticks=LINES
#   - loop: every second appends "boot=N tick=T" with T = last tick + 1, fsyncs the file, and
#     only then prints "LAB-TICK boot=N tick=T": a printed tick is acknowledged by the disk, so
#     it must survive any crash of the host. The counter never goes backwards across boots.
#   - oneshot: unmounts, prints "LAB-DONE boot=N" and powers off.
#   Errors print "LAB-ERROR ..." and power off.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${VM_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/vm}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SELF_HASH=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)

# One builder at a time (tests and the benchmark may call this together).
exec 9>"$OUT/.lock"
flock -w 600 9 || { echo "make-vm-image.sh: $OUT is locked by another build" >&2; exit 1; }

if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$SELF_HASH" ] &&
  [ -s "$OUT/vmlinux" ] && [ -s "$OUT/initrd.cpio.gz" ] && [ -x "$OUT/mkdisk.sh" ]; then
  exit 0
fi

for tool in busybox cpio depmod modprobe mkfs.ext4 python3 gzip; do
  p=$(command -v "$tool" || true)
  [ -z "$p" ] && [ -x "/sbin/$tool" ] && p=/sbin/$tool
  [ -z "$p" ] && [ -x "/usr/sbin/$tool" ] && p=/usr/sbin/$tool
  if [ -z "$p" ]; then
    echo "make-vm-image.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2
    exit 1
  fi
done
BUSYBOX=$(command -v busybox)
if ldd "$BUSYBOX" >/dev/null 2>&1; then   # ldd fails on a static binary
  echo "make-vm-image.sh: $BUSYBOX is not a static binary (install busybox-static)" >&2
  exit 1
fi
PATH=$PATH:/sbin:/usr/sbin
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. The kernel and its modules (cached in $OUT/modules with $OUT/vmlinux).
if [ ! -s "$OUT/vmlinux" ] || [ ! -f "$OUT/modules/order" ] || [ ! -s "$OUT/kernel-version" ]; then
  KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  if [ -z "$KPKG" ]; then
    echo "make-vm-image.sh: apt knows no linux-image-amd64 (run apt-get update)" >&2
    exit 1
  fi
  KVER=${KPKG#linux-image-}
  echo "make-vm-image.sh: downloading $KPKG (extracted into $OUT, not installed)"
  (cd "$WORK" && apt-get download -q "$KPKG" >/dev/null 2>&1) ||
    (cd "$WORK" && chmod 777 . && apt-get download -q "$KPKG")
  dpkg-deb -x "$WORK/${KPKG}"_*.deb "$WORK/root"
  depmod -b "$WORK/root" "$KVER"    # the .deb ships no modules.dep (its postinst makes it)
  # The modules in load order, as modprobe resolves them. crc32c-intel is optional: on a CPU
  # without SSE4.2 it fails with "No such device" and crc32c_generic covers it.
  MODS=$(for m in virtio_pci virtio_blk crc32c_generic ext4; do
    modprobe -d "$WORK/root" -S "$KVER" --show-depends "$m" | awk '/^insmod/ { print $2 }'
  done | awk '!seen[$0]++')
  rm -rf "$WORK/modules"
  mkdir -p "$WORK/modules"
  : >"$WORK/modules/order"
  for f in $MODS; do
    case $f in
      *.ko) cp "$f" "$WORK/modules/" ;;
      *.ko.xz) xz -dc "$f" >"$WORK/modules/$(basename "${f%.xz}")" ;;
      *) echo "make-vm-image.sh: unexpected module file $f" >&2; exit 1 ;;
    esac
    basename "${f%.xz}" >>"$WORK/modules/order"
  done
  # The uncompressed ELF for PVH direct boot (CONFIG_PVH=y): the bzImage's payload is one xz
  # stream.
  python3 - "$WORK/root/boot/vmlinuz-$KVER" "$WORK/vmlinux" <<'PY'
import lzma, sys
d = open(sys.argv[1], "rb").read()
i = d.find(b"\xfd7zXZ\x00")
assert i > 0, "no xz stream in the bzImage"
open(sys.argv[2], "wb").write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(d[i:]))
PY
  rm -rf "$OUT/modules"
  mv "$WORK/modules" "$OUT/modules"
  mv "$WORK/vmlinux" "$OUT/vmlinux"
  echo "$KVER" >"$OUT/kernel-version"
  rm -rf "$WORK/root" "$WORK"/*.deb
  echo "make-vm-image.sh: kernel $KVER, modules: $(tr '\n' ' ' <"$OUT/modules/order")"
fi

# 2. The initramfs.
IR=$WORK/initramfs
mkdir -p "$IR"/{bin,dev,proc,sys,mnt,lib/modules}
cp "$BUSYBOX" "$IR/bin/busybox"
cp "$OUT/modules/"*.ko "$OUT/modules/order" "$IR/lib/modules/"
cat >"$IR/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
die() { echo "LAB-ERROR $*"; sync; poweroff -f; sleep 10; }
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m" 2>/dev/null || echo "LAB-NOTE insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i + 1)); done
[ -b /dev/vda ] || die "no /dev/vda"
mode=$(sed -n 's/.*labmode=\([a-z]*\).*/\1/p' /proc/cmdline)
mount -t ext4 -o rw /dev/vda /mnt || { dmesg | tail -n 20; die "mount /dev/vda failed"; }
dmesg | grep -E 'EXT4-fs \(vda\)' | sed 's/^/LAB-DMESG /'
# fsync FILE where busybox has the applet, else sync (everything).
fsync_file() { fsync "$1" 2>/dev/null || sync; }
n=$(cat /mnt/counter 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" >/mnt/counter.tmp
fsync_file /mnt/counter.tmp
mv /mnt/counter.tmp /mnt/counter
sync
touch /mnt/ticks.log
t=$(tail -n 1 /mnt/ticks.log | sed -n 's/.*tick=\([0-9]*\).*/\1/p')
t=${t:-0}
echo "LAB-MARKER boot=$n last_tick=$t ticks=$(wc -l </mnt/ticks.log) uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$mode" = loop ]; then
  while true; do
    t=$((t + 1))
    echo "boot=$n tick=$t" >>/mnt/ticks.log || die "write failed at tick $t"
    fsync_file /mnt/ticks.log || die "fsync failed at tick $t"
    echo "LAB-TICK boot=$n tick=$t"
    sleep 1
  done
fi
umount /mnt || die "umount failed"
echo "LAB-DONE boot=$n"
poweroff -f
INIT
chmod +x "$IR/init"
(cd "$IR" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$WORK/initrd.cpio.gz"
mv "$WORK/initrd.cpio.gz" "$OUT/initrd.cpio.gz"

cat >"$WORK/mkdisk.sh" <<'MK'
#!/bin/sh
# mkdisk.sh IMAGE SIZE - a fresh, empty guest disk (ext4, label NBMVM).
set -eu
rm -f "$1"
truncate -s "$2" "$1"
PATH=$PATH:/sbin:/usr/sbin mkfs.ext4 -q -F -L NBMVM "$1"
MK
chmod +x "$WORK/mkdisk.sh"
mv "$WORK/mkdisk.sh" "$OUT/mkdisk.sh"
echo "$SELF_HASH" >"$OUT/stamp"
echo "make-vm-image.sh: guest in $OUT (kernel $(cat "$OUT/kernel-version"), initrd $(du -h "$OUT/initrd.cpio.gz" | cut -f1))"
