#!/bin/sh
# Builds a tiny initramfs (newc cpio, gzip) around Debian's busybox-static for the linux-boot example.
# Its /init writes to /dev/kmsg, so output reaches the serial console through printk's polled console
# even without UART interrupts.
# Usage: make-busybox-initrd.sh OUT.cpio.gz
set -eu
out=${1:?output path}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/bin" "$dir/dev" "$dir/proc" "$dir/sys"
cp /bin/busybox "$dir/bin/busybox"
ln -s busybox "$dir/bin/sh"
cat > "$dir/init" <<'INIT'
#!/bin/sh
/bin/busybox mount -t devtmpfs dev /dev
exec >/dev/kmsg 2>&1
echo "tessera-init: hello from user space"
/bin/busybox mount -t proc proc /proc
/bin/busybox uname -a
/bin/busybox ls /
/bin/busybox cat /proc/cpuinfo
/bin/busybox sh -c 'i=0; while [ $i -lt 100 ]; do i=$((i+1)); done; echo "tessera-init: loop done $i"'
echo "tessera-init: done"
/bin/busybox reboot -f
INIT
chmod +x "$dir/init"
(cd "$dir" && find . | cpio -o -H newc --quiet | gzip -9) > "$out"
