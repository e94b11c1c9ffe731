#!/bin/sh
# helpers; gdd = GNU dd (real O_DIRECT)
up() { cut -d' ' -f1 /proc/uptime; }   # seconds since boot, 10 ms resolution
ms_since() { echo "$(( ($(up | tr -d .) - $(echo "$1" | tr -d .)) * 10 ))"; }
kerr() { dmesg | grep 'device-mapper: table' | tail -n1 | sed 's/^\[[ 0-9.]*\] //'; }
echo "@@BEGIN 0"
( for d in /sys/block/vd*; do echo "/dev/${d##*/} $(cat $d/dev) $(cat $d/size) sectors"; done
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 0 %s\n" $rc
echo "@@BEGIN 1"
( dmsetup targets | grep -E '^(error|delay) '
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 1 %s\n" $rc
echo "@@BEGIN 2"
( dmsetup create e0 --table '0 8192 error'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 2 %s\n" $rc
echo "@@BEGIN 3"
( dmsetup table e0
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 3 %s\n" $rc
echo "@@BEGIN 4"
( dmsetup status e0
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 4 %s\n" $rc
echo "@@BEGIN 5"
( dmsetup create e2 --table '0 8192 error /dev/vda 0'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 5 %s\n" $rc
echo "@@BEGIN 6"
( dmsetup table e2
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 6 %s\n" $rc
echo "@@BEGIN 7"
( dmsetup status e2
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 7 %s\n" $rc
echo "@@BEGIN 8"
( dmsetup create e2x --table '0 8192 error /dev/vda x'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 8 %s\n" $rc
echo "@@BEGIN 9"
( dmsetup table e2x
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 9 %s\n" $rc
echo "@@BEGIN 10"
( dmsetup status e2x
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 10 %s\n" $rc
echo "@@BEGIN 11"
( dmsetup create e2n --table '0 8192 error /dev/nonexistent 0'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 11 %s\n" $rc
echo "@@BEGIN 12"
( dmsetup table e2n
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 12 %s\n" $rc
echo "@@BEGIN 13"
( dmsetup status e2n
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 13 %s\n" $rc
echo "@@BEGIN 14"
( dmsetup create e3 --table '0 8192 error a b c'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 14 %s\n" $rc
echo "@@BEGIN 15"
( dmsetup table e3
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 15 %s\n" $rc
echo "@@BEGIN 16"
( dmsetup status e3
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 16 %s\n" $rc
echo "@@BEGIN 17"
( dmsetup create d3 --table '0 8192 delay /dev/vda 0 100'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 17 %s\n" $rc
echo "@@BEGIN 18"
( dmsetup table d3
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 18 %s\n" $rc
echo "@@BEGIN 19"
( dmsetup status d3
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 19 %s\n" $rc
echo "@@BEGIN 20"
( dmsetup create d6 --table '0 4096 delay /dev/vda 0 0 /dev/vdb 16 50'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 20 %s\n" $rc
echo "@@BEGIN 21"
( dmsetup table d6
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 21 %s\n" $rc
echo "@@BEGIN 22"
( dmsetup status d6
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 22 %s\n" $rc
echo "@@BEGIN 23"
( dmsetup create d6big --table '0 8192 delay /dev/vda 0 0 /dev/vdb 16 50'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 23 %s\n" $rc
echo "@@BEGIN 24"
( dmsetup table d6big
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 24 %s\n" $rc
echo "@@BEGIN 25"
( dmsetup status d6big
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 25 %s\n" $rc
echo "@@BEGIN 26"
( dmsetup create d9 --table '0 4096 delay /dev/vda 2048 10 /dev/vdb 0 20 /dev/vdc 8 0'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 26 %s\n" $rc
echo "@@BEGIN 27"
( dmsetup table d9
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 27 %s\n" $rc
echo "@@BEGIN 28"
( dmsetup status d9
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 28 %s\n" $rc
echo "@@BEGIN 29"
( dmsetup create d9z --table '0 4096 delay /dev/vda 0 0 /dev/vdb 0 0 /dev/vdc 0 0'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 29 %s\n" $rc
echo "@@BEGIN 30"
( dmsetup table d9z
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 30 %s\n" $rc
echo "@@BEGIN 31"
( dmsetup status d9z
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 31 %s\n" $rc
echo "@@BEGIN 32"
( dmsetup create b1 --table '0 8192 delay /dev/vda 0'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 32 %s\n" $rc
echo "@@BEGIN 33"
( dmsetup table b1
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 33 %s\n" $rc
echo "@@BEGIN 34"
( dmsetup status b1
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 34 %s\n" $rc
echo "@@BEGIN 35"
( dmsetup create b4 --table '0 8192 delay /dev/vda 0 1 /dev/vdb'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 35 %s\n" $rc
echo "@@BEGIN 36"
( dmsetup table b4
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 36 %s\n" $rc
echo "@@BEGIN 37"
( dmsetup status b4
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 37 %s\n" $rc
echo "@@BEGIN 38"
( dmsetup create b7 --table '0 8192 delay /dev/vda 0 1 /dev/vdb 0 1 /dev/vdc'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 38 %s\n" $rc
echo "@@BEGIN 39"
( dmsetup table b7
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 39 %s\n" $rc
echo "@@BEGIN 40"
( dmsetup status b7
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 40 %s\n" $rc
echo "@@BEGIN 41"
( dmsetup create b10 --table '0 8192 delay /dev/vda 0 1 /dev/vdb 0 1 /dev/vdc 0 1 x'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 41 %s\n" $rc
echo "@@BEGIN 42"
( dmsetup table b10
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 42 %s\n" $rc
echo "@@BEGIN 43"
( dmsetup status b10
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 43 %s\n" $rc
echo "@@BEGIN 44"
( dmsetup create bo --table '0 8192 delay /dev/vda x 1'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 44 %s\n" $rc
echo "@@BEGIN 45"
( dmsetup table bo
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 45 %s\n" $rc
echo "@@BEGIN 46"
( dmsetup status bo
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 46 %s\n" $rc
echo "@@BEGIN 47"
( dmsetup create bo2 --table '0 8192 delay /dev/vda -1 1'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 47 %s\n" $rc
echo "@@BEGIN 48"
( dmsetup table bo2
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 48 %s\n" $rc
echo "@@BEGIN 49"
( dmsetup status bo2
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 49 %s\n" $rc
echo "@@BEGIN 50"
( dmsetup create bd --table '0 8192 delay /dev/vda 0 x'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 50 %s\n" $rc
echo "@@BEGIN 51"
( dmsetup table bd
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 51 %s\n" $rc
echo "@@BEGIN 52"
( dmsetup status bd
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 52 %s\n" $rc
echo "@@BEGIN 53"
( dmsetup create bd2 --table '0 8192 delay /dev/vda 0 4294967296'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 53 %s\n" $rc
echo "@@BEGIN 54"
( dmsetup table bd2
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 54 %s\n" $rc
echo "@@BEGIN 55"
( dmsetup status bd2
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 55 %s\n" $rc
echo "@@BEGIN 56"
( dmsetup create bd3 --table '0 8192 delay /dev/vda 0 4294967295'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 56 %s\n" $rc
echo "@@BEGIN 57"
( dmsetup table bd3
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 57 %s\n" $rc
echo "@@BEGIN 58"
( dmsetup status bd3
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 58 %s\n" $rc
echo "@@BEGIN 59"
( dmsetup create bn --table '0 8192 delay /dev/nonexistent 0 1'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 59 %s\n" $rc
echo "@@BEGIN 60"
( dmsetup table bn
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 60 %s\n" $rc
echo "@@BEGIN 61"
( dmsetup status bn
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 61 %s\n" $rc
echo "@@BEGIN 62"
( dmsetup create bn2 --table '0 8192 delay /dev/nonexistent x 1'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 62 %s\n" $rc
echo "@@BEGIN 63"
( dmsetup table bn2
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 63 %s\n" $rc
echo "@@BEGIN 64"
( dmsetup status bn2
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 64 %s\n" $rc
echo "@@BEGIN 65"
( dmsetup create bw --table '0 8192 delay /dev/vda 0 1 /dev/vdb y 1'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 65 %s\n" $rc
echo "@@BEGIN 66"
( dmsetup table bw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 66 %s\n" $rc
echo "@@BEGIN 67"
( dmsetup status bw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 67 %s\n" $rc
echo "@@BEGIN 68"
( dmsetup create bwd --table '0 8192 delay /dev/vda 0 1 /dev/vdb 0 -5'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 68 %s\n" $rc
echo "@@BEGIN 69"
( dmsetup table bwd
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 69 %s\n" $rc
echo "@@BEGIN 70"
( dmsetup status bwd
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 70 %s\n" $rc
echo "@@BEGIN 71"
( dmsetup create bf --table '0 8192 delay /dev/vda 0 1 /dev/vdb 0 1 /dev/nonexistent 0 1'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 71 %s\n" $rc
echo "@@BEGIN 72"
( dmsetup table bf
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 72 %s\n" $rc
echo "@@BEGIN 73"
( dmsetup status bf
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 73 %s\n" $rc
echo "@@BEGIN 74"
( dmsetup create bs --table '0 8192 delay /dev/vda 30000 1'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 74 %s\n" $rc
echo "@@BEGIN 75"
( dmsetup table bs
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 75 %s\n" $rc
echo "@@BEGIN 76"
( dmsetup status bs
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 76 %s\n" $rc
echo "@@BEGIN 77"
( printf 'delay-vector-sector-0001' > /tmp/p; gdd if=/dev/zero bs=488 count=1 status=none >> /tmp/p; gdd if=/tmp/p of=/dev/mapper/d6 bs=512 count=1 seek=3 oflag=direct status=none; gdd if=/dev/vdb bs=512 skip=19 count=1 iflag=direct status=none | head -c 24; echo; gdd if=/dev/vda bs=512 skip=3 count=1 iflag=direct status=none | head -c 24 | od -An -c | head -n1
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 77 %s\n" $rc
echo "@@BEGIN 78"
( gdd if=/dev/mapper/d6 bs=512 skip=3 count=1 iflag=direct status=none | head -c 24 | od -An -c | head -n1
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 78 %s\n" $rc
echo "@@BEGIN 79"
( gdd if=/dev/vda bs=512 skip=19 count=1 of=/tmp/a iflag=direct status=none; gdd if=/dev/mapper/d6 bs=512 skip=19 count=1 of=/tmp/b iflag=direct status=none; cmp /tmp/a /tmp/b && echo same
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 79 %s\n" $rc
echo "@@BEGIN 80"
( dmsetup create slow --table '0 8192 delay /dev/vda 0 3000 /dev/vdb 0 3000 /dev/vdc 0 3000'
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 80 %s\n" $rc
echo "@@BEGIN 81"
( gdd if=/dev/mapper/slow of=/dev/null bs=4096 count=1 iflag=direct status=none & sleep 1; dmsetup status slow; wait
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 81 %s\n" $rc
echo "@@BEGIN 82"
( blkdiscard -o 0 -l 4096 /dev/mapper/slow & sleep 1; dmsetup status slow; wait; echo discard rc=$?
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 82 %s\n" $rc
echo "@@BEGIN 83"
( gdd if=/dev/zero of=/dev/mapper/slow bs=4096 count=1 oflag=direct status=none & sleep 1; dmsetup status slow; wait
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 83 %s\n" $rc
echo "@@BEGIN 84"
( gdd if=/dev/null of=/dev/mapper/slow count=0 conv=notrunc,fsync status=none & sleep 1; dmsetup status slow; wait
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 84 %s\n" $rc
echo "@@BEGIN 85"
( gdd if=/dev/mapper/slow of=/dev/null bs=4096 count=1 iflag=direct status=none & sleep 1; dmsetup status slow; t0=$(up); dmsetup suspend slow; echo suspend_ms=$(ms_since $t0); dmsetup status slow; wait; echo read done; dmsetup info -c --noheadings -o attr slow
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 85 %s\n" $rc
echo "@@BEGIN 86"
( t0=$(up); gdd if=/dev/mapper/slow of=/dev/null bs=4096 count=1 iflag=direct status=none & sleep 1; dmsetup resume slow; wait; echo after_resume_ms=$(ms_since $t0); dmsetup status slow
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 86 %s\n" $rc
echo "@@BEGIN 87"
( t0=$(up); gdd if=/dev/mapper/d3 of=/dev/null bs=512 count=1 iflag=direct status=none; ms=$(ms_since $t0); [ $ms -ge 100 ] && echo read_took_at_least_100ms
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 87 %s\n" $rc
echo "@@BEGIN 88"
( dmsetup message d3 0 hello
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 88 %s\n" $rc
echo "@@BEGIN 89"
( for d in $(dmsetup ls | cut -f1); do dmsetup remove $d; done; dmsetup ls
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 89 %s\n" $rc
exit 0
