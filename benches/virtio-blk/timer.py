#!/usr/bin/env python3
"""Runs a VMM command, timestamps the guest's `@@ begin NAME` / `@@ end` serial markers on the host, and prints
one line per phase: `VMM ROUND NAME SECONDS`. Fails (exit 1, guest output on stderr) if the guest does not reach
`@@ done`."""
import subprocess
import sys
import time



def summary(path):
    """Markdown table from the `VMM ROUND NAME SECONDS` lines: medians per phase and QEMU/Tessera ratios."""
    times, order = {}, []
    for line in open(path):
        vmm, _, name, secs = line.split()
        if name not in order:
            order.append(name)
        times.setdefault((vmm, name), []).append(float(secs))
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print("| phase | Tessera core, s (runs) | QEMU 7.2, s (runs) | QEMU time / Tessera time |")
    print("|---|---|---|---|")
    for name in order:
        t, q = times.get(("tessera", name), []), times.get(("qemu", name), [])
        if t and q:
            runs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
            print(f"| {name} | {med(t):.2f} ({runs(t)}) | {med(q):.2f} ({runs(q)}) | {med(q) / med(t):.2f}x |")


if sys.argv[1] == "--summary":
    summary(sys.argv[2])
    sys.exit(0)
vmm, rnd, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
seen = []
phase, start, done = None, 0.0, False
for raw in proc.stdout:
    now = time.monotonic()
    line = raw.decode(errors="replace").strip()
    seen.append(line)
    # Kernel messages may share a line with a marker (the console is shared): find the marker anywhere.
    if "@@ begin " in line:
        phase, start = line.split("@@ begin ", 1)[1].split()[0], now
    elif "@@ end" in line and phase:
        print(f"{vmm} {rnd} {phase} {now - start:.3f}", flush=True)
        phase = None
    elif "@@ done" in line:
        done = True
proc.wait()
if not done or any("I/O error" in s for s in seen):
    sys.stderr.write("\n".join(seen[-60:]) + "\n")
    sys.exit(1)
