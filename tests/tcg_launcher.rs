//! Linux on the software CPU as a user runs it: `qemu-system-x86_64 -m 512M -kernel ... -initrd ... -serial stdio
//! -no-reboot` with no `-accel` (TCG is QEMU's default), the launcher starting the real tessera-core and
//! tessera-chardev. The test types into the guest's shell through the launcher's stdin, reads the answers on its
//! stdout, and `reboot -f` must end every process with status 0 (QEMU's `-no-reboot`).
//!
//! Bounds: the boot reaches the prompt in ~30 s on the development host; each step is allowed 180 s (loaded CI
//! hosts run several guests at once).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_tests::bins;

/// The installed Debian kernel (`linux-image-amd64`; the newest `/boot/vmlinuz-*`).
static KERNEL_PATH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    tessera_tests::linux_guest::kernel()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/boot/vmlinuz-(none installed)".into())
});
const STEP: Duration = Duration::from_secs(180);

const INIT: &str = "#!/bin/sh\nmount -t proc proc /proc\necho TESSERA-LAUNCHER-SHELL\nexec setsid cttyhack sh\n";

fn text(out: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&out.lock().unwrap()).into_owned()
}

#[test]
fn linux_shell_through_the_launcher_and_reboot_with_no_reboot() {
    for p in [KERNEL_PATH.as_str(), "/bin/busybox"] {
        if !Path::new(p).exists() {
            eprintln!("SKIPPED: {p} is absent (scripts/install-deps.sh installs linux-image-amd64, busybox-static)");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    std::fs::write(&init, INIT).unwrap();
    let initrd = dir.path().join("initrd.gz");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/mkinitramfs.sh");
    let st = Command::new("bash").arg(script).arg(&initrd).arg(&init).status().unwrap();
    assert!(st.success(), "mkinitramfs.sh: {st}");

    bins::binary("tessera-core", "tessera-core");
    bins::binary("tessera-chardev", "tessera-chardev");
    let mut child = Command::new(bins::launcher("qemu-system-x86_64"))
        .env_remove("TESSERA_LIBEXEC_DIR")
        .args(["-m", "512M", "-kernel", KERNEL_PATH.as_str(), "-initrd"])
        .arg(&initrd)
        .args(["-append", "console=ttyS0", "-serial", "stdio", "-display", "none", "-no-reboot"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut stdin = child.stdin.take().unwrap();
    let wait_for = |needle: &str, child: &mut std::process::Child| {
        let deadline = Instant::now() + STEP;
        while !text(&out).contains(needle) {
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                panic!("no {needle:?} within {STEP:?}; guest serial output:\n{}", text(&out));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("TESSERA-LAUNCHER-SHELL", &mut child);
    wait_for("# ", &mut child);

    // The graph is two processes besides the launcher.
    let pid = child.id();
    let mut names: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default().trim().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["tessera-chardev", "tessera-core"]);

    stdin.write_all(b"echo TESSERA-$((6*7)) $(cat /proc/cpuinfo | grep -c ^processor)\n").unwrap();
    wait_for("TESSERA-42 1", &mut child);
    stdin.write_all(b"reboot -f\n").unwrap();
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the VM did not end after reboot -f with -no-reboot; guest output:\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let stderr = errs.join().unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}\nguest output:\n{}", text(&out));
    assert!(text(&out).contains("reboot: Restarting system"), "{}", text(&out));
}
