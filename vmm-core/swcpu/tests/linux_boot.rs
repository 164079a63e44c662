//! Boots Debian's Linux 6.1 with a busybox initramfs on the software CPU, through both entries, until its
//! /init reports completion. Ignored by default: it needs /boot/vmlinuz-6.1.0-56-amd64, busybox-static,
//! cpio and xz, and takes 30-120 s per entry.
//!
//! `cargo test -p tessera-swcpu --release --test linux_boot -- --ignored --nocapture`

#[path = "support/linux_boot.rs"]
#[allow(dead_code)]
mod linux_boot;

use std::process::Command;

const KERNEL: &str = "/boot/vmlinuz-6.1.0-56-amd64";
/// No timer devices exist yet: skip TSC and delay-loop calibration.
const CMDLINE: &str = "earlyprintk=serial,ttyS0 console=ttyS0 nokaslr tsc_early_khz=1000000 lpj=4000000 no_timer_check";
const DONE: &str = "tessera-init: done";

fn initrd(tag: &str) -> Vec<u8> {
    let out = std::env::temp_dir().join(format!("swcpu-initrd-{}-{tag}.cpio.gz", std::process::id()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/make-busybox-initrd.sh");
    let st = Command::new("sh").arg(script).arg(&out).status().expect("run make-busybox-initrd.sh");
    assert!(st.success(), "make-busybox-initrd.sh failed");
    let data = std::fs::read(&out).expect("read initrd");
    let _ = std::fs::remove_file(&out);
    data
}

fn boot(pvh: bool) {
    let cfg = linux_boot::BootConfig {
        image: KERNEL.into(),
        seconds: 600.0,
        cmdline: CMDLINE.into(),
        initrd: Some(initrd(if pvh { "pvh" } else { "64" })),
        pvh,
        echo: false,
        stop_on: Some(DONE.into()),
    };
    let r = linux_boot::boot(&cfg).expect("boot setup");
    eprintln!(
        "{} entry: {:?} after {} instructions in {:.1} s ({:.1} MIPS)",
        if pvh { "PVH" } else { "64-bit" },
        r.exit,
        r.stats.instructions,
        r.seconds,
        r.stats.instructions as f64 / r.seconds / 1e6
    );
    assert!(
        r.serial.contains(DONE) && r.serial.contains("vendor_id\t: AuthenticAMD"),
        "guest did not reach the end of /init ({:?}); state:\n{}\nserial output:\n{}",
        r.exit,
        r.state,
        r.serial
    );
}

#[test]
#[ignore = "boots a real kernel: needs /boot/vmlinuz-6.1.0-56-amd64 and busybox-static, 1-4 minutes"]
fn linux_boots_to_busybox_init_via_64bit_entry() {
    boot(false);
}

#[test]
#[ignore = "boots a real kernel: needs /boot/vmlinuz-6.1.0-56-amd64 and busybox-static, 1-4 minutes"]
fn linux_boots_to_busybox_init_via_pvh_entry() {
    boot(true);
}
