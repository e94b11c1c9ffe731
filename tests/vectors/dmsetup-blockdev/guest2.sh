set -x
dmsetup create ro -r --table "0 2048 linear /dev/vda 0"
dmsetup suspend ro
dmsetup info ro
dmsetup resume ro
dmsetup create up --table "0 1024 linear /dev/mapper/ro 0"
dmsetup deps up
dmsetup info -c -o name,devno,blkdevname up
dmsetup info -j 253 -m 7; echo "rc=$?"
dmsetup info -j 253; echo "rc=$?"
exec 3</dev/mapper/up
dmsetup remove_all; echo "ra=$?"
dmsetup ls
dmsetup remove_all --deferred; echo "rad=$?"
dmsetup info up
dmsetup info -c -o name,attr up
dmsetup message up 0 @cancel_deferred_remove; echo "cancel=$?"
dmsetup info up
dmsetup message up 0 @cancel_deferred_remove; echo "cancel2=$?"
dmsetup suspend ro; dmsetup remove --deferred up; echo "defsusp=$?"
dmsetup info up
dmsetup resume ro
exec 3<&-
sleep 0.3
dmsetup ls
dmsetup remove_all --force; echo "raf=$?"
dmsetup ls
