#!/bin/sh
# Debian packages the build and tests need (one line per helper; the lead merges them).
set -e
apt-get install -y acpica-tools  # iasl: tessera-platform ACPI table cross-check (cargo test -p tessera-platform -- --ignored iasl)
