//! `mux=on` on a terminal (a pty here, so the raw-mode path runs): the Ctrl-A keys, and the terminal put
//! back afterwards.

use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{tcgetattr, LocalFlags, OutputFlags};
use nix::unistd::{write, Pid};
use tessera_ipc::messages::{ChardevBackend, ChardevToCore, ChildToLauncher};
use tessera_tests::chardev::{
    chardev_binary, config, contains, read_until, serial_channel, CoreEnd, Fds, Running, PATIENCE,
};

struct Terminal {
    master: OwnedFd,
}

impl Terminal {
    fn type_keys(&self, keys: &[u8]) {
        let mut rest = keys;
        while !rest.is_empty() {
            let n = write(&self.master, rest).expect("type on the terminal");
            rest = &rest[n..];
        }
    }

    fn read_until(&self, text: &[u8]) -> Vec<u8> {
        read_until(self.master.as_fd(), &String::from_utf8_lossy(text), |got| contains(got, text))
    }

    fn lflags(&self) -> LocalFlags {
        tcgetattr(&self.master).expect("tcgetattr").local_flags
    }
}

/// A chardev on a fresh pty's slave side, with `frontends` serial channels and mux on.
fn start(frontends: usize, signal: bool) -> (Running, Terminal, Vec<CoreEnd>) {
    start_by(frontends, signal, None)
}

/// As [`start`], through `cmd` instead of running the binary directly.
fn start_by(frontends: usize, signal: bool, cmd: Option<Command>) -> (Running, Terminal, Vec<CoreEnd>) {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut fds = Fds::default();
    let mut cores = Vec::new();
    let mut indexes = Vec::new();
    for _ in 0..frontends {
        let (core, fe) = serial_channel(&mut fds);
        cores.push(core);
        indexes.push(fe);
    }
    let input = fds.add(pty.slave.try_clone().unwrap());
    let output = fds.add(pty.slave);
    let mut cfg = config("serial0", ChardevBackend::Stdio { input, output, raw: true }, indexes);
    cfg.mux = true;
    cfg.signal = signal;
    let term = Terminal { master: pty.master };
    assert!(term.lflags().contains(LocalFlags::ICANON), "a fresh pty starts in canonical mode");
    let running = match cmd {
        None => Running::start(cfg, fds),
        Some(cmd) => {
            let running = Running::launch_command(cmd, cfg, fds);
            match running.next_message(Instant::now() + PATIENCE) {
                ChildToLauncher::Ready => {}
                other => panic!("expected Ready, got {other:?}"),
            }
            running
        }
    };
    (running, term, cores)
}

#[test]
fn raw_mode_is_qemus_and_ctrl_a_x_exits_then_restores_the_terminal() {
    let (running, term, cores) = start(1, true);
    let t = tcgetattr(&term.master).unwrap();
    assert!(!t.local_flags.intersects(LocalFlags::ICANON | LocalFlags::ECHO), "{:?}", t.local_flags);
    assert!(t.local_flags.contains(LocalFlags::ISIG), "signal=on keeps Ctrl-C working: {:?}", t.local_flags);
    assert!(t.output_flags.contains(OutputFlags::OPOST), "output post-processing stays on, as in QEMU");

    term.type_keys(b"\x01x");
    let seen = term.read_until(b"QEMU: Terminated");
    assert!(contains(&seen, b"QEMU: Terminated\r\n"), "{seen:?}");
    match running.next_message(Instant::now() + PATIENCE) {
        ChildToLauncher::Exit { code: 0, reason } => assert!(reason.contains("serial0"), "{reason}"),
        other => panic!("expected Exit {{ code: 0 }}, got {other:?}"),
    }
    // Nothing typed reached the guest.
    assert!(cores[0].quiet_for(Duration::from_millis(100)));
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    assert!(term.lflags().contains(LocalFlags::ICANON | LocalFlags::ECHO), "terminal not restored");
}

#[test]
fn signal_off_clears_isig() {
    let (running, term, _cores) = start(1, false);
    assert!(!term.lflags().contains(LocalFlags::ISIG));
    running.shutdown();
    let (status, _) = running.wait();
    assert!(status.success());
    assert!(term.lflags().contains(LocalFlags::ISIG), "terminal not restored");
}

#[test]
fn typed_keys_reach_the_guest_and_ctrl_a_ctrl_a_sends_one_ctrl_a() {
    let (running, term, cores) = start(1, true);
    // Raw mode: CR is not turned into NL, nothing is line-buffered.
    term.type_keys(b"root\r\x01\x01after\x01zgone");
    assert_eq!(cores[0].input(15), b"root\r\x01aftergone");
    cores[0].output(b"login ok\n");
    // Output post-processing is on: the terminal turns the guest's \n into \r\n.
    term.read_until(b"login ok\r\n");
    running.shutdown();
    assert!(running.wait().0.success());
}

#[test]
fn ctrl_a_h_prints_the_key_list() {
    let (running, term, cores) = start(1, true);
    term.type_keys(b"\x01h");
    let seen = term.read_until(b"C-a C-a ");
    let text = String::from_utf8_lossy(&seen);
    for key in ["C-a h    ", "C-a x    ", "C-a s    ", "C-a t    ", "C-a b    ", "C-a c    ", "C-a C-a  "] {
        assert!(text.contains(key), "{key:?} missing from {text:?}");
    }
    // QEMU's layout: each line ends in \n\r, which the terminal shows as \r\n\r.
    assert!(text.starts_with("\r\n\rC-a h    "), "{text:?}");
    assert!(cores[0].quiet_for(Duration::from_millis(100)), "the escape keys must not reach the guest");
    running.shutdown();
    assert!(running.wait().0.success());
}

#[test]
fn ctrl_a_b_sends_a_break_in_order_with_input() {
    let (running, term, cores) = start(1, true);
    term.type_keys(b"a\x01bz");
    let deadline = Instant::now() + PATIENCE;
    let mut events = Vec::new();
    while events.len() < 3 {
        events.push(cores[0].recv(deadline));
    }
    assert_eq!(
        events,
        [ChardevToCore::Input(b"a".to_vec()), ChardevToCore::Break, ChardevToCore::Input(b"z".to_vec())]
    );
    running.shutdown();
    assert!(running.wait().0.success());
}

#[test]
fn ctrl_a_t_stamps_lines_and_ctrl_a_s_and_c_explain_themselves() {
    let (running, term, cores) = start(1, true);
    term.type_keys(b"\x01s");
    term.read_until(b"no disk images to commit");
    term.type_keys(b"\x01c");
    term.read_until(b"no monitor yet");
    // Input still goes to the one console after C-a c.
    term.type_keys(b"k");
    assert_eq!(cores[0].input(1), b"k");

    term.type_keys(b"\x01t");
    // Make sure the toggle was processed before the guest writes: round-trip some input.
    term.type_keys(b"sync");
    assert_eq!(cores[0].input(4), b"sync");
    cores[0].output(b"first\nsecond\n");
    let seen = term.read_until(b"second");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("first\r\n[00:00:0"), "{text:?}");
    running.shutdown();
    assert!(running.wait().0.success());
}

#[test]
fn ctrl_a_c_cycles_between_front_ends() {
    let (running, term, cores) = start(2, true);
    term.type_keys(b"0");
    assert_eq!(cores[0].input(1), b"0");
    term.type_keys(b"\x01c1");
    assert_eq!(cores[1].input(1), b"1");
    // Past the last front end comes the monitor's place: a note, then back to the first.
    term.type_keys(b"\x01c");
    term.read_until(b"no monitor yet");
    term.type_keys(b"again");
    assert_eq!(cores[0].input(5), b"again");
    // Both front ends' output reaches the terminal whatever has the focus.
    cores[1].output(b"from the second UART");
    term.read_until(b"from the second UART");
    assert!(cores[1].quiet_for(Duration::from_millis(50)));
    running.shutdown();
    assert!(running.wait().0.success());
}

#[test]
fn sigterm_and_launcher_death_restore_the_terminal() {
    let (running, term, _cores) = start(1, true);
    assert!(!term.lflags().contains(LocalFlags::ICANON));
    kill(Pid::from_raw(running.child.id() as i32), Signal::SIGTERM).unwrap();
    let (status, _) = running.wait();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc_sigterm()), "died by SIGTERM: {status}");
    assert!(term.lflags().contains(LocalFlags::ICANON | LocalFlags::ECHO), "terminal not restored after SIGTERM");

    // The launcher's end of the control channel closing (the launcher died) ends the process too.
    let (running, term, _cores) = start(1, true);
    assert!(!term.lflags().contains(LocalFlags::ICANON));
    let mut running = running;
    running.close_control();
    let (status, err) = running.wait();
    assert_eq!(status.code(), Some(1), "stderr:\n{err}");
    assert!(err.contains("tessera-chardev: serial0: the launcher closed the control channel"), "{err}");
    assert!(term.lflags().contains(LocalFlags::ICANON | LocalFlags::ECHO), "terminal not restored after EOF");
}

#[test]
fn sigint_is_left_to_the_launcher() {
    let (mut running, term, cores) = start(1, true);
    // Ctrl-C from the terminal goes to the whole foreground group; the chardev must survive it and keep
    // serving until the launcher tells it to stop.
    kill(Pid::from_raw(running.child.id() as i32), Signal::SIGINT).unwrap();
    kill(Pid::from_raw(running.child.id() as i32), Signal::SIGQUIT).unwrap();
    cores[0].output(b"still here");
    term.read_until(b"still here");
    assert!(running.alive());
    running.shutdown();
    assert!(running.wait().0.success());
}

fn libc_sigterm() -> i32 {
    Signal::SIGTERM as i32
}

#[test]
fn one_descriptor_may_serve_both_directions() {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let tty = fds.add(pty.slave);
    let mut cfg = config("serial0", ChardevBackend::Stdio { input: tty, output: tty, raw: true }, vec![fe]);
    cfg.mux = true;
    let term = Terminal { master: pty.master };
    let running = Running::start(cfg, fds);
    term.type_keys(b"in");
    assert_eq!(core.input(2), b"in");
    core.output(b"out");
    term.read_until(b"out");
    running.shutdown();
    assert!(running.wait().0.success());
    assert!(term.lflags().contains(LocalFlags::ICANON), "terminal not restored");
}

#[test]
fn the_launchers_death_restores_the_terminal() {
    // The chardev's parent is a shell standing in for the launcher; SIGKILL it. The launcher's end of the
    // control channel stays open (the test holds it), so only the parent-death signal can tell the chardev.
    let mut sh = Command::new("sh");
    sh.args(["-c", "\"$0\" --ipc-fd 3 & wait"]).arg(chardev_binary());
    sh.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let (mut running, term, _cores) = start_by(1, true, Some(sh));
    assert!(!term.lflags().contains(LocalFlags::ICANON));
    running.child.kill().unwrap();
    running.child.wait().unwrap();
    let deadline = Instant::now() + PATIENCE;
    while !term.lflags().contains(LocalFlags::ICANON | LocalFlags::ECHO) {
        assert!(Instant::now() < deadline, "terminal still raw after the launcher died");
        std::thread::sleep(Duration::from_millis(20));
    }
    // And the chardev is gone: its end of the control channel closed.
    running.control.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match running.control.try_recv::<ChildToLauncher>() {
            Err(tessera_ipc::IpcError::Closed) => break,
            Err(tessera_ipc::IpcError::WouldBlock) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(Instant::now() < deadline, "tessera-chardev still running after its launcher died");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The chardev as the session leader of the pty, which becomes its controlling terminal: Ctrl-C typed there
/// is a real SIGINT to its foreground process group.
fn start_controlling(signal: bool) -> (Running, Terminal, CoreEnd) {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let path = std::ffi::CString::new(nix::unistd::ttyname(&pty.slave).unwrap().into_os_string().into_encoded_bytes())
        .unwrap();
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let tty = fds.add(pty.slave);
    let mut cfg = config("serial0", ChardevBackend::Stdio { input: tty, output: tty, raw: true }, vec![fe]);
    cfg.mux = true;
    cfg.signal = signal;
    let term = Terminal { master: pty.master };
    let running = Running::start_with(cfg, fds, move |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid, open and close are async-signal-safe; `path` was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if nix::libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A session leader without a controlling terminal acquires the first terminal it opens.
                let fd = nix::libc::open(path.as_ptr(), nix::libc::O_RDWR);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                nix::libc::close(fd);
                Ok(())
            });
        }
    });
    (running, term, core)
}

#[test]
fn ctrl_c_on_the_controlling_terminal_follows_signal() {
    // signal=on: Ctrl-C is a signal (for the launcher, which shares the process group); the chardev ignores
    // it and the byte does not reach the guest.
    let (mut running, term, core) = start_controlling(true);
    term.type_keys(b"\x03\x1ca");
    assert_eq!(core.input(1), b"a");
    assert!(running.alive(), "Ctrl-C must not kill tessera-chardev");
    running.shutdown();
    assert!(running.wait().0.success());

    // signal=off: Ctrl-C is just a key for the guest.
    let (running, term, core) = start_controlling(false);
    term.type_keys(b"\x03\x1ca");
    assert_eq!(core.input(3), b"\x03\x1ca");
    running.shutdown();
    assert!(running.wait().0.success());
}
