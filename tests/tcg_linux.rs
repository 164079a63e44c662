//! Debian's Linux 6.1 on Tessera's software CPU (`-accel tcg`), driven through the real `tessera-core` by the
//! fake launcher: the kernel boots with full ACPI (IOAPIC, LAPIC timer, HPET, PM timer) to a busybox /init,
//! which prints a marker, runs a few commands (uname, /proc/interrupts, `sleep 1`) and starts an interactive
//! shell on ttyS0. The test types into the shell through the serial channel and checks the answers; then
//! `poweroff -f` (ACPI S5 through PM1a_CNT) must end the VM with `Exit { code: 0 }`. (`reboot -f` under
//! `-no-reboot` is tested through the real launcher in tcg_launcher.rs.)
//!
//! No timing flags are passed to the kernel (no `tsc_early_khz=`, `tsc=reliable`, `no_timer_check`, `lpj=`):
//! the core's instruction-counting clock is what makes Linux's own calibration dependable on a busy host.
//!
//! Bounds: on the development host (2 cores shared with other builds) a boot reached the shell prompt in
//! 33 s of wall time with the two tests run one after the other, and in 117 s with both at once on a host
//! loaded 8 deep; every step (boot to prompt, a command, the power-off) is allowed 180 s.

#[path = "core_harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{start, Core, Setup, TempDir};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::AsFd;
use tessera_ipc::messages::{Accel, ChildToLauncher, CoreToChardev};
use tessera_ipc::IpcError;

/// The installed Debian kernel (`linux-image-amd64`; the newest `/boot/vmlinuz-*`).
static KERNEL_PATH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    tessera_tests::linux_guest::kernel()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/boot/vmlinuz-(none installed)".into())
});
/// How long one step (boot to the prompt, one command, power-off) may take.
const STEP: Duration = Duration::from_secs(180);

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "TESSERA-TCG-INIT $(uname -sr)"
cat /proc/interrupts
echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
sleep 1 && echo "TESSERA-TCG-SLEPT"
echo "TESSERA-TCG-SHELL"
exec setsid cttyhack sh
"#;

/// Whether the kernel and busybox are here; prints why not otherwise.
fn prerequisites(test: &str) -> bool {
    for p in [KERNEL_PATH.as_str(), "/bin/busybox"] {
        if !Path::new(p).exists() {
            eprintln!("SKIPPED {test}: {p} is absent (linux-image-amd64, busybox-static)");
            return false;
        }
    }
    true
}

fn initramfs(dir: &TempDir) -> PathBuf {
    let init = harness::write_file(&dir.0, "init", INIT.as_bytes());
    let out = dir.0.join("initrd.gz");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/mkinitramfs.sh");
    let st = Command::new("bash").arg(script).arg(&out).arg(&init).status().expect("run mkinitramfs.sh");
    assert!(st.success(), "mkinitramfs.sh failed: {st}");
    out
}

fn setup(dir: &TempDir) -> Setup {
    let mut s = Setup::new(Path::new(KERNEL_PATH.as_str()));
    s.initrd = Some(initramfs(dir));
    s.cmdline = "console=ttyS0".into();
    s.ram = 512 << 20;
    s.accel = Accel::Tcg;
    s.debug_exit = None;
    s
}

/// Read serial output until it contains `needle`, for at most `STEP`; panics with everything the guest printed.
fn wait_for(core: &mut Core, needle: &str) {
    let deadline = Instant::now() + STEP;
    let found = |c: &Core| String::from_utf8_lossy(&c.output).contains(needle);
    while !found(core) {
        if Instant::now() > deadline {
            core.drain_serial();
            panic!("the guest never printed {needle:?} within {STEP:?}; its serial output:\n{}", core.text());
        }
        match core.serials[0].try_recv::<CoreToChardev>() {
            Ok((CoreToChardev::Output(b), _)) => core.output.extend(b),
            Err(IpcError::WouldBlock) => {
                let mut fds = [PollFd::new(core.serials[0].as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(200u16));
                // A core that ended early says why on the control channel.
                if let Ok((m, _)) = core.control.try_recv::<ChildToLauncher>() {
                    core.drain_serial();
                    panic!(
                        "the core ended the VM while waiting for {needle:?}: {m:?}; serial output:\n{}",
                        core.text()
                    );
                }
            }
            Err(e) => panic!("serial channel failed: {e}; serial output:\n{}", core.text()),
        }
    }
}

/// The VM's end: `Exit { code: 0 }` within `STEP`, then exit status 0.
fn expect_exit_0(core: &mut Core) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        match core.control.try_recv::<ChildToLauncher>() {
            Ok((ChildToLauncher::Exit { code, reason }, _)) => {
                core.drain_serial();
                assert_eq!(code, 0, "exit reason {reason:?}; serial output:\n{}", core.text());
                let st = core.wait_exit();
                assert!(st.success(), "tessera-core exited with {st}; serial output:\n{}", core.text());
                return reason;
            }
            Ok((other, _)) => panic!("expected Exit, got {other:?}; serial output:\n{}", core.text()),
            Err(IpcError::WouldBlock) => {}
            Err(e) => panic!("control channel failed: {e}; serial output:\n{}", core.text()),
        }
        if Instant::now() > deadline {
            core.drain_serial();
            panic!("no Exit within {STEP:?} after the guest was told to end; serial output:\n{}", core.text());
        }
        // Keep the serial channel drained so the guest's output never blocks.
        while let Ok((CoreToChardev::Output(b), _)) = core.serials[0].try_recv::<CoreToChardev>() {
            core.output.extend(b);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn linux_boots_to_an_interactive_shell_and_powers_off() {
    if !prerequisites("linux_boots_to_an_interactive_shell_and_powers_off") {
        return;
    }
    let dir = TempDir::new("tcg-linux");
    let t0 = Instant::now();
    let mut core = start(&setup(&dir));
    core.expect_ready();
    wait_for(&mut core, "TESSERA-TCG-INIT Linux 6.1");
    let t_init = t0.elapsed();
    wait_for(&mut core, "TESSERA-TCG-SHELL");
    // The shell prompt of busybox sh as root.
    wait_for(&mut core, "# ");
    let t_shell = t0.elapsed();
    let text = core.text();
    // Linux calibrated its clocks without help and the devices interrupt through the IOAPIC.
    assert!(text.contains("tsc: Fast TSC calibration using PIT"), "TSC calibration against the PIT:\n{text}");
    assert!(text.contains("Refined TSC clocksource calibration: 1000.000 MHz"), "TSC refinement:\n{text}");
    assert!(text.contains("IO-APIC   2-edge      timer"), "timer through IOAPIC pin 2:\n{text}");
    assert!(text.contains("IO-APIC   4-edge      ttyS0"), "COM1 on IRQ4:\n{text}");
    assert!(text.contains("TESSERA-TCG-SLEPT"), "sleep 1 finished:\n{text}");

    // Interactive: the shell evaluates what arrives on the serial channel.
    core.send_input(b"echo TESSERA-TCG-ANSWER-$((6*7))\n");
    wait_for(&mut core, "TESSERA-TCG-ANSWER-42");
    core.send_input(b"cat /proc/cmdline; echo TESSERA-TCG-DONE\n");
    wait_for(&mut core, "TESSERA-TCG-DONE\r\n");
    assert!(core.text().contains("console=ttyS0"), "{}", core.text());

    core.send_input(b"poweroff -f\n");
    let reason = expect_exit_0(&mut core);
    eprintln!(
        "tcg linux: core start -> /init {:.1} s, -> shell prompt {:.1} s, -> power-off {:.1} s ({reason})",
        t_init.as_secs_f64(),
        t_shell.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert!(core.text().contains("reboot: Power down"), "{}", core.text());
}
