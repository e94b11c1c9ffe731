set -x
dmsetup create low --table "0 8192 linear /dev/vda 0"
dmsetup create a --table "0 1024 linear 254:0 2048"
dmsetup create up1 --table "0 1024 linear /dev/mapper/low 0"
dmsetup create up2 --table "0 1024 linear /dev/dm-0 1024"
dmsetup create up3 --table "0 1024 linear 253:0 2048"
dmsetup table
dmsetup table low
dmsetup create m --table "0 1024 mirror core 1 512 2 /dev/mapper/low 4096 /dev/vda 16384"
sleep 1
dmsetup table m
dmsetup status m
dmsetup create dl --table "0 1024 delay /dev/mapper/low 0 10 /dev/vda 0 20"
dmsetup table dl
dmsetup status dl
dmsetup create fl --table "0 1024 flakey /dev/mapper/low 0 1 1"
dmsetup table fl
dmsetup create sn --table "0 8192 snapshot /dev/mapper/low /dev/vdb P 8"
dmsetup table sn
dmsetup status sn
dmsetup table up3 > /tmp/t3; cat /tmp/t3
dmsetup reload up1 /tmp/t3; echo "rc=$?"
dmsetup resume up1
dmsetup table up1
dmsetup deps up1
ls -l /dev/mapper
rm /dev/mapper/up1
ln -s ../dm-0 /dev/mapper/up2x
mknod /dev/mapper/stale b 253 99
touch /dev/mapper/plainfile
dmsetup mknodes up1; echo "mk=$?"
ls -l /dev/mapper
rm /dev/mapper/up1
dmsetup mknodes; echo "mk=$?"
ls -l /dev/mapper
rm /dev/mapper/a; ln -s ../dm-0 /dev/mapper/a
dmsetup mknodes a; echo "mk=$?"
ls -l /dev/mapper/a
dmsetup mknodes nosuch; echo "mk=$?"
