#!/bin/sh
real=/usr/lib/rhaas/kexec
fire=
for a in "$@"; do
    case "$a" in -e|--exec) fire=1 ;; esac
done
[ -n "$fire" ] || exec $real "$@"
[ "$(cat /sys/kernel/kexec_loaded 2>/dev/null)" = 1 ] || exec $real "$@"
: > /run/rhaas-kexec-firing
for p in $(pidof dropbear); do
    [ "$(cut -d' ' -f4 /proc/$p/stat 2>/dev/null)" = 1 ] && kill "$p"
done
i=0
while pidof dropbear >/dev/null && [ $i -lt 30 ]; do
    usleep 100000
    i=$((i + 1))
done
# a cache disk must be clean before the jump (kexec does not flush or unmount)
ro=
sync
for m in $(awk '$1 ~ "^/dev/vd" && $4 ~ "^rw" {print $2}' /proc/mounts); do
    : > "$m/.rhaas-clean"  # put away cleanly: the next boot may trust it (rc.sh)
    sync
    mount -o remount,ro "$m" && ro="$ro $m"
done
$real "$@"
rc=$?
for m in $ro; do mount -o remount,rw "$m" && rm -f "$m/.rhaas-clean"; done
rm -f /run/rhaas-kexec-firing
exit $rc
