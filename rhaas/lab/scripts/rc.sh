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
cache=/run/rhaas
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rhaas_ip=*|rhaas.ip=*) ipspec=${arg#*=} ;;
        rhaas.hostname=*) host=${arg#*=} ;;
        rhaas.cache=/*) cache=${arg#*=} ;;
    esac
done
hostname "$host"

# The node's image cache disk (virtio-blk, serial rhaas-cache), if it has one: ext2, made on
# first use, mounted at the cache directory so images survive kexec and power cycles. The
# kexec wrapper leaves .rhaas-clean on it when it puts it away before a jump; a disk without
# it was cut off mid-use (a power cycle), and an ext2 cut off may hand one block to two files
# (there is no fsck here), so it is made anew: it is only a cache.
cachefs=ram
disk=
for b in /sys/block/vd*; do
    [ "$(cat "$b/serial" 2>/dev/null)" = rhaas-cache ] && disk=/dev/${b##*/}
done
if [ -n "$disk" ]; then
    mkdir -p "$cache"
    if mount -t ext4 -o noatime "$disk" "$cache" 2>/dev/null; then
        if [ -f "$cache/.rhaas-clean" ]; then
            rm -f "$cache/.rhaas-clean"
            sync
            cachefs=disk
        else
            umount "$cache"
        fi
    fi
    if [ "$cachefs" != disk ]; then
        echo "rhaas: formatting the cache disk $disk"
        if mke2fs -F -L rhaas-cache "$disk" >/dev/null 2>&1 && mount -t ext4 -o noatime "$disk" "$cache"; then
            cachefs=disk-new
        else
            echo "rhaas: cache disk $disk unusable; the cache stays in RAM"
        fi
    fi
    chmod 0755 "$cache"
fi
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

echo "RHAAS-READY image=$image cache=$cachefs uptime=$(cut -d' ' -f1 /proc/uptime) boot_id=$(cat /proc/sys/kernel/random/boot_id) cmdline=$(cat /proc/cmdline)"
