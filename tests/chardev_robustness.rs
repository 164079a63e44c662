//! Hostile or broken peers: malformed frames, a host side that stops reading, a bad configuration. The
//! process keeps serving what still works and never panics.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tessera_ipc::frame::{self, MAX_BODY};
use tessera_ipc::messages::{ChardevBackend, ChildToLauncher, CoreToChardev, FdIndex};
use tessera_tests::chardev::{config, contains, serial_channel, Fds, Running, PATIENCE};

fn memfd(name: &std::ffi::CStr) -> std::fs::File {
    nix::sys::memfd::memfd_create(name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).expect("memfd").into()
}

fn contents(f: &std::fs::File) -> Vec<u8> {
    let len = f.metadata().expect("stat").len() as usize;
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, 0).expect("read back");
    buf
}

#[test]
fn malformed_frames_close_only_the_front_end_that_sent_them() {
    let file = memfd(c"chardev-robust");
    let mut fds = Fds::default();
    let mut cores = Vec::new();
    let mut indexes = Vec::new();
    for _ in 0..6 {
        let (core, fe) = serial_channel(&mut fds);
        cores.push(core);
        indexes.push(fe);
    }
    let output = fds.add(file.try_clone().unwrap());
    let mut cfg = config("mux0", ChardevBackend::File { output, input: None }, indexes);
    cfg.mux = true;
    let running = Running::start(cfg, fds);

    // #0: not a Tessera frame at all.
    cores[0].chan.send_raw(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    // #1: a header announcing a body past the limit.
    let mut oversized = b"TS".to_vec();
    oversized.extend_from_slice(&0u16.to_le_bytes());
    oversized.extend_from_slice(&(MAX_BODY as u32 + 1).to_le_bytes());
    cores[1].chan.send_raw(&oversized).unwrap();
    // #2: a message that does not exist (variant 7).
    let mut unknown = b"TS".to_vec();
    unknown.extend_from_slice(&0u16.to_le_bytes());
    unknown.extend_from_slice(&1u32.to_le_bytes());
    unknown.push(7);
    cores[2].chan.send_raw(&unknown).unwrap();
    // #3: a valid frame cut short, then the core's end closes.
    let whole = frame::encode(&CoreToChardev::Output(b"never shown".to_vec()), 0).unwrap();
    cores[3].chan.send_raw(&whole[..whole.len() - 3]).unwrap();
    // #4: a frame that claims descriptors it does not carry.
    cores[4].chan.send_raw(&frame::encode(&CoreToChardev::Output(b"x".to_vec()), 3).unwrap()).unwrap();
    let mut cores: Vec<_> = cores.into_iter().map(Some).collect();
    drop(cores[3].take());

    // Each bad front end is hung up on...
    for (i, core) in cores.iter().enumerate().take(5) {
        if let Some(core) = core {
            let mut buf = [0u8; 1];
            let mut sock = core.chan.socket();
            sock.set_read_timeout(Some(PATIENCE)).unwrap();
            assert_eq!(sock.read(&mut buf).expect("read"), 0, "front end #{i} should have been closed");
        }
    }
    // ...while #5 is still served.
    let good = cores[5].as_ref().unwrap();
    good.output(b"still served\n");
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    assert_eq!(contents(&file), b"still served\n");
    for (i, what) in [
        (0, "bad frame magic"),
        (1, "exceeds the limit"),
        (2, "malformed frame body"),
        (3, "in the middle of a frame"),
        (4, "file descriptors"),
    ] {
        let line = format!("tessera-chardev: mux0: front end #{i}: ");
        let found =
            err.lines().any(|l| l.starts_with(&line) && l.contains(what) && l.ends_with("closing that channel"));
        assert!(found, "no log line for front end #{i} ({what}) in:\n{err}");
    }
}

#[test]
fn a_host_side_that_stops_reading_does_not_stop_input() {
    let (mine, theirs) = UnixStream::pair().unwrap();
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let stream = fds.add(theirs);
    let running = Running::start(config("slow", ChardevBackend::SocketClient { stream }, vec![fe]), fds);

    // The guest prints far more than the socket and the chardev's queue hold, and nobody reads it.
    let core = std::sync::Arc::new(core);
    let sender = {
        let core = core.clone();
        std::thread::spawn(move || {
            for i in 0..200u32 {
                core.output(&vec![(i % 250) as u8; 64 * 1024]);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile what the user types still reaches the guest.
    (&mine).write_all(b"typed while stuck").unwrap();
    assert_eq!(core.input(17), b"typed while stuck");
    // The guest is held back while the host side is merely slow, then its output is dropped once the host
    // side has taken nothing for a while: the sender finishes.
    sender.join().unwrap();
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    assert!(err.contains("tessera-chardev: slow: the host side is not keeping up with guest output"), "{err}");
    // Warnings are rate-limited (one per few seconds), not one per dropped frame (over a hundred here).
    assert!(err.matches("not keeping up").count() <= 5, "{err}");
    drop(mine);
}

#[test]
fn a_configuration_naming_missing_descriptors_is_a_fatal_error() {
    let mut fds = Fds::default();
    let (_core, fe) = serial_channel(&mut fds);
    let backend = ChardevBackend::File { output: FdIndex(9), input: None };
    let running = Running::launch(config("bad", backend, vec![fe]), fds, |_| {});
    match running.next_message(Instant::now() + PATIENCE) {
        ChildToLauncher::Fatal { message } => {
            assert!(message.starts_with("tessera-chardev: bad: "), "{message}");
            assert!(message.contains("#9"), "{message}");
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
    let (status, err) = running.wait();
    assert_eq!(status.code(), Some(1), "stderr:\n{err}");
}

#[test]
fn front_ends_closing_one_by_one() {
    let file = memfd(c"chardev-closing");
    let mut fds = Fds::default();
    let (a, fa) = serial_channel(&mut fds);
    let (b, fb) = serial_channel(&mut fds);
    let output = fds.add(file.try_clone().unwrap());
    let mut cfg = config("two", ChardevBackend::File { output, input: None }, vec![fa, fb]);
    cfg.mux = true;
    let mut running = Running::start(cfg, fds);
    a.output(b"a1 ");
    drop(a);
    std::thread::sleep(Duration::from_millis(100));
    assert!(running.alive(), "one front end left: keep serving");
    b.output(b"b1");
    drop(b);
    // None left: the chardev flushes and leaves by itself, exit status 0.
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    assert_eq!(contents(&file), b"a1 b1");
    assert!(err.is_empty(), "a front end closing cleanly is not an error: {err}");
}

#[test]
fn pty_backend_serves_whoever_opens_the_slave() {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let path = nix::unistd::ttyname(&pty.slave).expect("ttyname");
    // Raw mode on the slave, so what we write comes back unchanged (QEMU sets the pty raw too).
    let mut t = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t).unwrap();
    drop(pty.slave);
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let master = fds.add(pty.master);
    let backend = ChardevBackend::Pty { master, path: path.display().to_string() };
    let running = Running::start(config("pty0", backend, vec![fe]), fds);

    // Nobody has the slave open: output is dropped, nothing blocks.
    core.output(b"nobody hears this");
    for round in 0..2 {
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open the pty slave");
        // The chardev notices a reader within about a second.
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        while !contains(&seen, b"ping") {
            assert!(Instant::now() < deadline, "round {round}: output never reached the slave: {seen:?}");
            core.output(b"ping");
            let more = read_until_timeout(&slave, Duration::from_millis(300));
            seen.extend(more);
        }
        assert!(!contains(&seen, b"nobody hears this"), "{seen:?}");
        (&slave).write_all(b"pong").unwrap();
        assert_eq!(core.input(4), b"pong");
        drop(slave);
        std::thread::sleep(Duration::from_millis(200));
    }
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
}

fn read_until_timeout(f: &std::fs::File, wait: Duration) -> Vec<u8> {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(f.as_fd(), nix::poll::PollFlags::POLLIN)];
    let ms = nix::poll::PollTimeout::try_from(wait.as_millis() as u32).unwrap();
    if matches!(nix::poll::poll(&mut fds, ms), Ok(n) if n > 0) {
        let mut buf = [0u8; 4096];
        if let Ok(n) = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(f), &mut buf) {
            return buf[..n].to_vec();
        }
    }
    Vec::new()
}

#[test]
fn a_core_that_does_not_take_input_holds_input_back_without_losing_it() {
    let (in_r, in_w) = nix::unistd::pipe().unwrap();
    let (_out_r, out_w) = nix::unistd::pipe().unwrap();
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let input = fds.add(in_r);
    let output = fds.add(out_w);
    let running = Running::start(config("paced", ChardevBackend::Stdio { input, output, raw: false }, vec![fe]), fds);
    let typed = tessera_tests::chardev::pattern(1 << 20, 3);
    let writer = {
        let typed = typed.clone();
        std::thread::spawn(move || std::fs::File::from(in_w).write_all(&typed).unwrap())
    };
    // The core reads nothing for a while: the chardev stops reading the pipe rather than drop keys.
    std::thread::sleep(Duration::from_millis(500));
    assert!(core.input(typed.len()) == typed, "typed input lost or reordered");
    writer.join().unwrap();
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
}

#[test]
fn with_mux_ctrl_a_x_works_even_when_the_core_takes_no_input() {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut fds = Fds::default();
    let (_core, fe) = serial_channel(&mut fds);
    let tty = fds.add(pty.slave);
    let mut cfg = config("stuck", ChardevBackend::Stdio { input: tty, output: tty, raw: true }, vec![fe]);
    cfg.mux = true;
    let running = Running::start(cfg, fds);
    let master = std::sync::Arc::new(pty.master);
    // Far more keys than the channel to the (stuck) core holds, then C-a x.
    let typist = {
        let master = master.clone();
        std::thread::spawn(move || {
            let mut keys = vec![b'k'; 2 << 20];
            keys.extend_from_slice(b"\x01x");
            let mut rest = &keys[..];
            while !rest.is_empty() {
                let n = nix::unistd::write(&*master, rest).expect("type");
                rest = &rest[n..];
            }
        })
    };
    // Drain what the chardev prints so its terminal output never fills up.
    let deadline = Instant::now() + PATIENCE;
    let msg = loop {
        let mut buf = [0u8; 4096];
        let mut pfd = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&*master), nix::poll::PollFlags::POLLIN)];
        if matches!(nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(10u8)), Ok(n) if n > 0) {
            let _ = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&*master), &mut buf);
        }
        let _ = running.control.set_nonblocking(true);
        match running.control.try_recv::<ChildToLauncher>() {
            Ok((msg, _)) => break msg,
            Err(tessera_ipc::IpcError::WouldBlock) => {}
            Err(e) => panic!("control channel: {e}"),
        }
        assert!(Instant::now() < deadline, "C-a x was not honoured while the core took no input");
    };
    assert!(matches!(msg, ChildToLauncher::Exit { code: 0, .. }), "{msg:?}");
    typist.join().unwrap();
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    assert!(err.contains("tessera-chardev: stuck: front end #0 is not taking input"), "{err}");
}
