#!/usr/bin/env bash
# Benchmark: tessera-blk against qemu-storage-daemon's vhost-user-blk export, same raw image file,
# same independent client (benches/blk: libblkio's virtio-blk-vhost-user driver via the `blkio`
# crate). Prints a markdown table of IOPS and ratios, and each backend's RSS sampled mid-run.
#
# usage: benches/blk/run.sh [seconds-per-run (default 5)] [image-size-MiB (default 1024)]
# Environment: BENCH_DISK_DIR (default /var/tmp) for the on-disk image; tmpfs is /dev/shm.
set -euo pipefail
secs=${1:-5}
size_mib=${2:-1024}
root=$(cd "$(dirname "$0")/../.." && pwd)
disk_dir=${BENCH_DISK_DIR:-/var/tmp}

cargo build --quiet --release --manifest-path "$root/Cargo.toml" -p tessera-blk
cargo build --quiet --release --manifest-path "$root/benches/blk/Cargo.toml"
client=$root/benches/blk/target/release/tessera-blk-bench
tessera=$root/target/release/tessera-blk
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon not found (qemu-utils)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work" /dev/shm/tessera-bench-$$.img /dev/shm/tessera-bench-$$.img.qcow2 "$disk_dir/tessera-bench-$$.img"
}
trap cleanup EXIT

workloads=("randread 4096 1" "randread 4096 32" "randwrite 4096 1" "randwrite 4096 32" "read 1048576 4" "write 1048576 4")

# rss PID -> "VmRSS kB/RssShmem kB" (RssShmem: guest memory pages the backend touched).
rss() {
    awk '/^VmRSS/{r=$2} /^RssShmem/{s=$2} END{printf "%d/%d", r, s}' "/proc/$1/status"
}

# cpu_ticks PID -> utime+stime of all the process's threads, in clock ticks.
cpu_ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat"
}

# run_one SOCKET PID WORKLOAD... -> prints "iops rss cpu-us-per-request"
run_one() {
    local sock=$1 pid=$2; shift 2
    local out="$work/out.$RANDOM"
    local c0; c0=$(cpu_ticks "$pid")
    "$client" "$sock" "$@" "$secs" >"$out" &
    local cpid=$!
    sleep "$(awk -v s="$secs" 'BEGIN{print s/2}')"
    local r; r=$(rss "$pid")
    wait "$cpid"
    local c1; c1=$(cpu_ticks "$pid")
    local iops; iops=$(sed -n 's/.* iops=\([0-9]*\).*/\1/p' "$out")
    local cpu
    cpu=$(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v i="$iops" -v s="$secs" \
        'BEGIN{ if (i > 0) printf "%.1f", t / hz * 1e6 / (i * s); else print "n/a" }')
    echo "$iops $r $cpu"
}

wait_sock() {
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "socket $1 did not appear" >&2; return 1
}

# bench LABEL IMAGE DIRECT(0/1) [FORMAT (raw)]
bench() {
    local label=$1 img=$2 direct=$3 fmt=${4:-raw}
    local tsock=$work/t.sock qsock=$work/q.sock
    local targs=() qcache=off
    if [ "$direct" = 1 ]; then targs=(--direct --aio io_uring); qcache=on; fi
    # Both serve the very same file at once, so image locking is off on both sides (each runs
    # only while the other is idle).
    "$tessera" --socket-path "$tsock" --image "$img" --format "$fmt" --no-locking "${targs[@]}" 2>"$work/tessera.log" &
    local tpid=$!; pids+=("$tpid")
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$img,cache.direct=$qcache,locking=off" \
        --blockdev "driver=$fmt,node-name=disk0,file=file0" \
        --export "type=vhost-user-blk,id=exp0,addr.type=unix,addr.path=$qsock,node-name=disk0,writable=on,num-queues=1" \
        2>"$work/qsd.log" &
    local qpid=$!; pids+=("$qpid")
    wait_sock "$tsock"; wait_sock "$qsock"
    # Same starting point for both: the image in the page cache (irrelevant for O_DIRECT).
    cat "$img" >/dev/null
    local w n=0
    for w in "${workloads[@]}"; do
        # Alternate who goes first, so drift in the machine's load does not favour one side.
        n=$((n + 1))
        if [ $((n % 2)) = 1 ]; then
            # shellcheck disable=SC2086
            read -r ti trss tcpu < <(run_one "$tsock" "$tpid" $w)
            # shellcheck disable=SC2086
            read -r qi qrss qcpu < <(run_one "$qsock" "$qpid" $w)
        else
            # shellcheck disable=SC2086
            read -r qi qrss qcpu < <(run_one "$qsock" "$qpid" $w)
            # shellcheck disable=SC2086
            read -r ti trss tcpu < <(run_one "$tsock" "$tpid" $w)
        fi
        set -- $w
        local name="$1 $(( $2 >= 1048576 ? $2 / 1048576 : $2 / 1024 ))$([ "$2" -ge 1048576 ] && echo M || echo k) QD$3"
        local unit="IOPS"
        if [ "$2" -ge 1048576 ]; then
            ti=$(( ti * $2 / 1048576 )); qi=$(( qi * $2 / 1048576 )); unit="MiB/s"
        fi
        printf "| %s | %s | %s %s | %s %s | %s | %s | %s | %s | %s |\n" "$label" "$name" "$ti" "$unit" "$qi" "$unit" \
            "$(awk -v a="$ti" -v b="$qi" 'BEGIN{ if (b>0) printf "%.2fx", a/b; else print "n/a" }')" \
            "$tcpu" "$qcpu" "$trss" "$qrss"
    done
    kill "$tpid" "$qpid"; wait "$tpid" "$qpid" 2>/dev/null || true
    rm -f "$tsock" "$qsock"
}

echo "Machine: $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg) at start;"
echo "${secs}s per run, ${size_mib} MiB image of random data, 1 queue; qemu-storage-daemon $(qemu-storage-daemon --version | head -1 | awk '{print $NF}') with its defaults (aio=threads)."
echo "RSS columns: VmRSS/RssShmem in kB sampled mid-run (RssShmem = guest-memory pages mapped by the backend)."
echo
echo "CPU columns: backend CPU time (all threads, user+system) per request, in microseconds."
echo
echo "| image on | workload | tessera-blk | qemu-storage-daemon | ratio | tessera CPU µs/req | qsd CPU µs/req | tessera RSS kB | qsd RSS kB |"
echo "|---|---|---|---|---|---|---|---|---|"
shm=/dev/shm/tessera-bench-$$.img
dd if=/dev/urandom of="$shm" bs=1M count="$size_mib" status=none
bench "tmpfs" "$shm" 0
# qcow2 with every cluster allocated (converted from the random raw image), 64 KiB clusters.
qemu-img convert -f raw -O qcow2 "$shm" "$shm.qcow2"
bench "tmpfs, qcow2" "$shm.qcow2" 0 qcow2
rm -f "$shm" "$shm.qcow2"
dimg=$disk_dir/tessera-bench-$$.img
dd if=/dev/urandom of="$dimg" bs=1M count="$size_mib" status=none conv=fsync
bench "disk, page cache" "$dimg" 0
bench "disk, O_DIRECT" "$dimg" 1
