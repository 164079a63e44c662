//! `-chardev socket,server=on`: one client at a time, the next one after it leaves, telnet negotiation.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_ipc::messages::{ChardevBackend, ChardevToCore};
use tessera_tests::chardev::{config, serial_channel, CoreEnd, Fds, Running, PATIENCE};

/// A listening unix socket in a fresh directory (removed on drop).
struct Listener {
    dir: PathBuf,
    path: PathBuf,
}

impl Listener {
    fn new(tag: &str) -> (Listener, UnixListener) {
        let dir = std::env::temp_dir().join(format!("tessera-chardev-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.sock");
        let l = UnixListener::bind(&path).unwrap();
        (Listener { dir, path }, l)
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("read from the chardev's socket");
    buf
}

/// Wait until `client` is known to be served: what it types reaches the core.
fn handshake_through(client: &mut UnixStream, core: &CoreEnd, word: &[u8]) {
    client.write_all(word).unwrap();
    assert_eq!(core.input(word.len()), word);
}

#[test]
fn server_serves_a_second_client_after_the_first_leaves() {
    let (listener, l) = Listener::new("server");
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let listener_fd = fds.add(l);
    let backend = ChardevBackend::SocketServer { listener: listener_fd, connected: None, telnet: false };
    let running = Running::start(config("srv", backend, vec![fe]), fds);

    let mut first = listener.connect();
    handshake_through(&mut first, &core, b"one");
    core.output(b"to the first client");
    assert_eq!(read_exactly(&mut first, 19), b"to the first client");
    drop(first);

    // Nobody connected: this is dropped, as QEMU drops it.
    core.output(b"LOST");

    let mut second = listener.connect();
    handshake_through(&mut second, &core, b"two");
    core.output(b"to the second client");
    assert_eq!(read_exactly(&mut second, 20), b"to the second client");
    drop(second);

    // And a third, to be sure the listener is re-armed every time.
    let mut third = listener.connect();
    handshake_through(&mut third, &core, b"three");
    core.output(b"3");
    assert_eq!(read_exactly(&mut third, 1), b"3");

    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
}

#[test]
fn a_client_accepted_by_the_launcher_is_served_at_once() {
    let (listener, l) = Listener::new("wait");
    let mut client = listener.connect();
    let (accepted, _) = l.accept().unwrap();
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let listener_fd = fds.add(l);
    let connected = Some(fds.add(accepted));
    let backend = ChardevBackend::SocketServer { listener: listener_fd, connected, telnet: false };
    let running = Running::start(config("wait", backend, vec![fe]), fds);
    core.output(b"first words");
    assert_eq!(read_exactly(&mut client, 11), b"first words");
    handshake_through(&mut client, &core, b"reply");
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
}

#[test]
fn telnet_server_negotiates_strips_commands_and_passes_break() {
    let (listener, l) = Listener::new("telnet");
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let listener_fd = fds.add(l);
    let backend = ChardevBackend::SocketServer { listener: listener_fd, connected: None, telnet: true };
    let running = Running::start(config("tn", backend, vec![fe]), fds);

    for round in 0..2 {
        let mut client = listener.connect();
        // IAC WILL ECHO, IAC WILL SUPPRESS-GO-AHEAD, IAC WILL BINARY, IAC DO BINARY: what QEMU sends.
        let greeting = read_exactly(&mut client, 12);
        assert_eq!(greeting, [255, 251, 1, 255, 251, 3, 255, 251, 0, 255, 253, 0], "round {round}");
        // The client's answers, text with an escaped 255, and a break.
        client.write_all(&[255, 253, 1, 255, 253, 3, b'l', b's', 255, 255, b'\r', 255, 243, b'!']).unwrap();
        let deadline = Instant::now() + PATIENCE;
        let mut text = Vec::new();
        while let ChardevToCore::Input(b) = core.recv(deadline) {
            text.extend(b);
        }
        assert_eq!(text, [b'l', b's', 255, b'\r'], "round {round}");
        assert_eq!(core.input(1), b"!");
        core.output(b"ok\r\n");
        assert_eq!(read_exactly(&mut client, 4), b"ok\r\n");
    }
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
}

#[test]
fn socket_client_peer_closing_is_reported_and_output_dropped() {
    let (mine, theirs) = UnixStream::pair().unwrap();
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let stream = fds.add(theirs);
    let running = Running::start(config("peer", ChardevBackend::SocketClient { stream }, vec![fe]), fds);
    drop(mine);
    // Give the chardev a moment to see the hang-up, then keep writing: nothing may break.
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..100 {
        core.output(&[b'x'; 10_000]);
    }
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
    assert!(err.contains("tessera-chardev: peer: the socket peer closed the connection"), "stderr:\n{err}");
}
