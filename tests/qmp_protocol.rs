//! QMP as a client sees it, against a running graph (the real launcher, tessera-core and tessera-chardev with a
//! tiny guest that prints "boot" and then a "t" now and then on COM1): the greeting, capabilities negotiation,
//! QEMU's error replies for bad input (the monitor keeps serving), `id` echo, events, stop/cont on both engines
//! (the guest's output stops and resumes), system_reset, system_powerdown, several clients one after another,
//! the `-mon chardev=` and tcp forms, `-S`, and `quit`. Expected replies are QEMU 7.2/8.2's (compared with the
//! installed qemu-system-x86_64 7.2; see docs/qmp.md).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::bins;
use tessera_tests::qmp::{error_class, ticking_guest, Qmp, STEP};

/// The VM under test: killed (with its children: PDEATHSIG) if the test fails; its serial output and stderr are
/// printed then.
struct Vm {
    child: Option<Child>,
    serial: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vm {
    fn start(accel: &str, delay: u32, extra: &[&str]) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let kernel = ticking_guest(dir.path(), delay);
        let serial = dir.path().join("serial.txt");
        let child = bins::launcher_command("qemu-system-x86_64")
            .args(["-accel", accel, "-display", "none", "-m", "64M", "-kernel"])
            .arg(&kernel)
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(extra)
            .spawn()
            .unwrap();
        Vm { child: Some(child), serial, _dir: dir }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Wait until the guest's output satisfies `f`.
    fn wait_serial(&self, what: &str, f: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + STEP;
        while !f(&self.serial()) {
            assert!(Instant::now() < deadline, "waiting for {what}; serial output so far: {:?}", self.serial());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ticks(&self) -> usize {
        self.serial().matches('t').count()
    }

    /// Wait for the launcher to exit; its status and stderr.
    fn wait(mut self) -> (i32, String) {
        let out = bins::wait_output(self.child.take().unwrap(), STEP);
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Ok(out) = c.wait_with_output() {
                eprintln!("launcher stderr:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            eprintln!("guest serial output:\n{}", self.serial());
        }
    }
}

#[test]
fn greeting_negotiation_bad_input_and_quit_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock").display().to_string();
    let vm = Vm::start("tcg", 3_000_000, &["-qmp", &format!("unix:{sock},server=on,wait=off")]);
    let (mut q, greeting) = Qmp::unix(&sock);
    // qmp-spec §2.2.
    assert_eq!(greeting["QMP"]["version"]["qemu"], json!({"micro": 0, "minor": 2, "major": 8}), "{greeting}");
    assert!(greeting["QMP"]["version"]["package"].is_string(), "{greeting}");
    assert_eq!(greeting["QMP"]["capabilities"], json!([]), "{greeting}");

    // Negotiation mode: only qmp_capabilities.
    let r = q.cmd(r#"{"execute": "query-status"}"#);
    assert_eq!(error_class(&r), ("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"));
    let r = q.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#);
    assert_eq!(error_class(&r), ("GenericError", "Capability oob not available"));
    assert_eq!(q.cmd(r#"{"execute": "qmp_capabilities", "id": 1}"#), json!({"return": {}, "id": 1}));
    let r = q.cmd(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(error_class(&r), ("CommandNotFound", "Capabilities negotiation is already complete, command ignored"));

    // Bad input: QEMU's replies, and the monitor keeps serving.
    let r = q.cmd("{\"execute\": \"stop\" garbage}\n");
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(r["error"]["desc"].as_str().unwrap().starts_with("JSON parse error, "), "{r}");
    q.send("}}\n");
    for _ in 0..2 {
        assert_eq!(error_class(&q.reply()), ("GenericError", "JSON parse error, expecting value"));
    }
    assert_eq!(error_class(&q.cmd("[1, 2]")), ("GenericError", "QMP input must be a JSON object"));
    assert_eq!(error_class(&q.cmd("\"str\"")), ("GenericError", "QMP input must be a JSON object"));
    assert_eq!(
        error_class(&q.cmd(r#"{"execute": 5}"#)),
        ("GenericError", "QMP input member 'execute' must be a string")
    );
    assert_eq!(error_class(&q.cmd(r#"{"exec": "stop"}"#)), ("GenericError", "QMP input member 'exec' is unexpected"));
    assert_eq!(
        error_class(&q.cmd(r#"{"execute": "stop", "arguments": []}"#)),
        ("GenericError", "QMP input member 'arguments' must be an object")
    );
    let r = q.cmd(r#"{"execute": "no-such-command", "id": [1, 2]}"#);
    assert_eq!(error_class(&r), ("CommandNotFound", "The command no-such-command has not been found"));
    assert_eq!(r["id"], json!([1, 2]), "the id is echoed on errors too");
    assert_eq!(
        error_class(&q.cmd(r#"{"execute": "stop", "arguments": {"x": 1}}"#)),
        ("GenericError", "Parameter 'x' is unexpected")
    );
    assert_eq!(
        error_class(&q.cmd(r#"{"execute": "x-tessera-backend-swap", "arguments": {"id": "d"}}"#)),
        ("GenericError", "Parameter 'socket' is missing")
    );
    assert_eq!(
        error_class(&q.cmd(r#"{"execute": "x-tessera-backend-restart", "arguments": {"id": 7}}"#)),
        ("GenericError", "Invalid parameter type for 'id', expected: string")
    );
    assert_eq!(
        error_class(&q.cmd(r#"{"execute": "x-tessera-backend-restart", "arguments": {"id": "nope"}}"#)),
        ("DeviceNotFound", "Device 'nope' not found")
    );
    // Raw bytes that are not UTF-8, and a value split across writes.
    q.send_bytes(b"\"\x01\xff\"\n");
    assert_eq!(q.reply()["error"]["class"], "GenericError");
    q.send(r#"{"execute": "query-"#);
    std::thread::sleep(Duration::from_millis(50));
    let r = q.cmd(r#"status", 'id': 'single quotes'}"#);
    assert_eq!(
        r,
        json!({"return": {"status": "running", "singlestep": false, "running": true}, "id": "single quotes"})
    );

    // Pipelined commands are answered in order, a forwarded one before a local one sent after it.
    q.send(r#"{"execute": "query-status", "id": 1}{"execute": "query-version", "id": 2}"#);
    assert_eq!(q.reply()["id"], 1);
    assert_eq!(q.reply()["id"], 2);

    let v = q.cmd(r#"{"execute": "query-version"}"#);
    assert_eq!(v["return"]["qemu"], json!({"micro": 0, "minor": 2, "major": 8}), "{v}");
    let cmds = q.cmd(r#"{"execute": "query-commands"}"#);
    let names: Vec<&str> = cmds["return"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for n in ["qmp_capabilities", "query-status", "stop", "cont", "system_powerdown", "system_reset", "quit"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert!(names.contains(&"x-tessera-backend-restart") && names.contains(&"x-tessera-backend-swap"));

    // quit: SHUTDOWN (host-qmp-quit) before the return, then the VM ends with status 0.
    assert_eq!(q.cmd(r#"{"execute": "quit", "id": "q"}"#), json!({"return": {}, "id": "q"}));
    assert_eq!(q.event("SHUTDOWN")["data"], json!({"guest": false, "reason": "host-qmp-quit"}));
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
    assert!(!Path::new(&sock).exists(), "the monitor's socket is removed at exit");
}

/// stop/cont/system_reset on an engine; `delay` paces the guest's ticks to the engine's speed.
fn pause_resume_reset(accel: &str, delay: u32) {
    let probe = tempfile::tempdir().unwrap();
    let sock = probe.path().join("qmp.sock").display().to_string();
    let vm = Vm::start(accel, delay, &["-qmp", &format!("unix:{sock},server=on,wait=off")]);
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    vm.wait_serial("the guest to tick", |s| s.matches('t').count() >= 3);

    assert_eq!(q.cmd(r#"{"execute": "stop"}"#), json!({"return": {}}));
    q.event("STOP");
    let r = q.cmd(r#"{"execute": "query-status"}"#);
    assert_eq!(r["return"], json!({"status": "paused", "singlestep": false, "running": false}));
    // A paused guest prints nothing (a byte in flight through the chardev may land first).
    std::thread::sleep(Duration::from_millis(200));
    let paused_at = vm.ticks();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(vm.ticks(), paused_at, "the guest ran while paused");
    // A second stop is not an event.
    assert_eq!(q.cmd(r#"{"execute": "stop"}"#), json!({"return": {}}));

    assert_eq!(q.cmd(r#"{"execute": "cont", "id": 2}"#), json!({"return": {}, "id": 2}));
    q.event("RESUME");
    assert!(q.events.is_empty(), "no STOP for the second stop: {:?}", q.events);
    vm.wait_serial("ticks after cont", |s| s.matches('t').count() > paused_at + 2);

    assert_eq!(q.cmd(r#"{"execute": "system_reset"}"#), json!({"return": {}}));
    assert_eq!(q.event("RESET")["data"], json!({"guest": false, "reason": "host-qmp-system-reset"}));
    vm.wait_serial("the guest to boot again", |s| s.matches("boot").count() == 2);
    let r = q.cmd(r#"{"execute": "query-status"}"#);
    assert_eq!(r["return"]["status"], "running");

    let r = q.cmd(r#"{"execute": "system_powerdown"}"#);
    if accel == "tcg" {
        assert_eq!(r, json!({"return": {}}));
        q.event("POWERDOWN");
    } else {
        // Tessera's KVM machine has no ACPI yet: said so instead of pressing a button nobody sees.
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        assert!(r["error"]["desc"].as_str().unwrap().contains("no ACPI power button"), "{r}");
    }
    q.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
}

#[test]
fn stop_cont_and_system_reset_on_the_software_cpu() {
    pause_resume_reset("tcg", 3_000_000);
}

#[test]
fn stop_cont_and_system_reset_on_kvm() {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("SKIPPED: /dev/kvm cannot be opened");
        return;
    }
    // KVM on this host may be in-kernel emulation at a few MIPS: a short delay loop.
    pause_resume_reset("kvm", 20_000);
}

#[test]
fn clients_one_after_another_on_mon_chardev_and_tcp_monitors() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mon.sock").display().to_string();
    let vm = Vm::start(
        "tcg",
        3_000_000,
        &[
            "-chardev",
            &format!("socket,id=mon0,path={sock},server=on,wait=off"),
            "-mon",
            "chardev=mon0,mode=control",
            "-qmp",
            &format!("tcp:127.0.0.1:{port},server=on,wait=off"),
        ],
    );
    // First client: negotiates, then leaves in the middle of a command.
    let (mut a, _) = Qmp::unix(&sock);
    a.negotiate();
    a.send(r#"{"execute": "query-st"#);
    drop(a);
    // The next client starts afresh: greeting, negotiation mode.
    let (mut b, greeting) = Qmp::unix(&sock);
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    let r = b.cmd(r#"{"execute": "stop"}"#);
    assert_eq!(error_class(&r).0, "CommandNotFound");
    b.negotiate();
    // The tcp monitor, at the same time: events reach every client in command mode.
    let (mut t, _) = Qmp::tcp(port);
    t.negotiate();
    assert_eq!(b.cmd(r#"{"execute": "stop"}"#), json!({"return": {}}));
    b.event("STOP");
    t.event("STOP");
    assert_eq!(t.cmd(r#"{"execute": "cont"}"#), json!({"return": {}}));
    t.event("RESUME");
    b.event("RESUME");
    drop(b);
    for _ in 0..3 {
        let (mut c, _) = Qmp::unix(&sock);
        c.negotiate();
        assert_eq!(c.cmd(r#"{"execute": "query-status"}"#)["return"]["running"], true);
    }
    t.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
}

#[test]
fn minus_s_waits_in_prelaunch_until_cont() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock").display().to_string();
    let vm = Vm::start("tcg", 3_000_000, &["-S", "-qmp", &format!("unix:{sock},server=on,wait=off")]);
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    let r = q.cmd(r#"{"execute": "query-status"}"#);
    assert_eq!(r["return"], json!({"status": "prelaunch", "singlestep": false, "running": false}));
    // stop in prelaunch changes nothing and says nothing.
    assert_eq!(q.cmd(r#"{"execute": "stop"}"#), json!({"return": {}}));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.serial(), "", "the guest ran before cont");
    assert_eq!(q.cmd(r#"{"execute": "cont"}"#), json!({"return": {}}));
    q.event("RESUME");
    assert!(q.events.is_empty(), "{:?}", q.events);
    vm.wait_serial("the guest to boot", |s| s.starts_with("boot"));
    q.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
}

#[test]
fn monitor_options_are_checked_like_qemu() {
    let run = |args: &[&str]| {
        let out = bins::launcher_command("qemu-system-x86_64")
            .args(["-kernel", "/dev/null", "-display", "none"])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["-mon", "chardev=zz,mode=control"]);
    assert_eq!(code, Some(1));
    assert_eq!(err, "qemu-system-x86_64: -mon chardev=zz,mode=control: chardev \"zz\" not found\n");
    let (_, err) = run(&["-mon", "mode=control"]);
    assert_eq!(err, "qemu-system-x86_64: -mon mode=control: Parameter 'chardev' is missing\n");
    let (_, err) = run(&["-chardev", "null,id=z", "-mon", "chardev=z,mode=bogus"]);
    assert_eq!(err, "qemu-system-x86_64: -mon chardev=z,mode=bogus: Parameter 'mode' does not accept value 'bogus'\n");
    let (_, err) = run(&["-chardev", "null,id=z", "-mon", "chardev=z,mode=control,foo=1"]);
    assert_eq!(err, "qemu-system-x86_64: -mon chardev=z,mode=control,foo=1: Invalid parameter 'foo'\n");
    let (_, err) = run(&["-qmp", "bogus:x"]);
    assert!(err.contains("'bogus:x' is not a valid char driver"), "{err}");
    let (code, err) = run(&["-qmp", "unix:/nonexistent/dir/q.sock,server=on,wait=off"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Failed to bind socket to /nonexistent/dir/q.sock: No such file or directory"), "{err}");
    // What Tessera does not serve says so.
    let (_, err) = run(&["-qmp", "stdio"]);
    assert!(err.contains("not supported"), "{err}");
    let (_, err) = run(&["-chardev", "null,id=z", "-mon", "chardev=z"]);
    assert!(err.contains("not supported") && err.contains("HMP"), "{err}");
    let (_, err) = run(&["-S"]);
    assert!(err.contains("-S without a QMP monitor"), "{err}");
    let (_, err) = run(&["-tessera-restart-limit", "many"]);
    assert!(err.contains("'many' is not a number"), "{err}");
}

/// Events of the guest's own doing: a reset (the 0xcf9 reset control register) with `-no-reboot` is a
/// SHUTDOWN with reason `guest-reset`, an ACPI S5 power-off a SHUTDOWN with reason `guest-shutdown`; a reset
/// without `-no-reboot` is a RESET with `"guest": true`.
#[test]
fn the_guests_resets_and_power_off_are_events() {
    const RESET: &str = "    mov $0xcf9, %dx\n    mov $0x6, %al\n    outb %al, %dx\n1:  jmp 1b\n";
    // PM1a_CNT (0x604): SLP_TYP = 0 (the DSDT's \_S5), SLP_EN (bit 13).
    const POWER_OFF: &str = "    mov $0x604, %dx\n    mov $0x2000, %ax\n    outw %ax, %dx\n1:  jmp 1b\n";
    for (code, no_reboot, event, data) in [
        (RESET, true, "SHUTDOWN", json!({"guest": true, "reason": "guest-reset"})),
        (POWER_OFF, false, "SHUTDOWN", json!({"guest": true, "reason": "guest-shutdown"})),
        (RESET, false, "RESET", json!({"guest": true, "reason": "guest-reset"})),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let kernel = tessera_tests::tiny_guest::pvh_guest(dir.path(), "ev", code, "").unwrap();
        let sock = dir.path().join("qmp.sock").display().to_string();
        let mut cmd = bins::launcher_command("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-display", "none", "-serial", "null", "-S", "-kernel"])
            .arg(&kernel)
            .args(["-qmp", &format!("unix:{sock},server=on,wait=off")]);
        if no_reboot {
            cmd.arg("-no-reboot");
        }
        let child = cmd.spawn().unwrap();
        // (Killed if the test fails: its children follow it.)
        struct Kill(Option<Child>);
        impl Drop for Kill {
            fn drop(&mut self) {
                if let Some(c) = &mut self.0 {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        let mut child = Kill(Some(child));
        let (mut q, _) = Qmp::unix(&sock);
        q.negotiate();
        // Started paused so that the client is listening before the guest acts.
        assert_eq!(q.cmd(r#"{"execute": "cont"}"#), json!({"return": {}}));
        let e = q.event(event);
        assert_eq!(e["data"], data, "{code}: {e}");
        if event == "SHUTDOWN" {
            let out = bins::wait_output(child.0.take().unwrap(), STEP);
            assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        } else {
            // A machine that keeps resetting keeps saying so.
            q.event("RESET");
            q.cmd(r#"{"execute": "quit"}"#);
            let out = bins::wait_output(child.0.take().unwrap(), STEP);
            assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// `-no-shutdown`: the guest's power-off stops it (SHUTDOWN, STOP, status `shutdown`); `cont` wants a reset
/// first; `system_reset` leaves it in `prelaunch` until `cont`, as QEMU.
#[test]
fn no_shutdown_keeps_a_powered_off_guest_until_reset_and_cont() {
    let dir = tempfile::tempdir().unwrap();
    let code = format!(
        "{}    mov $0x604, %dx\n    mov $0x2000, %ax\n    outw %ax, %dx\n1:  jmp 1b\n",
        tessera_tests::tiny_guest::asm::print("msg")
    );
    let kernel = tessera_tests::tiny_guest::pvh_guest(
        dir.path(),
        "off",
        &code,
        &tessera_tests::tiny_guest::asm::string("msg", "on\n"),
    )
    .unwrap();
    let sock = dir.path().join("qmp.sock").display().to_string();
    let serial = dir.path().join("serial.txt");
    let child = bins::launcher_command("qemu-system-x86_64")
        .args(["-accel", "tcg", "-display", "none", "-no-shutdown", "-S", "-kernel"])
        .arg(&kernel)
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-qmp", &format!("unix:{sock},server=on,wait=off")])
        .spawn()
        .unwrap();
    let vm = Vm { child: Some(child), serial: serial.clone(), _dir: dir };
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    q.cmd(r#"{"execute": "cont"}"#);
    q.event("RESUME");
    assert_eq!(q.event("SHUTDOWN")["data"], json!({"guest": true, "reason": "guest-shutdown"}));
    q.event("STOP");
    let r = q.cmd(r#"{"execute": "query-status"}"#);
    assert_eq!(r["return"], json!({"status": "shutdown", "singlestep": false, "running": false}));
    let r = q.cmd(r#"{"execute": "cont"}"#);
    assert_eq!(error_class(&r), ("GenericError", "Resetting the Virtual Machine is required"));
    assert_eq!(q.cmd(r#"{"execute": "system_reset"}"#), json!({"return": {}}));
    q.event("RESET");
    let deadline = Instant::now() + STEP;
    loop {
        let r = q.cmd(r#"{"execute": "query-status"}"#);
        if r["return"]["status"] == "prelaunch" {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(vm.serial(), "on\n", "the guest did not run again before cont");
    q.cmd(r#"{"execute": "cont"}"#);
    q.event("RESUME");
    assert_eq!(q.event("SHUTDOWN")["data"]["reason"], "guest-shutdown");
    vm.wait_serial("the second boot", |s| s == "on\non\n");
    q.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
}
