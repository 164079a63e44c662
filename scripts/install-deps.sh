#!/bin/sh
# Debian packages Tessera needs (the lead merges the helpers' lines).
set -e
# core: as/ld build the tiny test guests; xz and Debian's kernel for the bzImage loader tests; liblzma for xz2.
apt-get install -y binutils xz-utils linux-image-amd64 liblzma-dev pkg-config
