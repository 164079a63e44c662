#!/usr/bin/env bash
# Builds a busybox initramfs (gzip'd newc cpio) from Debian's busybox-static.
# usage: mkinitramfs.sh OUTPUT.cpio.gz [INIT-SCRIPT]
# Without INIT-SCRIPT the guest mounts /proc, /sys and /dev and starts an interactive shell on the console.
set -euo pipefail
out=$1
init=${2:-}
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "mkinitramfs: $busybox not found (apt-get install busybox-static)" >&2; exit 1; }
file -L "$busybox" 2>/dev/null | grep -q "statically linked" || ldd "$busybox" 2>&1 | grep -q "not a dynamic" || {
    echo "mkinitramfs: $busybox is not static (apt-get install busybox-static)" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,root}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
if [ -n "$init" ]; then
    cp "$init" "$root/init"
else
    cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo
echo "Tessera guest: $(uname -sr), busybox initramfs. 'poweroff -f' ends the VM."
exec setsid cttyhack sh -l
INIT
fi
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out"
