//! tessera-core boots a tiny PVH guest on KVM: serial output crosses the serial channel, isa-debug-exit
//! becomes the exit code; bad configurations fail with QEMU's messages.

#[path = "core_harness.rs"]
mod harness;

use harness::{kvm_available, start, write_file, Setup, TempDir};
use tessera_ipc::messages::LauncherToChild;
use tessera_tests::tiny_guest::{asm, pvh_guest};

fn hello_guest(dir: &TempDir) -> std::path::PathBuf {
    let code = format!("{}{}", asm::print("msg"), asm::debug_exit(0x501, 0x31));
    pvh_guest(&dir.0, "hello", &code, &asm::string("msg", "hello\n")).unwrap()
}

#[test]
fn hello_reaches_the_chardev_and_debug_exit_sets_the_status() {
    if !kvm_available("hello_reaches_the_chardev_and_debug_exit_sets_the_status") {
        return;
    }
    let dir = TempDir::new("hello");
    let mut core = start(&Setup::new(&hello_guest(&dir)));
    core.expect_ready();
    let reason = core.expect_exit((0x31 << 1) | 1);
    assert_eq!(core.text(), "hello\n");
    assert!(reason.contains("isa-debug-exit"), "{reason}");
}

#[test]
fn the_application_processors_wait_while_the_bsp_boots() {
    if !kvm_available("the_application_processors_wait_while_the_bsp_boots") {
        return;
    }
    let dir = TempDir::new("smp");
    let mut setup = Setup::new(&hello_guest(&dir));
    setup.smp = 2;
    setup.cpu_model = "host".into();
    let mut core = start(&setup);
    core.expect_ready();
    core.expect_exit(0x63);
    assert_eq!(core.text(), "hello\n");
}

#[test]
fn the_guest_sees_the_pvh_start_info_in_ebx() {
    if !kvm_available("the_guest_sees_the_pvh_start_info_in_ebx") {
        return;
    }
    // The guest checks the hvm_start_info magic at EBX and reports through isa-debug-exit: 0x11 if it matches.
    let code = r#"
    cmpl $0x336ec578, (%ebx)
    jne 1f
    cmpl $1, 4(%ebx)
    jne 1f
    mov $0x11, %al
    jmp 2f
1:  mov $0x22, %al
2:  mov $0x501, %dx
    outb %al, %dx
"#;
    let dir = TempDir::new("startinfo");
    let kernel = pvh_guest(&dir.0, "startinfo", code, "").unwrap();
    let mut core = start(&Setup::new(&kernel));
    core.expect_ready();
    core.expect_exit((0x11 << 1) | 1);
}

#[test]
fn a_text_file_is_an_invalid_kernel_header() {
    let dir = TempDir::new("badkernel");
    let k = write_file(&dir.0, "passwd", b"root:x:0:0:root:/root:/bin/bash\n");
    let mut core = start(&Setup::new(&k));
    assert_eq!(core.expect_fatal(), "invalid kernel header");
}

#[test]
fn an_elf_without_a_pvh_note_fails_as_in_qemu() {
    let mut core = start(&Setup::new(std::path::Path::new("/bin/true")));
    assert_eq!(core.expect_fatal(), "Error loading uncompressed kernel without PVH ELF Note");
}

#[test]
fn an_unknown_cpu_model_is_refused() {
    if !kvm_available("an_unknown_cpu_model_is_refused") {
        return;
    }
    let dir = TempDir::new("cpu");
    let mut setup = Setup::new(&hello_guest(&dir));
    setup.cpu_model = "pentium9".into();
    let mut core = start(&setup);
    assert_eq!(core.expect_fatal(), "unable to find CPU model 'pentium9'");
}

/// The launcher's `Shutdown` must stop vCPUs wherever they are: spinning in guest code, or halted with
/// interrupts off (blocked inside KVM), and the core then exits 0 without an `Exit` of its own.
fn shutdown_stops(name: &str, code: &str) {
    let dir = TempDir::new(name);
    let full = format!("{}{code}", asm::print("msg"));
    let kernel = pvh_guest(&dir.0, name, &full, &asm::string("msg", "running\n")).unwrap();
    let mut core = start(&Setup::new(&kernel));
    core.expect_ready();
    core.wait_output(b"running\n");
    // Give the vCPU time to settle into its loop (or its HLT).
    std::thread::sleep(std::time::Duration::from_millis(200));
    let t = std::time::Instant::now();
    core.control.send(&LauncherToChild::Shutdown, &[]).unwrap();
    let st = core.wait_exit();
    assert!(st.success(), "tessera-core exited with {st} after Shutdown; stderr: {}", core.stderr_text());
    assert!(t.elapsed() < std::time::Duration::from_secs(5), "stopping took {:?}", t.elapsed());
}

#[test]
fn shutdown_stops_a_spinning_guest() {
    if kvm_available("shutdown_stops_a_spinning_guest") {
        shutdown_stops("spin", "1:  jmp 1b\n");
    }
}

#[test]
fn shutdown_stops_a_halted_guest() {
    if kvm_available("shutdown_stops_a_halted_guest") {
        // Falls through to the `cli; hlt` loop every tiny guest ends with.
        shutdown_stops("halted", "");
    }
}

#[test]
fn the_core_exits_when_the_launcher_goes_away() {
    if !kvm_available("the_core_exits_when_the_launcher_goes_away") {
        return;
    }
    let dir = TempDir::new("orphan");
    let kernel = pvh_guest(&dir.0, "orphan", "1:  jmp 1b\n", "").unwrap();
    let mut core = start(&Setup::new(&kernel));
    core.expect_ready();
    // Closing our end of the control channel is what the core sees when the launcher dies.
    let (c, _) = tessera_ipc::Channel::pair().unwrap();
    drop(std::mem::replace(&mut core.control, c));
    let st = core.wait_exit();
    assert_eq!(st.code(), Some(1), "the core ends (status 1) when its launcher is gone");
}

#[test]
fn unassigned_ports_are_logged_once_with_d_unimp() {
    if !kvm_available("unassigned_ports_are_logged_once_with_d_unimp") {
        return;
    }
    // Reads of nothing return all ones: the guest checks that, and exits with 0x44 if so.
    let code = r#"
    inb $0x80, %al
    inb $0x80, %al
    outb %al, $0x80
    cmp $0xff, %al
    jne 1f
    mov $0x44, %al
    mov $0x501, %dx
    outb %al, %dx
1:
"#;
    let dir = TempDir::new("unimp");
    let kernel = pvh_guest(&dir.0, "unimp", code, "").unwrap();
    let mut setup = Setup::new(&kernel);
    setup.log_items = vec!["unimp".into()];
    let mut core = start(&setup);
    core.expect_ready();
    core.expect_exit((0x44 << 1) | 1);
    let log = core.stderr_text();
    // Once per port, whatever the direction.
    assert_eq!(log.matches("port 0x80").count(), 1, "{log}");
    assert!(log.contains("unassigned port I/O read from port 0x80 (size 1)"), "{log}");
}

#[test]
fn ram_split_around_the_pci_hole_boots() {
    if !kvm_available("ram_split_around_the_pci_hole_boots") {
        return;
    }
    // 4 GiB: 3 GiB below the hole, 1 GiB from 4 GiB up, in two KVM memory slots backed by one memfd (pages are
    // only allocated when touched, so this costs the host nothing).
    let dir = TempDir::new("bigram");
    let mut setup = Setup::new(&hello_guest(&dir));
    setup.ram = 4 << 30;
    let mut core = start(&setup);
    core.expect_ready();
    core.expect_exit(0x63);
    assert_eq!(core.text(), "hello\n");
}
