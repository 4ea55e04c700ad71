#!/usr/bin/env bash
# Installs the system packages the tests use (real NBD clients and peers; arping for the
# virtual IP's gratuitous ARP), idempotently.
# Needs root and Debian 12 (bookworm). qemu-utils must be 10.x: when it is missing it comes
# from bookworm-backports through a private source list (bookworm's 7.2 is too old, and
# mixing it with 10.x removes packages), so /etc/apt is never edited.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "install-deps.sh: run as root (apt-get install)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  libnbd-bin fio nbdkit iproute2 util-linux procps python3 ca-certificates \
  iputils-arping
if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
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
  apt-get "${OPT[@]}" install -y -q --no-install-recommends -t bookworm-backports qemu-utils
fi
qemu-img --version | sed -n 1p
nbdinfo --version | sed -n 1p
fio --version
