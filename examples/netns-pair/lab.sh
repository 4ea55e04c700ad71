#!/usr/bin/env bash
# The lab of examples/netns-pair: three hosts made of network namespaces. Nothing is created
# outside them (the root namespace gets no interface, address or route), so the 10.99
# addresses of the example configs never leave the lab. Run as root.
#
#   ${P}-c  client + witness  pub0 10.99.0.10/24 --+
#   ${P}-a  node-a            pub0 10.99.0.1/24  --+-- br0 in ${P}-sw (public LAN; VIP 10.99.0.100)
#   ${P}-b  node-b            pub0 10.99.0.2/24  --+
#   ${P}-a repl0 10.99.1.1/24 <==== veth ====> ${P}-b repl0 10.99.1.2/24   (replication link)
#
# Usage (P defaults to "nbm"; set LAB_PREFIX to run several labs side by side):
#   lab.sh up | down | status
#   lab.sh exec a|b|c CMD...        run CMD inside a host
#   lab.sh cut repl|pub|all a|b on|off   take a host's link(s) down or up
#   lab.sh kill a|b                 SIGKILL every process of the host and cut all its links
set -euo pipefail
P=${LAB_PREFIX:-nbm}
ns() { case "$1" in a) echo "$P-a" ;; b) echo "$P-b" ;; c) echo "$P-c" ;; sw) echo "$P-sw" ;; *) echo "unknown host $1 (a, b, c)" >&2; exit 2 ;; esac; }

up() {
    for h in a b c sw; do ip netns add "$(ns $h)"; ip -n "$(ns $h)" link set lo up; done
    ip -n "$(ns sw)" link add br0 type bridge stp_state 0
    ip -n "$(ns sw)" link set br0 up
    for h in a b c; do
        ip link add pub0 netns "$(ns $h)" type veth peer name "p-$h" netns "$(ns sw)"
        ip -n "$(ns sw)" link set "p-$h" master br0 up
        ip -n "$(ns $h)" link set pub0 up
    done
    ip -n "$(ns a)" addr add 10.99.0.1/24 dev pub0
    ip -n "$(ns b)" addr add 10.99.0.2/24 dev pub0
    ip -n "$(ns c)" addr add 10.99.0.10/24 dev pub0
    ip link add repl0 netns "$(ns a)" type veth peer name repl0 netns "$(ns b)"
    ip -n "$(ns a)" addr add 10.99.1.1/24 dev repl0
    ip -n "$(ns b)" addr add 10.99.1.2/24 dev repl0
    ip -n "$(ns a)" link set repl0 up
    ip -n "$(ns b)" link set repl0 up
    echo "lab $P up"
}

down() {
    for h in a b c sw; do
        local n; n=$(ns $h)
        ip netns list | grep -qw "^$n" || continue
        for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    done
    sleep 0.2
    for h in a b c sw; do
        local n; n=$(ns $h)
        ip netns list | grep -qw "^$n" && ip netns del "$n"
    done
    echo "lab $P down"
}

cut() {
    local which=$1 host=$2 state=$3 dev
    [ "$state" = on ] && state=down || state=up
    case "$which" in
        repl) devs="repl0" ;; pub) devs="pub0" ;; all) devs="repl0 pub0" ;;
        *) echo "cut repl|pub|all" >&2; exit 2 ;;
    esac
    for dev in $devs; do ip -n "$(ns "$host")" link set "$dev" "$state"; done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) for h in a b c; do echo "== $(ns $h)"; ip -n "$(ns $h)" -br addr; done ;;
    exec) h=$2; shift 2; exec ip netns exec "$(ns "$h")" "$@" ;;
    cut) cut "$2" "$3" "$4" ;;
    kill)
        for pid in $(ip netns pids "$(ns "$2")"); do kill -9 "$pid" 2>/dev/null || true; done
        cut all "$2" on ;;
    *) sed -n '2,18p' "$0"; exit 2 ;;
esac
