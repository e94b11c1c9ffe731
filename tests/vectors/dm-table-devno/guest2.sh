set -x
dmsetup create x --table "0 8192 linear /dev/vda 0"
gdd if=/dev/zero of=/dev/mapper/x bs=4096 count=1 oflag=direct
dmsetup suspend x
dmsetup info -c -o name,attr,open x
dmsetup remove x; echo "rc=$?"
dmsetup create y --table "0 8192 linear /dev/vda 0"
dmsetup suspend y
gdd if=/dev/mapper/y of=/dev/null bs=4096 count=1 iflag=direct &
sleep 1
dmsetup info -c -o name,attr,open y
dmsetup remove y; echo "rc=$?"
dmsetup resume y
wait
dmsetup remove y; echo "rc=$?"
