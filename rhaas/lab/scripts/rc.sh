#!/bin/sh
# rhaas lab guest init script (runs once from busybox init).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /tmp
chmod 1777 /tmp

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod.ko" || echo "rhaas: insmod $mod failed"
done < /etc/modules.order

image=$(cat /etc/rhaas-image)
ipspec=
host="rhaas-$image"
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rhaas_ip=*|rhaas.ip=*) ipspec=${arg#*=} ;;
        rhaas.hostname=*) host=${arg#*=} ;;
    esac
done
hostname "$host"
ip link set lo up

i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do
    usleep 50000
    i=$((i + 1))
done

if [ -n "$ipspec" ]; then
    addr=${ipspec%%,*}
    gw=
    case "$ipspec" in *,*) gw=${ipspec#*,} ;; esac
else
    addr=10.0.2.15/24
    gw=10.0.2.2
fi
ip addr add "$addr" dev eth0
ip link set eth0 up
[ -n "$gw" ] && ip route add default via "$gw"

echo "RHAAS-READY image=$image uptime=$(cut -d' ' -f1 /proc/uptime) boot_id=$(cat /proc/sys/kernel/random/boot_id) cmdline=$(cat /proc/cmdline)"
