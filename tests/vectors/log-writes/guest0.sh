#!/bin/sh
# gdd = GNU dd (real O_DIRECT); /files/wN = PATTERN(N) for the sectors written
kerr() { dmesg | grep 'device-mapper: table' | tail -n1 | sed 's/^\[[ 0-9.]*\] //'; }
echo "@@BEGIN 0"
( dmsetup targets | grep -E '^log-writes ' || { insmod /files/dm-log-writes-$(uname -r).ko; dmsetup targets | grep -E '^log-writes '; }
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 0 %s\n" $rc
echo "@@BEGIN 1"
( dmsetup create lw --table '0 8192 log-writes /dev/vda /dev/vdb'
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 1 %s\n" $rc
echo "@@BEGIN 2"
( dmsetup table lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 2 %s\n" $rc
echo "@@BEGIN 3"
( dmsetup status lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 3 %s\n" $rc
echo "@@BEGIN 4"
( gdd if=/files/w1 of=/dev/mapper/lw bs=4096 count=1 seek=4096 oflag=direct,seek_bytes status=none; dmsetup status lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 4 %s\n" $rc
echo "@@BEGIN 5"
( gdd if=/files/w2 of=/dev/mapper/lw bs=8192 count=1 seek=16384 oflag=direct,seek_bytes status=none conv=fsync; dmsetup status lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 5 %s\n" $rc
echo "@@BEGIN 6"
( dmsetup message lw 0 mark one; dmsetup status lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 6 %s\n" $rc
echo "@@BEGIN 7"
( blkdiscard -o 65536 -l 8192 /dev/mapper/lw; echo rc=$?; dmsetup status lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 7 %s\n" $rc
echo "@@BEGIN 8"
( gdd if=/files/w3 of=/dev/mapper/lw bs=4096 count=1 seek=102400 oflag=direct,seek_bytes,dsync status=none; dmsetup status lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 8 %s\n" $rc
echo "@@BEGIN 9"
( gdd if=/dev/null of=/dev/mapper/lw count=0 conv=notrunc,fsync status=none; dmsetup status lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 9 %s\n" $rc
echo "@@BEGIN 10"
( gdd if=/files/w4 of=/dev/mapper/lw bs=2048 count=1 seek=153600 oflag=direct,seek_bytes status=none; dmsetup status lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 10 %s\n" $rc
echo "@@BEGIN 11"
( dmsetup message lw 0 mark two; dmsetup status lw
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 11 %s\n" $rc
echo "@@BEGIN 12"
( dmsetup message lw 0 mark; echo rc=$?; dmsetup message lw 0 unmark x; echo rc=$?; dmsetup message lw 0 mark a b; echo rc=$?; dmesg | grep 'log-writes' | tail -n3 | sed 's/^\[[ 0-9.]*\] //'
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 12 %s\n" $rc
echo "@@BEGIN 13"
( dmsetup remove lw; dmsetup ls
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 13 %s\n" $rc
echo "@@BEGIN 14"
( gdd if=/dev/vdb bs=512 count=1 iflag=direct status=none | od -An -tx1 | head -n2
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 14 %s\n" $rc
echo "@@BEGIN 15"
( dmsetup create b1 --table '0 8192 log-writes /dev/vda'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 15 %s\n" $rc
echo "@@BEGIN 16"
( dmsetup create b2 --table '0 8192 log-writes /dev/nonexistent /dev/vdb'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 16 %s\n" $rc
echo "@@BEGIN 17"
( dmsetup create b3 --table '0 8192 log-writes /dev/vda /dev/nonexistent'; r=$?; [ $r = 0 ] || kerr; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 17 %s\n" $rc
echo "@@BEGIN 18"
( dmsetup create b4 --table '0 8192 log-writes /dev/vdc /dev/vdc extra'; r=$?; [ $r = 0 ] || kerr; dmsetup table b4; dmsetup remove b4; exit $r
) > /tmp/o 2>&1; rc=$?
cat /tmp/o; printf "\n@@END 18 %s\n" $rc
exit 0
