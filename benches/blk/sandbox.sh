#!/usr/bin/env bash
# Benchmark: the cost of the sandbox on tessera-blk's data path (issue 7, item 5). The same release
# tessera-blk serves the same raw image twice at once, once unconfined and once confined exactly as the
# launcher confines it (TESSERA_SANDBOX=v1,on: namespaces, empty root, no capabilities, Landlock, the blk
# seccomp filter; as root also -runas nobody), and the same client (benches/blk, libblkio) drives each in
# turn, alternating who goes first. Prints a markdown table: IOPS (or MiB/s) and backend CPU per request,
# confined / unconfined.
#
# usage: benches/blk/sandbox.sh [seconds-per-run (default 5)] [image-size-MiB (default 1024)]
# Environment: BLK_SANDBOX overrides the confined instance's TESSERA_SANDBOX (e.g. v1,off for an A/A run that
# shows what the two instances differ by without any sandbox).
set -euo pipefail
secs=${1:-5}
size_mib=${2:-1024}
root=$(cd "$(dirname "$0")/../.." && pwd)

cargo build --quiet --release --manifest-path "$root/Cargo.toml" -p tessera-blk
cargo build --quiet --release --manifest-path "$root/benches/blk/Cargo.toml"
client=$root/benches/blk/target/release/tessera-blk-bench
blk=$root/target/release/tessera-blk

work=$(mktemp -d)
chmod 755 "$work"
img=/dev/shm/tessera-sandbox-bench-$$.img
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work" "$img"
}
trap cleanup EXIT

sandbox=v1,on
if [ "$(id -u)" = 0 ]; then sandbox=v1,on,runas=65534:65534; fi
sandbox=${BLK_SANDBOX:-$sandbox}

workloads=("randread 4096 1" "randread 4096 32" "randwrite 4096 1" "randwrite 4096 32" "read 1048576 4" "write 1048576 4")

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run_one SOCKET PID WORKLOAD... -> "iops cpu-us-per-request"
run_one() {
    local sock=$1 pid=$2; shift 2
    local c0; c0=$(cpu_ticks "$pid")
    local out; out=$("$client" "$sock" "$@" "$secs")
    local c1; c1=$(cpu_ticks "$pid")
    local iops; iops=$(sed -n 's/.* iops=\([0-9]*\).*/\1/p' <<<"$out")
    awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v i="$iops" -v s="$secs" \
        'BEGIN{ if (i > 0) printf "%d %.1f\n", i, t / hz * 1e6 / (i * s); else print "0 n/a" }'
}

wait_sock() {
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "socket $1 did not appear" >&2; return 1
}

dd if=/dev/urandom of="$img" bs=1M count="$size_mib" status=none
# Both serve the same file (each runs only while the other is idle): no image locks.
"$blk" --socket-path "$work/open.sock" --image "$img" --format raw --no-locking 2>"$work/open.log" &
open_pid=$!; pids+=("$open_pid")
TESSERA_SANDBOX=$sandbox RUST_LOG=debug \
    "$blk" --socket-path "$work/conf.sock" --image "$img" --format raw --no-locking 2>"$work/conf.log" &
conf_pid=$!; pids+=("$conf_pid")
wait_sock "$work/open.sock"; wait_sock "$work/conf.sock"
if [ -z "${BLK_SANDBOX:-}" ]; then
    grep -q "sandboxed:" "$work/conf.log" || { echo "the confined tessera-blk did not report its sandbox:" >&2; cat "$work/conf.log" >&2; exit 1; }
    seccomp=$(awk '/^Seccomp:/{print $2}' "/proc/$conf_pid/status")
    [ "$seccomp" = 2 ] || { echo "the confined tessera-blk has Seccomp $seccomp" >&2; exit 1; }
fi
cat "$img" >/dev/null

echo "Machine: $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg) at start;"
echo "${secs}s per run, ${size_mib} MiB raw image of random data on tmpfs, 1 queue; confined: TESSERA_SANDBOX=$sandbox"
echo "($(grep -o 'sandbox.*' "$work/conf.log" | head -1))."
echo
echo "| workload | unconfined | confined | confined / unconfined | unconfined CPU µs/req | confined CPU µs/req |"
echo "|---|---|---|---|---|---|"
n=0
for w in "${workloads[@]}"; do
    n=$((n + 1))
    if [ $((n % 2)) = 1 ]; then
        # shellcheck disable=SC2086
        read -r oi ocpu < <(run_one "$work/open.sock" "$open_pid" $w)
        # shellcheck disable=SC2086
        read -r ci ccpu < <(run_one "$work/conf.sock" "$conf_pid" $w)
    else
        # shellcheck disable=SC2086
        read -r ci ccpu < <(run_one "$work/conf.sock" "$conf_pid" $w)
        # shellcheck disable=SC2086
        read -r oi ocpu < <(run_one "$work/open.sock" "$open_pid" $w)
    fi
    set -- $w
    name="$1 $(( $2 >= 1048576 ? $2 / 1048576 : $2 / 1024 ))$([ "$2" -ge 1048576 ] && echo M || echo k) QD$3"
    unit=IOPS
    if [ "$2" -ge 1048576 ]; then oi=$(( oi * $2 / 1048576 )); ci=$(( ci * $2 / 1048576 )); unit=MiB/s; fi
    printf "| %s | %s %s | %s %s | %s | %s | %s |\n" "$name" "$oi" "$unit" "$ci" "$unit" \
        "$(awk -v a="$ci" -v b="$oi" 'BEGIN{ if (b>0) printf "%.2fx", a/b; else print "n/a" }')" "$ocpu" "$ccpu"
done
# Still alive and still confined after the runs (a filter that killed it would show here).
kill -0 "$conf_pid" || { echo "the confined tessera-blk died:" >&2; cat "$work/conf.log" >&2; exit 1; }
