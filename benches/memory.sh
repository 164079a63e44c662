#!/usr/bin/env bash
# Memory of the process graph against one QEMU, same guest, same run: RSS beyond guest RAM per process.
# Guest RAM is a memfd in both (QEMU: memory-backend-memfd), so it shows as RssShmem and is left out; what is
# reported is RssAnon + RssFile (heap, stacks, code, libraries).
# usage: benches/memory.sh [ACCEL]   (kvm by default; tcg once the software CPU runs the guest)
set -euo pipefail
cd "$(dirname "$0")/.."
accel=${1:-kvm}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
cargo build --release --bins --locked -q
cat > "$work/g.S" <<'ASM'
    .code32
    .text
    .globl _start
_start:
    mov $0x3f8, %dx
    mov $'.', %al
    outb %al, %dx
1:  cli
    hlt
    jmp 1b
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4, 4, 18
    .asciz "Xen"
    .p2align 2
    .long _start
ASM
printf 'ENTRY(_start)\nSECTIONS { . = 0x100000; .text : { *(.text*) } .note.Xen : { *(.note.Xen) } }\n' > "$work/g.ld"
as --32 -o "$work/g.o" "$work/g.S"
ld -m elf_i386 --no-warn-rwx-segments -T "$work/g.ld" -o "$work/g.elf" "$work/g.o"

rss() { # pid -> "anon+file KiB"
    awk '/^RssAnon|^RssFile/ {s += $2} END {print s}' "/proc/$1/status"
}

truncate -s 64M "$work/disk.img" "$work/qdisk.img"
# A disk and a NIC too, so that the graph has its block and network processes (QEMU serves both in-process).
args=(-accel "$accel" -m 256M -kernel "$work/g.elf" -serial "file:$work/serial" -display none
    -drive "file=$work/disk.img,if=virtio,format=raw" -nic user,model=virtio-net-pci)
target/release/tessera "${args[@]}" & launcher=$!
qargs=("${args[@]/file:$work\/serial/file:$work/qserial}")
qemu-system-x86_64 "${qargs[@]/disk.img/qdisk.img}" \
    -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem & qemu=$!
sleep 3
echo "| process | RSS beyond guest RAM (KiB) |"
echo "|---|---|"
total=$(rss $launcher)
echo "| tessera (launcher) | $total |"
for c in $(cat /proc/$launcher/task/$launcher/children); do
    r=$(rss "$c"); total=$((total + r))
    echo "| $(cat /proc/$c/comm) | $r |"
done
echo "| **Tessera, whole graph** | **$total** |"
q=$(rss $qemu)
echo "| **QEMU $(qemu-system-x86_64 -version | head -1 | awk '{print $4}') (one process)** | **$q** |"
echo
echo "ratio (graph / QEMU): $(awk -v a=$total -v b=$q 'BEGIN {printf "%.2f", a/b}')"
