#!/usr/bin/env python3
"""Time to a busybox shell: Tessera `-accel tcg` against QEMU `-accel tcg`, run alternately.

usage: time-to-shell.py [ROUNDS] [--tessera PATH]... [--qemu PATH] [--only tessera|qemu]

Both boot the same kernel (the newest /boot/vmlinuz-*) and the same initramfs (scripts/mkinitramfs.sh, default
/init: an interactive `sh -l` on the console) with 512 MiB, `-nographic`, `-append "console=ttyS0"`. For each run
the script records wall time from exec to the kernel's "Run /init" line, to the shell prompt, and to the
process exit after `poweroff -f` is typed, plus the CPU time the process tree used. The runs alternate
(Tessera, QEMU, Tessera, ...) so that both see the same host load; the summary gives min-max per column and
the ratio of the medians. Build first: `cargo build --release --bins`. `--tessera` given more than once compares
several builds (each a copy of target/release's tessera, tessera-core and tessera-chardev in its own directory);
the ratios are then against the first.
"""

import argparse
import glob
import os
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
STEP_TIMEOUT = 300.0


def kernel():
    ks = sorted(glob.glob("/boot/vmlinuz-*"), key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p)])
    if not ks:
        sys.exit("time-to-shell: no /boot/vmlinuz-* (apt-get install linux-image-amd64)")
    return ks[-1]


def run_one(cmd):
    """Boots, returns dict(init, prompt, off, cpu) in seconds, or raises with the output on failure."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    out = b""
    marks = {}
    sent = False
    deadline = t0 + STEP_TIMEOUT
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"timeout; output so far:\n{out.decode(errors='replace')[-3000:]}")
            if not sel.select(timeout=0.05):
                if p.poll() is not None:
                    break
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            now = time.monotonic()
            if not chunk:
                break
            out += chunk
            if "init" not in marks and b"Run /init" in out:
                marks["init"] = now - t0
            if "prompt" not in marks:
                i = out.find(b"Tessera guest:")
                if i >= 0 and b"# " in out[i:]:
                    marks["prompt"] = now - t0
            if "prompt" in marks and not sent:
                p.stdin.write(b"poweroff -f\n")
                p.stdin.flush()
                sent = True
                deadline = time.monotonic() + STEP_TIMEOUT
        _, status, ru = os.wait4(p.pid, 0)
        marks["off"] = time.monotonic() - t0
        marks["cpu"] = ru.ru_utime + ru.ru_stime
        p.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if p.returncode is None:
            p.kill()
            p.wait()
    if "prompt" not in marks:
        raise RuntimeError(f"no shell prompt (exit {p.returncode}); output:\n{out.decode(errors='replace')[-3000:]}")
    # The CPU time of children the launcher started is in the launcher's rusage only if it waited for them;
    # both programs here do.
    return marks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rounds", nargs="?", type=int, default=3)
    ap.add_argument("--tessera", action="append")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--only", choices=["tessera", "qemu"])
    a = ap.parse_args()
    builds = a.tessera or [os.path.join(ROOT, "target/release/tessera")]
    kern = kernel()
    tmp = tempfile.mkdtemp(prefix="tts-")
    initrd = os.path.join(tmp, "initramfs.cpio.gz")
    subprocess.run(["bash", os.path.join(ROOT, "scripts/mkinitramfs.sh"), initrd], check=True)
    common = ["-m", "512M", "-kernel", kern, "-initrd", initrd, "-append", "console=ttyS0", "-nographic"]
    cmds = {"qemu": [a.qemu, "-accel", "tcg"] + common}
    names = []
    for k, b in enumerate(builds):
        name = "tessera" if k == 0 else f"tessera{k + 1}"
        names.append(name)
        cmds[name] = [b, "-accel", "tcg"] + common
        print(f"{name}: {b}")
    who = {"tessera": names, "qemu": ["qemu"], None: names + ["qemu"]}[a.only]
    res = {w: [] for w in who}
    for r in range(a.rounds):
        order = who if r % 2 == 0 else list(reversed(who))
        for w in order:
            m = run_one(cmds[w])
            res[w].append(m)
            print(f"round {r + 1} {w:8} /init {m.get('init', float('nan')):6.2f} s  prompt {m['prompt']:6.2f} s  "
                  f"off {m['off']:6.2f} s  cpu {m['cpu']:6.2f} s", flush=True)
    print(f"\nkernel {kern}, {a.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    cols = ["init", "prompt", "off", "cpu"]
    for w in who:
        cells = []
        for c in cols:
            v = [m[c] for m in res[w] if c in m]
            cells.append(f"{c} {min(v):.1f}-{max(v):.1f} s (median {statistics.median(v):.2f})" if v else f"{c} -")
        print(f"{w:8} " + "; ".join(cells))
    if len(names) > 1:
        for n in names[1:]:
            for c in ["prompt", "cpu"]:
                t = statistics.median(m[c] for m in res["tessera"])
                t2 = statistics.median(m[c] for m in res[n])
                print(f"ratio {n}/tessera ({c}, medians): {t2 / t:.3f}")
    if "qemu" in who:
        for n in names:
            for c in ["prompt", "cpu"]:
                t = statistics.median(m[c] for m in res[n])
                q = statistics.median(m[c] for m in res["qemu"])
                print(f"ratio {n}/qemu ({c}, medians): {t / q:.2f}x")


if __name__ == "__main__":
    main()
