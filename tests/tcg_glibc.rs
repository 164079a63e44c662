//! Dynamically linked glibc programs on Tessera's software CPU: Debian's Linux boots under `tessera -accel tcg`
//! from an initramfs holding the host's `/usr/bin/env` and `/usr/bin/ls` with their shared libraries, and runs
//! them. glibc's loader refuses to start anything ("CPU ISA level is lower than required") unless CPUID shows
//! the x86-64 baseline (CMOV, CX8, FPU, FXSR, MMX, SSE, SSE2; glibc sysdeps/x86/get-isa-level.h), so this
//! checks that the software CPU advertises, and runs, what the baseline needs.
//!
//! Bounds: the VM is allowed 240 s (a boot to the init script takes about 20-40 s of wall time on the shared
//! development host); a failure prints the guest's serial output.

use std::path::Path;
use std::time::Duration;

use tessera_tests::bins;
use tessera_tests::linux_guest::{kernel, Initramfs, TempDir};

const SCRIPT: &str = r#"
exec >/dev/console 2>&1
echo "TESSERA-GLIBC-START"
/usr/bin/env -i TESSERA_GLIBC=runs /usr/bin/env
/usr/bin/env --version | head -n 1
/usr/bin/ls -1 /usr/bin
echo "TESSERA-GLIBC-STATUS $?"
"#;

const PROGRAMS: &[&str] = &["/usr/bin/env", "/usr/bin/ls"];

#[test]
fn dynamically_linked_glibc_programs_run_on_the_software_cpu() {
    let Ok(kernel) = kernel() else {
        eprintln!("SKIPPED: no /boot/vmlinuz-* (linux-image-amd64)");
        return;
    };
    for p in PROGRAMS.iter().chain(&["/bin/busybox"]) {
        if !Path::new(p).exists() {
            eprintln!("SKIPPED: {p} is absent (coreutils, busybox-static)");
            return;
        }
    }
    let dir = TempDir::new("tcg-glibc").expect("temporary directory");
    let initrd = Initramfs::new(SCRIPT).binaries(PROGRAMS).build(&dir.path().join("initrd.gz")).expect("initramfs");
    let mut cmd = bins::launcher_command("tessera");
    cmd.args(["-accel", "tcg", "-m", "256M", "-nographic", "-no-reboot", "-append", "console=ttyS0 panic=-1"]);
    cmd.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd);
    let out = bins::wait_output(cmd.spawn().expect("start tessera"), Duration::from_secs(240));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("TESSERA-GLIBC-START"), "the init script never ran; guest output:\n{text}");
    assert!(!text.contains("CPU ISA level is lower than required"), "glibc's loader refused; guest output:\n{text}");
    for want in ["TESSERA_GLIBC=runs", "env (GNU coreutils)", "\nenv", "\nls", "TESSERA-GLIBC-STATUS 0"] {
        assert!(text.contains(want), "{want:?} missing; guest output:\n{text}");
    }
    assert!(out.status.success(), "tessera exited with {}; guest output:\n{text}", out.status);
}
