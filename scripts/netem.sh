#!/usr/bin/env bash
# Kernel-shaped links between N "devices" on this machine, for astra-sim replay --live (and
# astra-eval distributed): every device gets its own network namespace PREFIX-dI with address
# 10.201.0.(I+1)/24 on a veth whose other end sits on a bridge in a switch namespace PREFIX-sw.
# Each device's uplink (its veth egress) is shaped to RATE bit/s: by default HTB with ACKs first
# (below); ASTRA_SHAPER=tbf for a single tbf FIFO (queue ASTRA_TBF_LATENCY, default 1s). Bucket:
# ASTRA_TBF_BURST bytes, default two frames;
# netem adds DELAY and LOSS when the kernel has sch_netem (reported, not faked, when it does not).
# TCP congestion control in the namespaces: ASTRA_TCP_CC (default reno).
# Nothing is changed in the calling (root) namespace.
#
#   netem.sh check                              exit 0 if we can shape (root, ip, tc, namespaces)
#   netem.sh up PREFIX N RATE_BIT [DELAY_MS] [LOSS_PCT]
#                                               prints "I NAMESPACE ADDRESS" per device, then "netem yes|no"
#   netem.sh down PREFIX                        removes every namespace PREFIX-*
#   netem.sh gc                                 removes astra-PID-* namespaces whose PID is gone
set -euo pipefail

die() { echo "netem.sh: $*" >&2; exit 1; }

check() {
  [[ $(id -u) == 0 ]] || die "needs root (network namespaces and tc)"
  command -v ip >/dev/null || die "ip (iproute2) not found"
  command -v tc >/dev/null || die "tc (iproute2) not found"
  local probe="astra-probe-$$"
  ip netns add "$probe" 2>/dev/null || die "cannot create network namespaces here"
  ip netns del "$probe"
}

down() {
  local prefix=$1 ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
}

gc() {
  local ns pid
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^astra-[0-9]+-' || true); do
    pid=${ns#astra-}; pid=${pid%%-*}
    kill -0 "$pid" 2>/dev/null || ip netns del "$ns" 2>/dev/null || true
  done
}

up() {
  local prefix=$1 n=$2 rate=$3 delay=${4:-0} loss=${5:-0}
  [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 200 ]] || die "N must be 1..200, got '$n'"
  [[ $rate =~ ^[0-9]+$ && $rate -gt 0 ]] || die "RATE_BIT must be a positive integer (bit/s), got '$rate'"
  down "$prefix"
  trap 'down "$prefix"' ERR
  local sw="$prefix-sw"
  ip netns add "$sw"
  ip netns exec "$sw" ip link add br0 type bridge
  # Multicast (the runtime's --transport multicast) floods to every port, as on a shared medium:
  # no IGMP snooping, which without a querier may stop forwarding a group.
  ip netns exec "$sw" ip link set br0 type bridge mcast_snooping 0 2>/dev/null || true
  ip netns exec "$sw" ip link set br0 up
  # A small bucket (two full frames): a larger one refills during compute and lets a message go out
  # at line rate, which no real link of this rate would do.
  local burst=${ASTRA_TBF_BURST:-3028}
  local netem=no
  for ((i = 0; i < n; i++)); do
    local ns="$prefix-d$i" addr="10.201.0.$((i + 1))"
    ip netns add "$ns"
    ip netns exec "$ns" ip link set lo up
    # Reno on a deep, lossless queue runs at the shaped rate; BBR's probing costs 10-20% on
    # second-long transfers through a single FIFO (measured, see results/sim-vs-live.md).
    ip netns exec "$ns" sysctl -q -w net.ipv4.tcp_congestion_control="${ASTRA_TCP_CC:-reno}" 2>/dev/null || true
    # Persistent connections of a serving system keep their congestion window across the compute
    # gaps between exchanges.
    ip netns exec "$ns" sysctl -q -w net.ipv4.tcp_slow_start_after_idle=0 2>/dev/null || true
    ip link add eth0 netns "$ns" type veth peer name "p$i" netns "$sw"
    ip netns exec "$sw" ip link set "p$i" master br0
    ip netns exec "$sw" ip link set "p$i" up
    # One wire frame per skb: with GSO a shaper releases a whole 64 KB super-packet on a positive
    # token balance, a burst no real link of this rate allows.
    ip netns exec "$ns" ip link set dev eth0 gso_max_segs 1 2>/dev/null || true
    ip netns exec "$ns" ip addr add "$addr/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    local leaf
    if [[ ${ASTRA_SHAPER:-htb} == tbf ]]; then
      ip netns exec "$ns" tc qdisc add dev eth0 root handle 1: tbf rate "${rate}bit" burst "$burst" latency "${ASTRA_TBF_LATENCY:-1s}"
      leaf=1:1
    else
      # HTB at the link rate with two classes sharing it: pure TCP ACKs first, everything else in
      # a deep FIFO behind them. A device that sends and
      # receives at once (every all-gather) then does not hold its peers' ACKs behind its own
      # data, as routers with ACK prioritisation do; with one FIFO, TCP in both directions loses
      # 10% or more of the link (measured).
      local tc=(ip netns exec "$ns" tc)
      "${tc[@]}" qdisc add dev eth0 root handle 1: htb default 20
      "${tc[@]}" class add dev eth0 parent 1: classid 1:1 htb rate "${rate}bit" ceil "${rate}bit" burst "$burst" cburst "$burst"
      "${tc[@]}" class add dev eth0 parent 1:1 classid 1:10 htb rate "$((rate / 10))bit" ceil "${rate}bit" burst "$burst" cburst "$burst" prio 0
      "${tc[@]}" class add dev eth0 parent 1:1 classid 1:20 htb rate "$((rate - rate / 10))bit" ceil "${rate}bit" burst "$burst" cburst "$burst" prio 1
      # Pure ACKs only (IP length 40, 52 with timestamps, 64 with one SACK block): a small data
      # segment jumping its flow's queue would arrive out of order and cost a retransmission.
      local len
      for len in 40 52 64; do
        "${tc[@]}" filter add dev eth0 parent 1: protocol ip prio 1 u32 match u16 "$len" 0xffff at 2 match u8 6 0xff at 9 flowid 1:10
      done
      "${tc[@]}" qdisc add dev eth0 parent 1:20 handle 20: pfifo limit 20000
      leaf=1:20
    fi
    if [[ $delay != 0 || $loss != 0 ]]; then
      if ip netns exec "$ns" tc qdisc replace dev eth0 parent "$leaf" handle 30: netem delay "${delay}ms" loss "${loss}%" 2>/dev/null; then
        netem=yes
      fi
    fi
    echo "$i $ns $addr"
  done
  trap - ERR
  echo "netem $netem"
}

case ${1:-} in
  check) check ;;
  up) shift; [[ $# -ge 3 ]] || die "usage: netem.sh up PREFIX N RATE_BIT [DELAY_MS] [LOSS_PCT]"; check; up "$@" ;;
  down) [[ $# -eq 2 ]] || die "usage: netem.sh down PREFIX"; down "$2" ;;
  gc) gc ;;
  *) die "usage: netem.sh check | up PREFIX N RATE_BIT [DELAY_MS] [LOSS_PCT] | down PREFIX | gc" ;;
esac
