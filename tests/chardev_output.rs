//! tessera-chardev moves guest output to the host side in order, whatever the host side is, and loses
//! nothing on the way out.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tessera_ipc::messages::ChardevBackend;
use tessera_tests::chardev::{config, pattern, serial_channel, Fds, Running, PATIENCE};

fn memfd(name: &std::ffi::CStr) -> std::fs::File {
    nix::sys::memfd::memfd_create(name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).expect("memfd").into()
}

fn contents(f: &std::fs::File) -> Vec<u8> {
    let len = f.metadata().expect("stat").len() as usize;
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, 0).expect("read back");
    buf
}

/// Guest output in chunks of many sizes (1 byte to 64 KiB), 8 MiB in all.
fn chunks() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut total = 0;
    let mut i = 0u32;
    while total < 8 << 20 {
        let len = [1usize, 7, 100, 4095, 4096, 4097, 65536, 30_000][i as usize % 8];
        let c = pattern(len, i);
        total += c.len();
        out.push(c);
        i += 1;
    }
    out
}

#[test]
fn output_reaches_a_file_and_the_logfile_in_order() {
    let file = memfd(c"chardev-file");
    let log = memfd(c"chardev-log");
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let output = fds.add(file.try_clone().unwrap());
    let mut cfg = config("file0", ChardevBackend::File { output, input: None }, vec![fe]);
    cfg.logfile = Some(fds.add(log.try_clone().unwrap()));
    let running = Running::start(cfg, fds);

    let chunks = chunks();
    for c in &chunks {
        core.output(c);
    }
    // The core goes away: the chardev drains the channel and, with no front end left, exits 0 on its own.
    drop(core);
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    let want: Vec<u8> = chunks.concat();
    let got = contents(&file);
    assert_eq!(got.len(), want.len(), "file length; stderr:\n{err}");
    assert!(got == want, "file contents differ from what the guest wrote");
    assert!(contents(&log) == want, "the log file is not a copy of the guest output");
}

#[test]
fn output_reaches_a_pipe_as_stdio_and_input_comes_back() {
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let (in_r, in_w) = nix::unistd::pipe().unwrap();
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let input = fds.add(in_r);
    let output = fds.add(out_w);
    // raw=true on something that is not a terminal is simply not applied.
    let cfg = config("serial0", ChardevBackend::Stdio { input, output, raw: true }, vec![fe]);
    let running = Running::start(cfg, fds);

    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        std::fs::File::from(out_r).read_to_end(&mut got).unwrap();
        got
    });
    let chunks = chunks();
    for c in &chunks {
        core.output(c);
    }
    let mut typed = std::fs::File::from(in_w);
    typed.write_all(b"echo hi\n").unwrap();
    assert_eq!(core.input(8), b"echo hi\n");
    // Input EOF (the user's stdin closed) does not end anything.
    drop(typed);
    core.output(b"after EOF");
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    let got = reader.join().unwrap();
    let mut want = chunks.concat();
    want.extend_from_slice(b"after EOF");
    assert_eq!(got.len(), want.len(), "stderr:\n{err}");
    assert!(got == want, "pipe contents differ from what the guest wrote");
}

#[test]
fn output_reaches_a_socket_client_and_its_input_reaches_the_front_end() {
    let (mine, theirs) = UnixStream::pair().unwrap();
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let stream = fds.add(theirs);
    let running = Running::start(config("sock0", ChardevBackend::SocketClient { stream }, vec![fe]), fds);

    let mut reader = mine.try_clone().unwrap();
    let want: Vec<u8> = chunks().concat();
    let n = want.len();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0; n];
        reader.read_exact(&mut got).unwrap();
        got
    });
    for c in chunks() {
        core.output(&c);
    }
    assert!(reader.join().unwrap() == want, "socket stream differs from what the guest wrote");
    (&mine).write_all(b"typed on the socket").unwrap();
    assert_eq!(core.input(19), b"typed on the socket");
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
}

#[test]
fn shutdown_drains_output_already_sent() {
    let file = memfd(c"chardev-drain");
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let output = fds.add(file.try_clone().unwrap());
    let mut running = Running::start(config("drain", ChardevBackend::File { output, input: None }, vec![fe]), fds);
    // The guest's last words, then at once the launcher's Shutdown, while the core's end stays open: what
    // was sent must still be written.
    let big = pattern(3 << 20, 7);
    for c in big.chunks(60_000) {
        core.output(c);
    }
    core.output(b"hello\n");
    running.shutdown();
    // A launcher may close its end right after Shutdown: that is not the launcher dying.
    running.close_control();
    let started = Instant::now();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    let mut want = big;
    want.extend_from_slice(b"hello\n");
    assert!(contents(&file) == want, "output lost at shutdown; stderr:\n{err}");
    // The drain waits for EOF at most about a second (plus scheduling slack on a loaded machine).
    assert!(started.elapsed() < PATIENCE, "shutdown took {:?}", started.elapsed());
    drop(core);
}

#[test]
fn null_backend_discards_output_but_the_logfile_gets_it() {
    let log = memfd(c"chardev-null-log");
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let mut cfg = config("null0", ChardevBackend::Null, vec![fe]);
    cfg.logfile = Some(fds.add(log.try_clone().unwrap()));
    let running = Running::start(cfg, fds);
    core.output(b"into the void\n");
    // Nothing comes back from a null chardev.
    assert!(core.quiet_for(Duration::from_millis(200)));
    drop(core);
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    assert_eq!(contents(&log), b"into the void\n");
}

#[test]
fn file_input_reaches_the_front_end() {
    let file = memfd(c"chardev-out");
    let mut input = memfd(c"chardev-in");
    input.write_all(b"from input-path\n").unwrap();
    let input_fd = std::fs::File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&input)))
        .expect("reopen the input memfd at offset 0");
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let output = fds.add(file.try_clone().unwrap());
    let input_index = fds.add(input_fd);
    let cfg = config("f", ChardevBackend::File { output, input: Some(input_index) }, vec![fe]);
    let running = Running::start(cfg, fds);
    assert_eq!(core.input(16), b"from input-path\n");
    match core.quiet_for(Duration::from_millis(200)) {
        true => {}
        false => panic!("unexpected {:?} after the input file's end", core.recv(Instant::now() + PATIENCE)),
    }
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
}
