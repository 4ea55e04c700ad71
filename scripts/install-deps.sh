#!/usr/bin/env bash
# Installs the system packages the tests use (real NBD clients and peers; arping for the
# virtual IP's gratuitous ARP; QEMU and the tools that build the test guest for the real-VM
# failover test), idempotently, then builds that guest (scripts/make-vm-image.sh, cached in
# target/vm/) so the tests themselves never download anything.
# Needs root and Debian 12 (bookworm). qemu-utils must be 10.x and qemu-system-x86 must match
# it: when either is missing both come from bookworm-backports through a private source list
# (bookworm's 7.2 is too old, and mixing it with 10.x removes packages: qemu-utils 10 breaks
# qemu-system-common << 8), so /etc/apt is never edited.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "install-deps.sh: run as root (apt-get install)" >&2
  exit 1
fi
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# busybox-static, cpio, kmod (depmod/modprobe), e2fsprogs: the test guest's initramfs and disk.
# gcc, libc6-dev: the C parts of zstd and mimalloc (and rustc's linker).
# python3-libnbd: nbdsh (the libnbd shell the protocol tests drive; not in libnbd-bin).
apt-get install -y -q --no-install-recommends \
  gcc libc6-dev libnbd-bin python3-libnbd fio nbdkit iproute2 util-linux procps python3 ca-certificates \
  iputils-arping busybox-static cpio kmod e2fsprogs xz-utils
if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null ||
  ! command -v qemu-system-x86_64 >/dev/null; then
  A=/var/cache/nbdmirror-apt
  mkdir -p "$A/lists/partial" "$A/empty" "$A/cache/archives/partial"
  K=/usr/share/keyrings/debian-archive-keyring.gpg
  cat >"$A/sources.list" <<SRC
deb [signed-by=$K] http://deb.debian.org/debian bookworm main
deb [signed-by=$K] http://deb.debian.org/debian bookworm-backports main
SRC
  OPT=(-o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/empty"
       -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache")
  apt-get "${OPT[@]}" update -q
  apt-get "${OPT[@]}" install -y -q --no-install-recommends -t bookworm-backports \
    qemu-utils qemu-system-x86
fi
qemu-img --version | sed -n 1p
qemu-system-x86_64 --version | sed -n 1p
nbdinfo --version | sed -n 1p
fio --version
# The guest of the real-VM failover test (kernel from Debian's linux-image .deb, busybox
# initramfs); quick when target/vm/ already holds it.
scripts/make-vm-image.sh
