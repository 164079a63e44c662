#!/usr/bin/env bash
# Benchmark for issue #6: the same guest-side block I/O through Tessera's core and through QEMU's, on the same
# backend (one tessera-blk serving one raw image on tmpfs), both with their software CPUs (`-accel tcg`: this
# host has no hardware virtualization). Debian's kernel + a busybox initramfs run dd phases on /dev/vda
# between markers on the serial console; the host timestamps the markers (guest clocks cannot be compared:
# Tessera's software CPU counts instructions for guest time), so each phase's wall time includes the CPU
# emulation of the guest's block layer and driver as well as the virtio/vhost-user path.
#
# usage: benches/virtio-blk/run.sh [rounds (default 3)]     Prints a markdown table; alternates the VMMs.
set -euo pipefail
rounds=${1:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
here=$root/benches/virtio-blk
cargo build --quiet --release --locked --manifest-path "$root/Cargo.toml" --bins
bin=$root/target/release
kernel=$(ls -1 /boot/vmlinuz-* | sort -V | tail -n 1)
release=${kernel#/boot/vmlinuz-}
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 not found (scripts/install-deps.sh)" >&2; exit 1; }

work=$(mktemp -d)
blk_pid=
cleanup() {
    [ -n "$blk_pid" ] && kill "$blk_pid" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$work" "/dev/shm/tessera-vbench-$$.img"
}
trap cleanup EXIT

# The initramfs: busybox, the virtio modules (decompressed, in load order), and an init that times nothing
# itself but prints a marker before and after each phase.
mkdir -p "$work/root"/{bin,proc,sys,dev,mods}
cp /bin/busybox "$work/root/bin/busybox"
n=0
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    f=$(find "/lib/modules/$release/kernel/drivers" -name "$m.ko*" | head -n 1)
    [ -n "$f" ] || { echo "module $m not found for $release" >&2; exit 1; }
    n=$((n + 1))
    case $f in
        *.xz) xz -dc "$f" > "$work/root/mods/$n-$m.ko" ;;
        *.zst) zstd -qdc "$f" > "$work/root/mods/$n-$m.ko" ;;
        *) cp "$f" "$work/root/mods/$n-$m.ko" ;;
    esac
done
cat > "$work/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1
for m in /mods/*.ko; do insmod "$m" || echo "insmod $m failed"; done
while [ ! -b /dev/vda ]; do sleep 0.1; done
phase() { echo "@@ begin $1"; shift; "$@" 2>/dev/null || echo "I/O error: $*"; echo "@@ end"; }
phase seq-read-1M   dd if=/dev/vda of=/dev/null bs=1M count=128 iflag=direct
phase seq-write-1M  dd if=/dev/zero of=/dev/vda bs=1M count=128 oflag=direct
phase read-4k-QD1   dd if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct
phase write-4k-QD1  dd if=/dev/zero of=/dev/vda bs=4k count=4096 oflag=direct
echo "@@ done"
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd"

img=/dev/shm/tessera-vbench-$$.img
truncate -s 256M "$img"
sock=$work/blk.sock
"$bin/tessera-blk" --socket-path "$sock" --image "$img" --format raw >"$work/blk.log" 2>&1 &
blk_pid=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done

common=(-accel tcg -m 512M -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem
    -kernel "$kernel" -initrd "$work/initrd" -append "console=ttyS0 quiet" -nographic
    -chardev "socket,id=c0,path=$sock")
tessera_cmd=("$bin/tessera" "${common[@]}" -device vhost-user-blk-pci,chardev=c0,num-queues=1)
# QEMU 7.2: the same device; `-nodefaults` is implied by nothing, so give it no NIC to match Tessera.
qemu_cmd=(qemu-system-x86_64 "${common[@]}" -nic none -device vhost-user-blk-pci,chardev=c0,num-queues=1)

results=$work/results
: > "$results"
for r in $(seq "$rounds"); do
    for vmm in tessera qemu; do
        if [ $vmm = tessera ]; then cmd=("${tessera_cmd[@]}"); else cmd=("${qemu_cmd[@]}"); fi
        if ! timeout 600 python3 "$here/timer.py" "$vmm" "$r" "${cmd[@]}" >> "$results" 2>"$work/err"; then
            echo "$vmm round $r failed:" >&2; cat "$work/err" >&2; exit 1
        fi
    done
done

python3 "$here/timer.py" --summary "$results"
echo
echo "tessera-blk RSS at the end: $(awk '/^VmRSS/{print $2 " kB"}' "/proc/$blk_pid/status")"
