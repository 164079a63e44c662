#!/usr/bin/env bash
# Installs what Tessera's build, demo and tests need on Debian (bookworm): the reference QEMU and its tools
# (peers for differential tests and benchmarks), Debian's kernel and static busybox for guests.
# Idempotent: it does nothing when everything is there already.
set -euo pipefail

packages=(qemu-system-x86 qemu-utils linux-image-amd64 busybox-static cpio xz-utils e2fsprogs binutils tmux
    liblzma-dev pkg-config acpica-tools)
# tessera-net: libslirp (user-mode networking), iproute2 for the tap tests
packages+=(libslirp-dev libglib2.0-dev iproute2)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-utils must match qemu-system-x86: a newer qemu-utils from backports conflicts with Debian's QEMU 7.2.
if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '^1:10'; then
    missing+=(qemu-utils)
fi
if ! command -v cc >/dev/null; then missing+=(gcc); fi

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
echo "install-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
# Pin qemu-utils to the distribution's own release so it matches qemu-system-x86.
args=()
for p in "${missing[@]}"; do
    if [ "$p" = qemu-utils ]; then args+=("qemu-utils/$codename"); else args+=("$p"); fi
done
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --allow-downgrades "${args[@]}" >/dev/null
