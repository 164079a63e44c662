//! The launcher's command line: good lines parse to the expected configuration and process graph; bad lines
//! print exactly one QEMU-style error, exit 1, and start nothing. Where QEMU has the same error, the test is
//! differential: when Debian's `qemu-system-x86_64` (/usr/bin) is installed, the same line runs under it and
//! the messages must agree (the comparison, not the test, is skipped where QEMU is absent).
//!
//! Debian ships QEMU 7.2 and Tessera follows 8.2. For every line here the wording of the two releases is the
//! same except the machine's versioned name (`pc-i440fx-7.2` / `pc-i440fx-8.2`): those rows compare after
//! renaming (`Qemu::Renamed`).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tessera_ipc::messages::{ChardevBackend, ChildConfig};
use tessera_launcher::config::{self, AccelKind, CharBackend, Command as LaunchCommand, SocketAddr, VmConfig};
use tessera_launcher::plan::{self, Resource};
use tessera_tests::bins;

const PROG: &str = "qemu-system-x86_64";
const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// How a bad line relates to QEMU.
#[derive(Clone, Copy, Debug)]
enum Qemu {
    /// QEMU prints the same message (it may add lines after it; we print the first ones only).
    Same,
    /// Same, once QEMU 7.2's machine name is read as 8.2's.
    Renamed,
    /// Tessera-specific (a feature not there yet, a check QEMU makes later or differently): no comparison.
    Own,
}

struct Bad {
    args: &'static [&'static str],
    /// What follows `qemu-system-x86_64: ` (the whole stderr for messages QEMU prints with their own prefix).
    message: &'static str,
    qemu: Qemu,
}

const fn bad(args: &'static [&'static str], message: &'static str, qemu: Qemu) -> Bad {
    Bad { args, message, qemu }
}

const SIZE_HINT: &str =
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

/// A file that exists and is not a kernel; the fake children never read it.
const K: &str = "/etc/hostname";

#[rustfmt::skip]
const BAD: &[Bad] = &[
    // grammar
    bad(&["-bogus"], "-bogus: invalid option", Qemu::Same),
    bad(&["--bogus"], "--bogus: invalid option", Qemu::Same),
    bad(&["-m"], "-m: requires an argument", Qemu::Same),
    bad(&["-kernel", K, "disk.img"], "disk.img: a disk image given without an option ('disk.img') is not supported by tessera yet", Qemu::Own),
    // -m
    bad(&["-m", "foo"], "-m foo: Parameter 'size' expects a non-negative number below 2^64\n@SIZE_HINT", Qemu::Same),
    bad(&["-m", "512X"], "-m 512X: Parameter 'size' expects a non-negative number below 2^64\n@SIZE_HINT", Qemu::Same),
    bad(&["-m", "-5"], "-m -5: Parameter 'size' expects a non-negative number below 2^64\n@SIZE_HINT", Qemu::Same),
    bad(&["-m", "1.5"], "-m 1.5: Parameter 'size' expects a non-negative number below 2^64\n@SIZE_HINT", Qemu::Same),
    bad(&["-m", "size="], "-m size=: Parameter 'size' expects a non-negative number below 2^64\n@SIZE_HINT", Qemu::Same),
    bad(&["-m", "1G,bogus=1"], "-m 1G,bogus=1: Invalid parameter 'bogus'", Qemu::Same),
    bad(&["-m", "1G,slots=foo"], "-m 1G,slots=foo: Parameter 'slots' expects a number", Qemu::Same),
    bad(&["-m", "1G,maxmem=foo"], "-m 1G,maxmem=foo: Parameter 'maxmem' expects a non-negative number below 2^64\n@SIZE_HINT", Qemu::Same),
    bad(&["-m", "1G,maxmem=512M"], "invalid value of maxmem: maximum memory size (0x20000000) must be at least the initial memory size (0x40000000)", Qemu::Same),
    bad(&["-m", "1G,slots=2"], "slots specified but no max-size", Qemu::Same),
    bad(&["-m", "1G,slots=2,maxmem=4G"], "-m 1G,slots=2,maxmem=4G: memory hotplug (-m slots=) is not supported by tessera yet", Qemu::Own),
    // -machine, -accel, -cpu
    bad(&["-machine", "foo"], "unsupported machine type\nUse -machine help to list supported machines", Qemu::Same),
    bad(&["-M", "q35"], "the machine type 'q35' (use pc) is not supported by tessera yet", Qemu::Own),
    bad(&["-machine", "pc,bogus=1"], "Property 'pc-i440fx-8.2-machine.bogus' not found", Qemu::Renamed),
    bad(&["-machine", "pc,smm=off"], "the machine property 'smm' is not supported by tessera yet", Qemu::Own),
    bad(&["-machine", "pc,accel=foo"], "invalid accelerator foo", Qemu::Same),
    bad(&["-accel", "foo"], "-accel foo: invalid accelerator foo", Qemu::Same),
    bad(&["-accel", "kvm,bogus=1"], "-accel kvm,bogus=1: Property 'kvm-accel.bogus' not found", Qemu::Same),
    bad(&["-accel", "tcg,bogus=1"], "-accel tcg,bogus=1: Property 'tcg-accel.bogus' not found", Qemu::Same),
    bad(&["-machine", "accel=kvm", "-accel", "tcg"], "The -accel and \"-machine accel=\" options are incompatible", Qemu::Same),
    bad(&["-enable-kvm", "-accel", "tcg"], "The -accel and \"-machine accel=\" options are incompatible", Qemu::Same),
    bad(&["-cpu", "foo"], "unable to find CPU model 'foo'", Qemu::Same),
    bad(&["-cpu", "host", "-accel", "tcg"], "CPU model 'host' requires KVM or HVF", Qemu::Same),
    bad(&["-cpu", "Skylake-Server"], "the CPU model 'Skylake-Server' (use host, max or qemu64) is not supported by tessera yet", Qemu::Own),
    bad(&["-cpu", "qemu64,+x2apic"], "CPU features on -cpu ('+x2apic') is not supported by tessera yet", Qemu::Own),
    // -smp
    bad(&["-smp", "3,sockets=2"], "Invalid CPU topology: product of the hierarchy must match maxcpus: sockets (2) * dies (1) * cores (1) * threads (1) != maxcpus (3)", Qemu::Same),
    bad(&["-smp", "cpus=4,maxcpus=2"], "Invalid CPU topology: maxcpus must be equal to or greater than smp: sockets (1) * dies (1) * cores (2) * threads (1) == maxcpus (2) < smp_cpus (4)", Qemu::Same),
    bad(&["-smp", "foo"], "Parameter 'smp.cpus' expects integer", Qemu::Same),
    bad(&["-smp", "2,sockets=1.5"], "Parameter 'smp.sockets' expects integer", Qemu::Same),
    bad(&["-smp", "2,bogus=1"], "Parameter 'smp.bogus' is unexpected", Qemu::Same),
    bad(&["-smp", "300"], "Invalid SMP CPUs 300. The max CPUs supported by machine 'pc-i440fx-8.2' is 255", Qemu::Renamed),
    bad(&["-smp", "2,clusters=2"], "clusters not supported by this machine's CPU topology", Qemu::Same),
    // boot
    bad(&["-kernel", "/nonexistent/vmlinuz"], "qemu: could not open kernel file '/nonexistent/vmlinuz': No such file or directory", Qemu::Same),
    bad(&["-kernel", "/etc"], "qemu: could not load kernel '/etc': Is a directory", Qemu::Same),
    bad(&["-initrd", K], "-initrd only allowed with -kernel option", Qemu::Same),
    bad(&["-append", "console=ttyS0"], "-append only allowed with -kernel option", Qemu::Same),
    bad(&["-kernel", K, "-initrd", "/nonexistent/initrd"], "qemu: error reading initrd /nonexistent/initrd: Failed to open file “/nonexistent/initrd”: open() failed: No such file or directory", Qemu::Own),
    bad(&["-bios", "bios.bin"], "-bios bios.bin: loading firmware with -bios (boot with -kernel) is not supported by tessera yet", Qemu::Own),
    bad(&[], "booting from firmware (give the guest with -kernel) is not supported by tessera yet", Qemu::Own),
    // -serial
    bad(&["-serial", "foo"], "-serial foo: 'foo' is not a valid char driver", Qemu::Same),
    bad(&["-serial", "tcp:localhost"], "-serial tcp:localhost: could not connect serial device to character backend 'tcp:localhost'", Qemu::Same),
    bad(&["-serial", "chardev:nope"], "-serial chardev:nope: could not connect serial device to character backend 'chardev:nope'", Qemu::Same),
    bad(&["-serial", "tcp::4444,server=maybe"], "-serial tcp::4444,server=maybe: Parameter 'server' expects 'on' or 'off'", Qemu::Same),
    bad(&["-serial", "tcp::4444,bogus=1"], "-serial tcp::4444,bogus=1: Invalid parameter 'bogus'", Qemu::Same),
    bad(&["-serial", "file:/nonexistent/x", "-kernel", K], "-serial file:/nonexistent/x: Could not open '/nonexistent/x': No such file or directory", Qemu::Same),
    bad(&["-serial", "unix:/nonexistent/x", "-kernel", K], "-serial unix:/nonexistent/x: Failed to connect to '/nonexistent/x': No such file or directory", Qemu::Same),
    bad(&["-serial", "tcp:localhost:1", "-kernel", K], "-serial tcp:localhost:1: Failed to connect to 'localhost:1': Connection refused", Qemu::Same),
    bad(&["-serial", "vc"], "-serial vc: the serial backend 'vc' is not supported by tessera yet", Qemu::Own),
    bad(&["-serial", "null", "-serial", "null", "-serial", "null", "-serial", "null", "-serial", "null"], "-serial null: more than 4 serial ports is not supported by tessera yet", Qemu::Own),
    // -chardev
    bad(&["-chardev", "foo,id=x"], "-chardev foo,id=x: 'foo' is not a valid char driver name", Qemu::Same),
    bad(&["-chardev", "null"], "-chardev null: chardev: no id specified", Qemu::Same),
    bad(&["-chardev", "null,id=a", "-chardev", "null,id=a"], "-chardev null,id=a: Duplicate ID 'a' for chardev", Qemu::Same),
    bad(&["-chardev", "socket,id=a"], "-chardev socket,id=a: Unable to parse FD number ", Qemu::Same),
    bad(&["-chardev", "socket,id=a,path=/tmp/x,host=localhost"], "-chardev socket,id=a,path=/tmp/x,host=localhost: None or one of 'path', 'fd' or 'host' option required.", Qemu::Same),
    bad(&["-chardev", "socket,id=a,host=localhost"], "-chardev socket,id=a,host=localhost: chardev: socket: no port given", Qemu::Same),
    bad(&["-chardev", "file,id=a"], "-chardev file,id=a: chardev: file: no filename given", Qemu::Same),
    bad(&["-chardev", "stdio,id=a,signal=maybe"], "-chardev stdio,id=a,signal=maybe: Parameter 'signal' expects 'on' or 'off'", Qemu::Same),
    bad(&["-chardev", "null,id=a,mux=on,bogus=1"], "-chardev null,id=a,mux=on,bogus=1: Invalid parameter 'bogus'", Qemu::Same),
    bad(&["-chardev", "stdio,id=a", "-chardev", "stdio,id=b"], "-chardev stdio,id=b: cannot use stdio by multiple character devices", Qemu::Same),
    bad(&["-chardev", "udp,id=a"], "-chardev udp,id=a: the 'udp' chardev backend is not supported by tessera yet", Qemu::Own),
    bad(&["-chardev", "socket,id=a,path=/nonexistent/x,server=on,wait=off", "-serial", "chardev:a", "-kernel", K], "-chardev socket,id=a,path=/nonexistent/x,server=on,wait=off: Failed to bind socket to /nonexistent/x: No such file or directory", Qemu::Same),
    bad(&["-chardev", "stdio,id=a,logfile=/nonexistent/x", "-serial", "chardev:a", "-kernel", K], "-chardev stdio,id=a,logfile=/nonexistent/x: Could not create '/nonexistent/x': No such file or directory", Qemu::Same),
    bad(&["-daemonize", "-serial", "stdio"], "-serial stdio: cannot use stdio with -daemonize", Qemu::Same),
    bad(&["-daemonize", "-nographic"], "-nographic cannot be used with -daemonize", Qemu::Same),
    bad(&["-nographic", "-serial", "stdio"], "-serial stdio: cannot use stdio by multiple character devices", Qemu::Same),
    // -device
    bad(&["-device", "foo"], "-device foo: 'foo' is not a valid device model name", Qemu::Same),
    bad(&["-device", "isa-debug-exit,bogus=1"], "-device isa-debug-exit,bogus=1: Property 'isa-debug-exit.bogus' not found", Qemu::Same),
    bad(&["-device", "isa-debug-exit,iobase=foo"], "-device isa-debug-exit,iobase=foo: Parameter 'iobase' expects integer", Qemu::Same),
    bad(&["-device", "isa-debug-exit,iobase=0x100000000"], "-device isa-debug-exit,iobase=0x100000000: Parameter 'iobase' expects uint32_t", Qemu::Same),
    bad(&["-device", "isa-debug-exit,bus=foo"], "-device isa-debug-exit,bus=foo: Bus 'foo' not found", Qemu::Same),
    bad(&["-device", "isa-debug-exit,iobase=0xffff,iosize=4"], "-device isa-debug-exit,iobase=0xffff,iosize=4: isa-debug-exit: ports 0xffff..+0x4 do not fit in the 64 KiB I/O port space", Qemu::Own),
    bad(&["-device", "virtio-scsi-pci"], "-device virtio-scsi-pci: the device 'virtio-scsi-pci' is not supported by tessera yet", Qemu::Own),
    // -object and the memory backend
    bad(&["-object", "foo,id=x"], "-object foo,id=x: Parameter 'qom-type' does not accept value 'foo'", Qemu::Same),
    bad(&["-object", "memory-backend-memfd,size=1G"], "-object memory-backend-memfd,size=1G: Parameter 'id' is missing", Qemu::Same),
    bad(&["-object", "memory-backend-memfd,id=m"], "-object memory-backend-memfd,id=m: Parameter 'size' is missing", Qemu::Same),
    bad(&["-object", "memory-backend-memfd,id=m,size=foo"], "-object memory-backend-memfd,id=m,size=foo: Parameter 'size' expects a size value", Qemu::Same),
    bad(&["-object", "memory-backend-memfd,id=m,size=1G,share=maybe"], "-object memory-backend-memfd,id=m,size=1G,share=maybe: Parameter 'share' expects 'on' or 'off'", Qemu::Same),
    bad(&["-object", "memory-backend-memfd,id=m,size=1G,bogus=1"], "-object memory-backend-memfd,id=m,size=1G,bogus=1: Invalid parameter 'bogus'", Qemu::Same),
    bad(&["-object", "memory-backend-memfd,id=m,size=1G", "-object", "memory-backend-memfd,id=m,size=2G"], "-object memory-backend-memfd,id=m,size=2G: Duplicate ID 'm' for object", Qemu::Same),
    bad(&["-object", "memory-backend-ram,id=m,size=1G"], "-object memory-backend-ram,id=m,size=1G: -object memory-backend-ram is not supported by tessera yet", Qemu::Own),
    bad(&["-machine", "memory-backend=foo"], "Memory backend 'foo' not found", Qemu::Same),
    bad(&["-object", "memory-backend-memfd,id=m,size=1G", "-machine", "memory-backend=m", "-m", "512M"], "Machine memory size does not match the size of the memory backend", Qemu::Same),
    // display, name, logging
    bad(&["-display", "foo"], "-display foo: Parameter 'type' does not accept value 'foo'", Qemu::Same),
    bad(&["-display", "none,bogus=1"], "-display none,bogus=1: Parameter 'bogus' is unexpected", Qemu::Same),
    bad(&["-display", "gtk"], "-display gtk: the gtk display is not supported by tessera yet", Qemu::Own),
    bad(&["-name", "foo,bogus=1"], "-name foo,bogus=1: Invalid parameter 'bogus'", Qemu::Same),
    bad(&["-name", "foo,debug-threads=maybe"], "-name foo,debug-threads=maybe: Parameter 'debug-threads' expects 'on' or 'off'", Qemu::Same),
    bad(&["-D", "/nonexistent/x", "-d", "int", "-kernel", K], "Error opening logfile /nonexistent/x: No such file or directory", Qemu::Same),
    bad(&["-d", "trace:foo"], "trace events (-d trace:...) is not supported by tessera yet", Qemu::Own),
    // process-level
    bad(&["-runas", "nosuchuser"], "-runas nosuchuser: User \"nosuchuser\" doesn't exist (and is not <uid>:<gid>)", Qemu::Same),
    bad(&["-runas", "root", "-kernel", K], "-runas root: refusing to run as root (uid or gid 0)", Qemu::Own),
    bad(&["-chroot", "/nonexistent", "-kernel", K], "-chroot /nonexistent: '/nonexistent' is not a directory", Qemu::Own),
    bad(&["-chroot", "relative", "-kernel", K], "-chroot relative: 'relative' is not a directory", Qemu::Own),
    bad(&["-sandbox", "foo"], "-sandbox foo: Parameter 'enable' expects 'on' or 'off'", Qemu::Same),
    bad(&["-sandbox", "on,bogus=1"], "-sandbox on,bogus=1: Invalid parameter 'bogus'", Qemu::Same),
    bad(&["-sandbox", "on,obsolete=maybe"], "-sandbox on,obsolete=maybe: invalid argument for obsolete", Qemu::Same),
    bad(&["-sandbox", "on,seccomp=maybe"], "-sandbox on,seccomp=maybe: invalid argument for seccomp: kill or log", Qemu::Own),
    bad(&["-run-with", "async-teardown=on", "-kernel", K], "-run-with async-teardown=on: async-teardown=on is not supported by Tessera", Qemu::Own),
    bad(&["-pidfile", "/nonexistent/x", "-kernel", K], "cannot create PID file: Could not create '/nonexistent/x': No such file or directory", Qemu::Same),
    bad(&["-readconfig", "x.cfg"], "-readconfig x.cfg: -readconfig is not supported by tessera yet", Qemu::Own),
    bad(&["-vnc", ":0"], "-vnc :0: -vnc is not supported by tessera yet", Qemu::Own),
    bad(&["-monitor", "stdio"], "-monitor stdio: the monitor (only -monitor none is accepted) is not supported by tessera yet", Qemu::Own),
];

/// A directory of fake `tessera-core`/`tessera-chardev` scripts that leave a marker when started.
struct FakeLibexec {
    dir: tempfile::TempDir,
}

impl FakeLibexec {
    fn new() -> FakeLibexec {
        let dir = tempfile::tempdir().unwrap();
        for name in ["tessera-core", "tessera-chardev"] {
            let path = dir.path().join(name);
            let marker = dir.path().join(format!("{name}.started"));
            std::fs::write(&path, format!("#!/bin/sh\ntouch '{}'\nexit 1\n", marker.display())).unwrap();
            let mut perm = std::fs::metadata(&path).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
            std::fs::set_permissions(&path, perm).unwrap();
        }
        FakeLibexec { dir }
    }

    fn started(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".started"))
            .collect()
    }
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn launcher(name: &str, args: &[&str], libexec: &Path) -> Output {
    let mut cmd = Command::new(bins::launcher(name));
    cmd.args(args).env("TESSERA_LIBEXEC_DIR", libexec);
    run_with_timeout(cmd, Duration::from_secs(20))
}

fn expected_stderr(row: &Bad) -> String {
    let msg = row.message.replace("@SIZE_HINT", SIZE_HINT);
    // The loader's messages carry their own `qemu:` prefix, as in QEMU.
    if msg.starts_with("qemu: ") {
        format!("{msg}\n")
    } else {
        format!("{PROG}: {msg}\n")
    }
}

/// QEMU's stderr for the same line, or None when QEMU is not installed.
fn qemu_stderr(args: &[&str]) -> Option<String> {
    if !Path::new(QEMU).exists() {
        return None;
    }
    let mut cmd = Command::new(QEMU);
    // QEMU would open a window by default; a display option of the line itself must stay alone. (In front:
    // the line may end with an option that lacks its argument.)
    if !args.iter().any(|a| *a == "-display" || *a == "-nographic") {
        cmd.args(["-display", "none"]);
    }
    cmd.args(args);
    cmd.env_remove("DISPLAY");
    let out = run_with_timeout(cmd, Duration::from_secs(10));
    Some(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_lines_fail_like_qemu_and_start_nothing() {
    let fake = FakeLibexec::new();
    let mut failures = Vec::new();
    let have_qemu = Path::new(QEMU).exists();
    if !have_qemu {
        eprintln!("note: {QEMU} is not installed: messages are checked against the table only");
    }
    for row in BAD {
        let out = launcher(PROG, row.args, fake.dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let want = expected_stderr(row);
        let line = row.args.join(" ");
        if out.status.code() != Some(1) {
            failures.push(format!("`{line}`: exit status {:?}, expected 1", out.status));
        }
        if stderr != want {
            failures.push(format!("`{line}`:\n  got:  {stderr:?}\n  want: {want:?}"));
        }
        if !out.stdout.is_empty() {
            failures.push(format!("`{line}`: unexpected stdout {:?}", String::from_utf8_lossy(&out.stdout)));
        }
        let started = fake.started();
        if !started.is_empty() {
            failures.push(format!("`{line}`: started {started:?}"));
            for s in started {
                let _ = std::fs::remove_file(fake.dir.path().join(s));
            }
        }
        if matches!(row.qemu, Qemu::Same | Qemu::Renamed) {
            if let Some(q) = qemu_stderr(row.args) {
                let q = if matches!(row.qemu, Qemu::Renamed) { q.replace("7.2", "8.2") } else { q };
                // QEMU sometimes adds a summary line after the cause (-serial): compare what we print.
                let n = want.lines().count();
                let q_first: Vec<&str> = q.lines().take(n).collect();
                let ours: Vec<&str> = want.lines().collect();
                if q_first != ours {
                    failures.push(format!("`{line}`: QEMU says {q:?}, we say {want:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} bad lines misbehave:\n{}", failures.len(), BAD.len(), failures.join("\n"));
}

#[test]
fn the_prefix_is_the_program_name() {
    let fake = FakeLibexec::new();
    let out = launcher("tessera", &["-m", "1G,bogus=1"], fake.dir.path());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "tessera: -m 1G,bogus=1: Invalid parameter 'bogus'\n");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn unknown_log_item_prints_the_list_like_qemu() {
    let fake = FakeLibexec::new();
    for args in [&["-d", "foo"][..], &["-d", "int,bogus"], &["-d", "help"]] {
        let out = launcher(PROG, args, fake.dir.path());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stderr.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("Log items (comma separated):\n"), "{text}");
        assert!(text.contains("\nguest_errors "), "{text}");
        assert!(fake.started().is_empty());
        if Path::new(QEMU).exists() {
            let q = run_with_timeout(
                {
                    let mut c = Command::new(QEMU);
                    c.args(args).args(["-display", "none"]);
                    c
                },
                Duration::from_secs(10),
            );
            assert_eq!(q.status.code(), Some(1), "QEMU {args:?}");
            assert!(String::from_utf8_lossy(&q.stdout).starts_with("Log items (comma separated):\n"));
        }
    }
}

#[test]
fn informational_options() {
    let fake = FakeLibexec::new();
    let out = launcher(PROG, &["-version"], fake.dir.path());
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("QEMU emulator version 8.2.0 (tessera "), "{text}");
    for (args, needle) in [
        (&["-h"][..], "-machine"),
        (&["-help"], "-chardev"),
        (&["-machine", "help"], "pc-i440fx-8.2"),
        (&["-M", "?"], "pc-i440fx-8.2"),
        (&["-cpu", "help"], "qemu64"),
        (&["-accel", "help"], "kvm"),
        (&["-device", "help"], "isa-debug-exit"),
        (&["-device", "isa-debug-exit,help"], "iobase"),
    ] {
        let out = launcher(PROG, args, fake.dir.path());
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(needle), "{args:?}: {text}");
    }
    assert!(fake.started().is_empty());
}

// ---------------------------------------------------------------------------------------------------------------
// good lines, through the library

fn parse(args: &[&str]) -> (VmConfig, Vec<String>) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let parsed = config::parse(&args, PROG).unwrap_or_else(|e| panic!("{args:?}: {}", e.render(PROG)));
    match parsed.command {
        LaunchCommand::Run(cfg) => (*cfg, parsed.warnings),
        LaunchCommand::Print { text, .. } => panic!("{args:?} printed {text}"),
    }
}

fn cfg(args: &[&str]) -> VmConfig {
    let mut all = vec!["-kernel", K];
    all.extend_from_slice(args);
    parse(&all).0
}

#[test]
fn memory_sizes() {
    for (arg, bytes) in [
        ("512", 512u64 << 20),
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("1.5G", 3 << 29),
        ("size=2G", 2 << 30),
        ("262144k", 256 << 20),
        ("1073741824B", 1 << 30),
        ("1G,maxmem=2G", 1 << 30),
        ("1T", 1 << 40),
    ] {
        assert_eq!(cfg(&["-m", arg]).ram_size, bytes, "-m {arg}");
    }
    assert_eq!(cfg(&[]).ram_size, config::DEFAULT_RAM);
    // Later -m options merge into earlier ones; a repeated key keeps its last value; `--opt` is `-opt`.
    assert_eq!(cfg(&["-m", "1G", "--m", "size=2G,size=256M"]).ram_size, 256 << 20);
    let c = cfg(&["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"]);
    assert_eq!(c.ram_size, 256 << 20);
    assert!(c.memory_backend.as_ref().unwrap().share);
    let c = cfg(&["-m", "256M", "-object", "memory-backend-memfd,id=mem,size=256M", "-M", "pc,memory-backend=mem"]);
    assert_eq!(c.memory_backend.unwrap().id, "mem");
}

#[test]
fn smp_topologies() {
    let t = |args: &str| {
        let s = cfg(&["-smp", args]).smp;
        (s.cpus, s.sockets, s.dies, s.cores, s.threads, s.maxcpus)
    };
    assert_eq!(cfg(&[]).smp.cpus, 1);
    // Since QEMU 6.2 missing values prefer cores over sockets.
    assert_eq!(t("4"), (4, 1, 1, 4, 1, 4));
    assert_eq!(t("8,sockets=2,cores=2,threads=2"), (8, 2, 1, 2, 2, 8));
    assert_eq!(t("2,maxcpus=4"), (2, 1, 1, 4, 1, 4));
    assert_eq!(t("sockets=2"), (2, 2, 1, 1, 1, 2));
    assert_eq!(t("4,sockets=2"), (4, 2, 1, 2, 1, 4));
    assert_eq!(t("16,sockets=2,dies=2,cores=2,threads=2,maxcpus=16"), (16, 2, 2, 2, 2, 16));
    assert_eq!(t("cpus=0x4"), (4, 1, 1, 4, 1, 4));
}

#[test]
fn accelerators_and_cpus() {
    assert_eq!(cfg(&[]).accels, [AccelKind::Tcg]);
    assert_eq!(cfg(&["-accel", "kvm"]).accels, [AccelKind::Kvm]);
    assert_eq!(cfg(&["-enable-kvm"]).accels, [AccelKind::Kvm]);
    assert_eq!(cfg(&["-accel", "kvm", "-accel", "tcg"]).accels, [AccelKind::Kvm, AccelKind::Tcg]);
    assert_eq!(cfg(&["-machine", "pc,accel=kvm:tcg"]).accels, [AccelKind::Kvm, AccelKind::Tcg]);
    assert_eq!(cfg(&["-machine", "type=pc-i440fx-8.2"]).accels, [AccelKind::Tcg]);
    assert_eq!(cfg(&[]).cpu_model, "qemu64");
    assert_eq!(cfg(&["-accel", "kvm", "-cpu", "host"]).cpu_model, "host");
    assert_eq!(cfg(&["-cpu", "max"]).cpu_model, "max");
}

#[test]
fn serial_ports_and_chardevs() {
    // -nographic: COM1 on the terminal, multiplexed with the (future) monitor: Ctrl-A keys active.
    let c = cfg(&["-nographic"]);
    assert_eq!(c.serials, ["serial0"]);
    assert_eq!(c.chardevs[0].backend, CharBackend::Stdio);
    assert!(c.chardevs[0].mux);
    assert!(!c.chardevs[0].signal, "Ctrl-C goes to the guest with a muxed terminal");
    let c = cfg(&["-nographic", "-monitor", "none"]);
    assert!(!c.chardevs[0].mux);
    assert!(c.chardevs[0].signal);
    let c = cfg(&["-serial", "stdio", "-display", "none"]);
    assert_eq!((c.chardevs[0].backend.clone(), c.chardevs[0].mux), (CharBackend::Stdio, false));
    assert!(c.chardevs[0].signal);
    let c = cfg(&["-serial", "mon:stdio"]);
    assert!(c.chardevs[0].mux && !c.chardevs[0].signal);
    let c = cfg(&["-chardev", "stdio,id=t,mux=on", "-serial", "chardev:t"]);
    assert!(c.chardevs[0].mux && c.chardevs[0].signal, "-chardev keeps its own signal= (default on)");
    // No -serial and no -nographic: COM1 exists, its output goes nowhere (QEMU's would go to a display).
    let c = cfg(&["-display", "none"]);
    assert_eq!(c.chardevs[0].backend, CharBackend::Null);
    assert!(cfg(&["-serial", "none"]).serials.is_empty());
    assert!(cfg(&["-nodefaults"]).serials.is_empty());
    let c = cfg(&["-serial", "file:/tmp/x,,y", "-serial", "pty", "-serial", "null"]);
    assert_eq!(c.serials, ["serial0", "serial1", "serial2"]);
    assert_eq!(c.chardevs[0].backend, CharBackend::File { path: "/tmp/x,,y".into(), append: false });
    assert_eq!(c.chardevs[1].backend, CharBackend::Pty);
    let (c, warnings) = parse(&["-kernel", K, "-serial", "telnet::4444,server,nowait"]);
    let CharBackend::Socket(s) = &c.chardevs[0].backend else { panic!() };
    assert_eq!(s.addr, SocketAddr::Tcp { host: String::new(), port: "4444".into() });
    assert!(s.server && !s.wait && s.telnet);
    // QEMU's legacy -serial syntax takes short-form booleans without the deprecation warning.
    assert!(warnings.is_empty(), "{warnings:?}");
    let (_, warnings) = parse(&["-kernel", K, "-object", "memory-backend-memfd,id=m,size=1G,share"]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let c = cfg(&["-serial", "unix:/tmp/s.sock,server=on"]);
    let CharBackend::Socket(s) = &c.chardevs[0].backend else { panic!() };
    assert!(s.server && s.wait, "wait defaults to on for a server");
    let c = cfg(&[
        "-chardev",
        "socket,id=sock,path=/tmp/t.sock,server=on,wait=off,logfile=/tmp/log,logappend=on",
        "-serial",
        "chardev:sock",
    ]);
    assert_eq!(c.chardevs[0].id, "sock");
    assert_eq!(c.chardevs[0].logfile.as_deref(), Some("/tmp/log"));
    assert!(c.chardevs[0].logappend);
    // One mux chardev can serve two ports; an unused -chardev is checked but not planned.
    let c = cfg(&[
        "-chardev",
        "null,id=m,mux=on",
        "-chardev",
        "null,id=unused",
        "-serial",
        "chardev:m",
        "-serial",
        "chardev:m",
    ]);
    assert_eq!(c.serials, ["m", "m"]);
    assert_eq!(c.chardevs.len(), 1);
}

#[test]
fn everything_else() {
    let c = cfg(&[
        "-append",
        "console=ttyS0 a,b",
        "-initrd",
        K,
        "-name",
        "guest=vm1,process=tessera-vm1,debug-threads=on",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-no-reboot",
        "-no-shutdown",
        "-S",
        "-d",
        "int,guest_errors",
        "-D",
        "/tmp/tessera.log",
        "-pidfile",
        "/tmp/tessera.pid",
        "-display",
        "none",
    ]);
    assert_eq!(c.append, "console=ttyS0 a,b", "-append is not a key=value list");
    assert_eq!(c.initrd.as_deref(), Some(K));
    assert_eq!(c.name.as_deref(), Some("vm1"));
    assert_eq!(c.process_name.as_deref(), Some("tessera-vm1"));
    let d = c.debug_exit.as_ref().unwrap();
    assert_eq!((d.iobase, d.iosize), (0xf4, 4));
    assert!(c.no_reboot && c.no_shutdown && c.start_paused);
    assert_eq!(c.log_items, ["int", "guest_errors"]);
    assert_eq!(c.log_file.as_deref(), Some("/tmp/tessera.log"));
    assert_eq!(c.pidfile.as_deref(), Some("/tmp/tessera.pid"));
    let d = cfg(&["-device", "isa-debug-exit"]).debug_exit.unwrap();
    assert_eq!((d.iobase, d.iosize), (0x501, 2), "QEMU's defaults");
}

#[test]
fn plan_of_a_typical_line() {
    let c = cfg(&["-nographic", "-m", "256M", "-initrd", K, "-append", "console=ttyS0", "-D", "/tmp/l", "-d", "int"]);
    let p = plan::build(&c);
    assert_eq!(p.chardevs.len(), 1);
    let ch = &p.chardevs[0];
    let ChildConfig::Chardev(cc) = &ch.config else { panic!() };
    assert_eq!(cc.id, "serial0");
    assert!(cc.mux);
    let ChardevBackend::Stdio { input, output, raw } = &cc.backend else { panic!("{:?}", cc.backend) };
    assert!(raw);
    assert_eq!(p.resources[ch.fds[input.0 as usize]], Resource::Stdin);
    assert_eq!(p.resources[ch.fds[output.0 as usize]], Resource::Stdout);
    assert_eq!(p.resources[ch.fds[cc.frontends[0].0 as usize]], Resource::SerialChardev(0));
    assert_eq!(p.resources[ch.fds[cc.log.file.unwrap().0 as usize]], Resource::LogFile("/tmp/l".into()));
    let ChildConfig::Core(core) = &p.core.config else { panic!() };
    assert_eq!(core.ram.size, 256 << 20);
    assert_eq!(core.serial.len(), 1);
    assert_eq!(p.resources[p.core.fds[core.serial[0].channel.0 as usize]], Resource::SerialCore(0));
    let kernel = core.boot.kernel.as_ref().unwrap();
    assert_eq!(p.resources[p.core.fds[kernel.fd.0 as usize]], Resource::Kernel(K.into()));
    assert_eq!(core.boot.initrd.as_ref().unwrap().path, K);
    assert_eq!(core.boot.cmdline, "console=ttyS0");
    assert_eq!(core.log.items, ["int"]);
    // The log file is opened once and shared.
    assert_eq!(p.resources.iter().filter(|r| matches!(r, Resource::LogFile(_))).count(), 1);
    // QEMU's order: log file, chardevs, then the kernel.
    let pos = |want: &Resource| p.resources.iter().position(|r| r == want).unwrap();
    assert!(pos(&Resource::LogFile("/tmp/l".into())) < pos(&Resource::Stdin));
    assert!(pos(&Resource::Stdin) < pos(&Resource::Kernel(K.into())));
}

#[test]
fn plan_of_sockets_and_mux() {
    let c = cfg(&[
        "-chardev",
        "socket,id=s,path=/tmp/p.sock,server=on,wait=on",
        "-chardev",
        "null,id=m,mux=on",
        "-serial",
        "chardev:s",
        "-serial",
        "chardev:m",
        "-serial",
        "chardev:m",
    ]);
    let p = plan::build(&c);
    assert_eq!(p.chardevs.len(), 2);
    let ChildConfig::Chardev(s) = &p.chardevs[0].config else { panic!() };
    let ChardevBackend::SocketServer { listener, connected, telnet } = &s.backend else { panic!() };
    assert!(!telnet);
    let l = p.chardevs[0].fds[listener.0 as usize];
    assert!(
        matches!(&p.resources[l], Resource::Listener { addr: SocketAddr::Unix(path), .. } if path == "/tmp/p.sock")
    );
    let a = p.chardevs[0].fds[connected.unwrap().0 as usize];
    assert!(matches!(&p.resources[a], Resource::Accepted { listener, .. } if *listener == l));
    let ChildConfig::Chardev(m) = &p.chardevs[1].config else { panic!() };
    assert_eq!(m.frontends.len(), 2);
    let ChildConfig::Core(core) = &p.core.config else { panic!() };
    let ids: Vec<&str> = core.serial.iter().map(|s| s.chardev_id.as_str()).collect();
    assert_eq!(ids, ["s", "m", "m"]);
}

#[test]
fn dump_plan_starts_nothing() {
    let fake = FakeLibexec::new();
    let out = launcher(PROG, &["-kernel", K, "-nographic", "--tessera-dump-plan"], fake.dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("child tessera-chardev [serial0], fds [0, 1, 2]"), "{text}");
    assert!(text.contains("mux: true"), "{text}");
    assert!(text.contains("Kernel(\"/etc/hostname\")"), "{text}");
    assert!(fake.started().is_empty());
}

/// Lines Tessera accepts (each is also parsed by the tests above) that QEMU must accept too: QEMU runs them
/// paused (`-S`) and must still be running after a moment. Differential only: skipped without QEMU or a
/// kernel for it to load.
#[test]
fn qemu_accepts_the_good_lines_too() {
    // The installed kernel, shared by the QEMU threads below for the whole test.
    let vmlinuz: &'static str = Box::leak(
        tessera_tests::linux_guest::kernel().map(|p| p.display().to_string()).unwrap_or_default().into_boxed_str(),
    );
    #[rustfmt::skip]
    const GOOD: &[&[&str]] = &[
        &["-m", "512"], &["-m", "1.5G"], &["-m", "size=2G,size=256M"], &["--m", "262144k"], &["-m", "1G,maxmem=2G"],
        &["-smp", "4"], &["-smp", "8,sockets=2,cores=2,threads=2"], &["-smp", "2,maxcpus=4"], &["-smp", "cpus=0x4"],
        &["-smp", "16,sockets=2,dies=2,cores=2,threads=2,maxcpus=16"], &["-smp", "sockets=2"],
        &["-machine", "pc,accel=kvm:tcg"], &["-M", "pc"], &["-accel", "tcg"], &["-accel", "kvm", "-accel", "tcg"],
        &["-cpu", "max"], &["-cpu", "qemu64"],
        &["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"],
        &["-m", "256M", "-object", "memory-backend-memfd,id=mem,size=256M", "-M", "pc,memory-backend=mem"],
        &["-serial", "null", "-serial", "none", "-serial", "null"], &["-serial", "mon:stdio"],
        &["-chardev", "null,id=m,mux=on", "-serial", "chardev:m", "-serial", "chardev:m"],
        &["-name", "guest=vm1,process=tessera-vm1,debug-threads=on"], &["-name", "vm1"],
        &["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"], &["-device", "isa-debug-exit"],
        &["-no-reboot", "-no-shutdown"], &["-d", "int,guest_errors"], &["-monitor", "none"], &["-nodefaults"],
        &["-append", "console=ttyS0 a,b"],
    ];
    if !Path::new(QEMU).exists() || !Path::new(vmlinuz).exists() {
        eprintln!("note: {QEMU} or {vmlinuz} is missing: the comparison is skipped (Tessera's side is tested above)");
        return;
    }
    // Tessera accepts every line (checked before any QEMU starts, so a failure here leaves nothing running).
    for args in GOOD {
        cfg(args);
    }
    let handles: Vec<_> = GOOD
        .iter()
        .map(|args| {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            std::thread::spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let mut child = Command::new(QEMU)
                    .args(["-display", "none", "-S", "-kernel", vmlinuz])
                    .args(&args)
                    .current_dir(dir.path())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                std::thread::sleep(Duration::from_secs(3));
                let exited = child.try_wait().unwrap();
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                exited.map(|s| {
                    format!("QEMU refused `{}` ({s}): {}", args.join(" "), String::from_utf8_lossy(&out.stderr))
                })
            })
        })
        .collect();
    let refused: Vec<String> = handles.into_iter().filter_map(|h| h.join().unwrap()).collect();
    assert!(refused.is_empty(), "{}", refused.join("\n"));
}
