#!/usr/bin/env bash
# The main job: install what is needed, build Tessera, build a busybox initramfs, and boot Debian's kernel on
# Tessera with the guest's serial console on this terminal (Ctrl-A x quits, Ctrl-A h lists the keys).
# Extra arguments go to tessera (e.g. `-accel kvm` on a host with hardware virtualization).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins --locked
mkdir -p target/guest
bash scripts/mkinitramfs.sh target/guest/initramfs.cpio.gz
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -n 1)
exec target/release/tessera -m 512M -kernel "$kernel" -initrd target/guest/initramfs.cpio.gz \
    -append "console=ttyS0 earlyprintk=serial,ttyS0 nokaslr" -nographic "$@"
