set -x
dmsetup create low --table "0 8192 linear /dev/vda 0"
dmsetup create m --table "0 1024 mirror core 1 512 2 /dev/mapper/low 4096 /dev/vdb 0"
dmsetup deps m
dmsetup create two --table "0 100 linear /dev/vdb 0
100 100 linear /dev/vda 0
200 100 linear /dev/mapper/low 0"
dmsetup deps two
dmsetup deps
