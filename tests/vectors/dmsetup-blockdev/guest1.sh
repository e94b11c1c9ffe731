set -x
dmsetup create ro --readonly --table "0 2048 linear /dev/vda 0"
dmsetup create rw -u UUID-RW --table "0 1024 linear /dev/vda 4096"
dmsetup ls
dmsetup info ro
dmsetup info rw
dmsetup info -c
dmsetup info -c -o name,attr,readonly,devno,major,minor,blkdevname
dmsetup info -c --noheadings -o blkdevname,devno ro
dmsetup deps
dmsetup deps ro
dmsetup info -j 253 -m 1
dmsetup info -c -j 253 -m 0
dmsetup info -u UUID-RW
dmsetup table ro
dmsetup status ro
gdd if=/dev/zero of=/dev/mapper/ro bs=4096 count=1 oflag=direct; echo "rc=$?"
gdd if=/dev/zero of=/dev/dm-0 bs=4096 count=1 oflag=direct conv=notrunc; echo "rc=$?"
cat /sys/block/dm-0/ro
blockdev --getro /dev/mapper/ro
# reload ro without -r
dmsetup load ro --table "0 2048 linear /dev/vda 0"
dmsetup info -c -o name,attr ro
dmsetup resume ro
dmsetup info -c -o name,attr,readonly ro
dmsetup load ro -r --table "0 2048 linear /dev/vda 0"
dmsetup resume ro
dmsetup info -c -o name,attr,readonly ro
dmsetup mknodes ro; echo "mk=$?"
# deferred remove
exec 3</dev/mapper/rw
dmsetup remove --deferred rw; echo "rc=$?"
dmsetup info rw
dmsetup info -c -o name,attr rw
dmsetup ls
exec 3<&-
sleep 0.5
dmsetup info rw; echo "rc=$?"
# force remove while open
dmsetup create ff --table "0 1024 linear /dev/vda 0"
exec 4</dev/mapper/ff
dmsetup remove ff; echo "plain=$?"
dmsetup remove --force ff; echo "force=$?"
dmsetup info ff
dmsetup table ff
dmsetup ls
exec 4<&-
dmsetup remove ff; echo "after=$?"
# exclusive claim
dmsetup create ex --table "0 1024 linear /dev/vda 0"
exec 5</dev/vda; echo "plainopen=$?"
exec 5<&-
busybox sh -c 'exec 6<>/dev/vda' ; echo "rwopen=$?"
dmsetup create ex2 --table "0 1024 linear 254:0 2048"; echo "second=$?"
dmsetup remove ex ex2
dmsetup remove ro
