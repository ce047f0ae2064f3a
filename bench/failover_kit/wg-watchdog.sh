#!/bin/sh
# The 1 s watchdog that bench/failover.py --compare gives wireguard-go (WireGuard has no
# multipath failover of its own: a peer has one endpoint, changed only by `wg set` or by
# roaming on an authenticated packet from a new address).
#
#   wg-watchdog.sh IFACE PEER_PUBLIC_KEY ENDPOINT_A ENDPOINT_B
#
# Starts on ENDPOINT_A. Every second (`sleep 1`, plus the time of one `wg show`), it reads
# the peer's received-bytes counter (`wg show IFACE transfer`). If the counter has not grown
# since the previous check, the active endpoint is taken as silent and the peer's endpoint
# moves to the other one (`wg set IFACE peer KEY endpoint OTHER`); the next check compares
# against the counter read at that moment. Prints "<unix time> switch <endpoint>" per move.
# Nothing else: no handshake is forced (the current keypair keeps working on the new path,
# and the other end roams to the new source address on the first authenticated packet).
set -u
iface=$1 peer=$2 a=$3 b=$4
current=$a
rx() { wg show "$iface" transfer | awk -v p="$peer" '$1 == p { print $2 }'; }
last=$(rx)
echo "ready $current"
while sleep 1; do
    now=$(rx)
    if [ "$now" = "$last" ]; then
        if [ "$current" = "$a" ]; then current=$b; else current=$a; fi
        wg set "$iface" peer "$peer" endpoint "$current"
        echo "$(date +%s.%N) switch $current"
    fi
    last=$now
done
