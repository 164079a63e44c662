//! The launcher's network options (`-nic`, `-netdev`, `-device virtio-net-pci`): bad lines print exactly one
//! QEMU-style error, exit 1 and start nothing; where QEMU has the same error the installed QEMU 7.2 runs the same
//! line and must print the same message (the comparison is skipped where QEMU is absent). Good lines plan the
//! expected tessera-net processes and core devices.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tessera_ipc::messages::ChildConfig;
use tessera_launcher::config::{self, Command as LaunchCommand, VmConfig};
use tessera_launcher::net::NetBackend;
use tessera_launcher::plan::{self, Resource};
use tessera_tests::bins;

const PROG: &str = "qemu-system-x86_64";
const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// A file that exists and is not a kernel: Tessera wants -kernel before it builds anything; the fake children
/// never read it. (QEMU runs the lines without it: it would fail loading it before creating the NICs.)
const K: &str = "/etc/hostname";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Qemu {
    /// QEMU 7.2 prints the same message.
    Same,
    /// Tessera's own (a feature not there yet): no comparison.
    Own,
}
use Qemu::{Own, Same};

#[rustfmt::skip]
const BAD: &[(&[&str], &str, Qemu)] = &[
    (&["-nic", "foo"], "-nic foo: Parameter 'type' does not accept value 'foo'", Same),
    (&["-nic", "user,model=e1000e,foo=bar"], "-nic user,model=e1000e,foo=bar: Invalid parameter 'foo'", Same),
    (&["-nic", "user,netdev=x"], "-nic user,netdev=x: Invalid parameter 'netdev'", Same),
    (&["-nic", "user,model=foo"], "Unsupported NIC model: foo", Same),
    (&["-nic", "user,model=e1000"], "the NIC model 'e1000' (use model=virtio-net-pci) is not supported by tessera yet", Own),
    (&["-nic", "user,mac=zz"], "-nic user,mac=zz: invalid syntax for ethernet address", Same),
    (&["-nic", "user,mac=01:00:00:00:00:01"], "-nic user,mac=01:00:00:00:00:01: NIC cannot have multicast MAC address", Same),
    (&["-nic", "user,hostfwd=tcp::70000-:22"], "-nic user,hostfwd=tcp::70000-:22: Invalid host forwarding rule 'tcp::70000-:22' (Bad host port)", Same),
    (&["-netdev", "user"], "-netdev user: Parameter 'id' is missing", Same),
    (&["-netdev", "user,id=n0", "-netdev", "user,id=n0"], "-netdev user,id=n0: Duplicate ID 'n0' for netdev", Same),
    (&["-netdev", "user,id=n0,bogus=1"], "-netdev user,id=n0,bogus=1: Invalid parameter 'bogus'", Same),
    (&["-netdev", "user,id=n0,restrict=maybe"], "-netdev user,id=n0,restrict=maybe: Parameter 'restrict' expects 'on' or 'off'", Same),
    (&["-netdev", "user,id=n0,ipv4=off,ipv6=off"], "-netdev user,id=n0,ipv4=off,ipv6=off: IPv4 and IPv6 disabled", Same),
    (&["-netdev", "user,id=n0,hostfwd=bad"], "-netdev user,id=n0,hostfwd=bad: Invalid host forwarding rule 'bad' (No : separators)", Same),
    (&["-netdev", "user,id=n0,hostfwd=foo::22-:22"], "-netdev user,id=n0,hostfwd=foo::22-:22: Invalid host forwarding rule 'foo::22-:22' (Bad protocol name)", Same),
    (&["-netdev", "user,id=n0,hostfwd=tcp::22"], "-netdev user,id=n0,hostfwd=tcp::22: Invalid host forwarding rule 'tcp::22' (Bad host port separator)", Same),
    (&["-netdev", "user,id=n0,hostfwd=tcp::22-1.2.3.4"], "-netdev user,id=n0,hostfwd=tcp::22-1.2.3.4: Invalid host forwarding rule 'tcp::22-1.2.3.4' (Missing guest address)", Same),
    (&["-netdev", "user,id=n0,hostfwd=tcp::22-x:1"], "-netdev user,id=n0,hostfwd=tcp::22-x:1: Invalid host forwarding rule 'tcp::22-x:1' (Bad guest address)", Same),
    (&["-netdev", "user,id=n0,hostfwd=tcp::22-:0"], "-netdev user,id=n0,hostfwd=tcp::22-:0: Invalid host forwarding rule 'tcp::22-:0' (Bad guest port)", Same),
    (&["-netdev", "user,id=n0,guestfwd=foo"], "-netdev user,id=n0,guestfwd=foo: Invalid guest forwarding rule 'foo'", Same),
    (&["-netdev", "user,id=n0,tftp=/srv"], "-netdev user,id=n0,tftp=/srv: the -netdev user option 'tftp' is not supported by tessera yet", Own),
    (&["-netdev", "user,id=n0,guestfwd=tcp:10.0.2.100:1234-chardev0"], "-netdev user,id=n0,guestfwd=tcp:10.0.2.100:1234-chardev0: guestfwd to a chardev (only the cmd: form is) is not supported by tessera yet", Own),
    (&["-netdev", "socket,id=n0,listen=:1234"], "-netdev socket,id=n0,listen=:1234: -netdev socket is not supported by tessera yet", Own),
    (&["-netdev", "foo,id=n0"], "-netdev foo,id=n0: Parameter 'type' does not accept value 'foo'", Same),
    (&["-netdev", "vhost-user,id=n0"], "-netdev vhost-user,id=n0: Parameter 'chardev' is missing", Same),
    (&["-netdev", "vhost-user,id=n0,chardev=x"], "-netdev vhost-user,id=n0,chardev=x: chardev \"x\" not found", Same),
    (&["-netdev", "vhost-user,id=n0,chardev=x,queues=2"], "-netdev vhost-user,id=n0,chardev=x,queues=2: more than one queue pair on a vhost-user netdev (queues=) is not supported by tessera yet", Own),
    (&["-netdev", "tap,id=n0,ifname=tap9"], "-netdev tap,id=n0,ifname=tap9: running the tap script (QEMU's default is /etc/qemu-ifup; use script=no) is not supported by tessera yet", Own),
    (&["-netdev", "tap,id=n0,script=/bin/up,downscript=no"], "-netdev tap,id=n0,script=/bin/up,downscript=no: running the tap script '/bin/up' (use script=no) is not supported by tessera yet", Own),
    (&["-netdev", "tap,id=n0,script=no,downscript=no,vhost=on"], "-netdev tap,id=n0,script=no,downscript=no,vhost=on: tap vhost=on is not supported by tessera yet", Own),
    (&["-netdev", "tap,id=n0,script=no,downscript=no,queues=32"], "-netdev tap,id=n0,script=no,downscript=no,queues=32: more than 16 queue pairs (queues=) is not supported by tessera yet", Own),
    (&["-netdev", "user,id=n0,queues=2"], "-netdev user,id=n0,queues=2: Invalid parameter 'queues'", Same),
    (&["-netdev", "tap,id=n0,bogus=1"], "-netdev tap,id=n0,bogus=1: Invalid parameter 'bogus'", Same),
    (&["-device", "virtio-net-pci,netdev=n1"], "-device virtio-net-pci,netdev=n1: Property 'virtio-net-device.netdev' can't find value 'n1'", Same),
    (&["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=zz"], "-device virtio-net-pci,netdev=n0,mac=zz: Property 'virtio-net-device.mac' doesn't take value 'zz'", Same),
    (&["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-net-pci,netdev=n0"], "-device virtio-net-pci,netdev=n0: Property 'virtio-net-device.netdev' can't take value 'n0', it's in use", Same),
    (&["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,bogus=1"], "-device virtio-net-pci,netdev=n0,bogus=1: Property 'virtio-net-pci.bogus' not found", Same),
    (&["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,addr=0x40"], "-device virtio-net-pci,netdev=n0,addr=0x40: Property 'virtio-net-pci.addr' doesn't take value '0x40'", Same),
    (&["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,vectors=0"], "-device virtio-net-pci,netdev=n0,vectors=0: the virtio-net-pci property 'vectors' is not supported by tessera yet", Own),
    (&["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mq=maybe"], "-device virtio-net-pci,netdev=n0,mq=maybe: Parameter 'mq' expects 'on' or 'off'", Own),
    (&["-device", "virtio-net-pci"], "-device virtio-net-pci: a virtio-net-pci without netdev= (no peer) is not supported by tessera yet", Own),
    (&["-net", "nic"], "-net nic: -net is not supported by tessera yet", Own),
];

/// A directory of fake children that leave a marker when started.
struct FakeLibexec {
    dir: tempfile::TempDir,
}

impl FakeLibexec {
    fn new() -> FakeLibexec {
        let dir = tempfile::tempdir().unwrap();
        for name in ["tessera-core", "tessera-chardev", "tessera-net", "tessera-blk"] {
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

/// QEMU's stderr for the line (paused, no display, no serial), or None when QEMU is not installed.
fn qemu_stderr(args: &[&str]) -> Option<String> {
    if !Path::new(QEMU).exists() {
        return None;
    }
    let mut cmd = Command::new(QEMU);
    cmd.args(["-display", "none", "-S", "-monitor", "none", "-serial", "none"]).args(args);
    let out = run_with_timeout(cmd, Duration::from_secs(10));
    Some(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_network_lines_fail_like_qemu_and_start_nothing() {
    let fake = FakeLibexec::new();
    let mut failures = Vec::new();
    for (args, message, qemu) in BAD {
        let mut all = vec!["-kernel", K];
        all.extend_from_slice(args);
        let mut cmd = Command::new(bins::launcher(PROG));
        cmd.args(&all).env("TESSERA_LIBEXEC_DIR", fake.dir.path());
        let out = run_with_timeout(cmd, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let want = format!("{PROG}: {message}\n");
        let line = args.join(" ");
        if out.status.code() != Some(1) {
            failures.push(format!("`{line}`: exit status {:?}, expected 1", out.status));
        }
        if stderr != want {
            failures.push(format!("`{line}`:\n  got:  {stderr:?}\n  want: {want:?}"));
        }
        let started = fake.started();
        if !started.is_empty() {
            failures.push(format!("`{line}`: started {started:?}"));
            for s in started {
                let _ = std::fs::remove_file(fake.dir.path().join(s));
            }
        }
        if *qemu == Same {
            if let Some(q) = qemu_stderr(args) {
                if q.lines().next() != want.lines().next() {
                    failures.push(format!("`{line}`: QEMU says {q:?}, we say {want:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} bad lines misbehave:\n{}", failures.len(), BAD.len(), failures.join("\n"));
}

fn parse(args: &[&str]) -> (VmConfig, Vec<String>) {
    let mut all: Vec<String> = vec!["-kernel".into(), K.into()];
    all.extend(args.iter().map(|s| s.to_string()));
    let parsed = config::parse(&all, PROG).unwrap_or_else(|e| panic!("{args:?}: {}", e.render(PROG)));
    match parsed.command {
        LaunchCommand::Run(c) => (*c, parsed.warnings),
        LaunchCommand::Print { .. } => panic!("{args:?}: printed instead of running"),
    }
}

#[test]
fn nic_user_plans_a_tessera_net_and_a_core_device() {
    let (cfg, warnings) =
        parse(&["-nic", "user,hostfwd=tcp:127.0.0.1:2222-:22,guestfwd=tcp:10.0.2.100:1-cmd:printf a,,b"]);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cfg.nics.len(), 1);
    assert_eq!(cfg.nics[0].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let p = plan::build(&cfg);
    assert_eq!(p.backends.len(), 1);
    let b = &p.backends[0];
    assert_eq!(b.binary, "tessera-net");
    assert_eq!(
        b.args,
        [
            "--socket-fd",
            "3",
            "--mac",
            "52:54:00:12:34:56",
            "--user",
            "hostfwd=tcp:127.0.0.1:2222-:22,guestfwd=tcp:10.0.2.100:1-cmd:printf a,,b"
        ]
    );
    assert_eq!(b.fds.len(), 1);
    assert_eq!(p.resources[b.fds[0]], Resource::NetListener(0));
    let ChildConfig::Core(core) = &p.core.config else { panic!("not a core config") };
    assert_eq!(core.vhost_user_net.len(), 1);
    let d = &core.vhost_user_net[0];
    assert_eq!((d.mac, d.queue_pairs, d.external), ([0x52, 0x54, 0, 0x12, 0x34, 0x56], 1, false));
    // The core's stream is the connection to that listener.
    let tessera_ipc::messages::VhostUserSocket::Connected(i) = d.socket else { panic!("not a connected socket") };
    assert_eq!(p.resources[p.core.fds[i.0 as usize]], Resource::NetConnect(0));
    assert!(p.dump().contains("tessera-net --socket-fd 3"), "{}", p.dump());
}

#[test]
fn netdev_and_device_forms() {
    // Two NICs: default MACs count up; -nic's come first (the machine creates them before -device's).
    let (cfg, _) = parse(&[
        "-netdev",
        "user,id=n0,restrict=on",
        "-device",
        "virtio-net-pci,netdev=n0,id=eth0,addr=5",
        "-nic",
        "user,model=virtio",
    ]);
    assert_eq!(cfg.nics.len(), 2);
    assert_eq!(cfg.nics[0].mac[5], 0x56);
    assert_eq!((cfg.nics[1].id.as_str(), cfg.nics[1].mac[5], cfg.nics[1].slot), ("eth0", 0x57, Some(5)));
    assert_eq!(cfg.nics[1].netdev.backend, NetBackend::User { options: vec![("restrict".into(), "on".into())] });

    // A tap: the launcher opens it and passes it as fd 4.
    let (cfg, _) = parse(&[
        "-netdev",
        "tap,id=t0,ifname=tsr0,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=t0,mac=52:54:00:aa:bb:cc",
    ]);
    let p = plan::build(&cfg);
    let b = &p.backends[0];
    assert_eq!(b.args[4..], ["--tap-fd", "4"]);
    assert_eq!(
        p.resources[b.fds[1]],
        Resource::Tap { ifname: Some("tsr0".into()), location: cfg.nics[0].netdev.location.clone() }
    );

    // vhost-user: no process, the core connects to the user's backend.
    let (cfg, _) = parse(&[
        "-chardev",
        "socket,id=c0,path=/run/x.sock",
        "-netdev",
        "vhost-user,id=v0,chardev=c0",
        "-device",
        "virtio-net-pci,netdev=v0",
    ]);
    let p = plan::build(&cfg);
    assert!(p.backends.is_empty());
    let ChildConfig::Core(core) = &p.core.config else { panic!("not a core config") };
    assert!(core.vhost_user_net[0].external);
    assert!(p.resources.iter().any(|r| matches!(r, Resource::Connect { .. })));

    // A netdev nothing uses: QEMU's warning, no process.
    let (cfg, warnings) = parse(&["-netdev", "user,id=lonely"]);
    assert_eq!(warnings, ["warning: netdev lonely has no peer"]);
    assert!(cfg.nics.is_empty());
    assert!(plan::build(&cfg).backends.is_empty());

    // -nic none: nothing.
    assert!(parse(&["-nic", "none"]).0.nics.is_empty());

    // Multiqueue: tap queues=N with mq=on exposes N pairs (the core then has the control queue); without mq=on
    // one pair, as in QEMU.
    for (mq, pairs) in [("on", 2u16), ("off", 1)] {
        let (cfg, _) = parse(&[
            "-netdev",
            "tap,id=t0,ifname=tsr0,script=no,downscript=no,queues=2",
            "-device",
            &format!("virtio-net-pci,netdev=t0,mq={mq}"),
        ]);
        let p = plan::build(&cfg);
        let ChildConfig::Core(core) = &p.core.config else { panic!("not a core config") };
        assert_eq!(core.vhost_user_net[0].queue_pairs, pairs);
        assert_eq!(p.backends[0].args.iter().any(|a| a == "--num-queues"), pairs > 1, "{:?}", p.backends[0].args);
    }
}

#[test]
fn nic_model_help() {
    let args: Vec<String> = ["-nic", "user,model=help"].iter().map(|s| s.to_string()).collect();
    match config::parse(&args, PROG).unwrap().command {
        LaunchCommand::Print { text, code } => {
            assert_eq!(code, 0);
            assert_eq!(text, "Supported NIC models:\nvirtio-net-pci\n");
        }
        LaunchCommand::Run(_) => panic!("model=help ran a VM"),
    }
}
