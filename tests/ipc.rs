//! IPC round trips over real sockets, descriptor passing, and malformed frames from a hostile peer.

use std::io::{Read, Seek, Write};
use std::os::fd::AsFd;

use tessera_ipc::frame::{self, FrameError, MAX_BODY};
use tessera_ipc::messages::{ChardevToCore, CoreToChardev, Role};
use tessera_ipc::{Channel, IpcError};

#[test]
fn messages_and_descriptors_cross_the_socket() {
    let (a, b) = Channel::pair().unwrap();
    let file = std::fs::File::from(tempfile_with(b"passed by SCM_RIGHTS"));
    let msg = CoreToChardev::Output(b"hello".to_vec());
    a.send(&msg, &[file.as_fd()]).unwrap();
    a.send(&CoreToChardev::Output(vec![0xaa; 100_000]), &[]).unwrap();
    let (got, fds): (CoreToChardev, _) = b.recv().unwrap();
    assert_eq!(got, msg);
    assert_eq!(fds.len(), 1);
    let mut received = std::fs::File::from(fds.into_iter().next().unwrap());
    let mut text = String::new();
    received.rewind().unwrap();
    received.read_to_string(&mut text).unwrap();
    assert_eq!(text, "passed by SCM_RIGHTS");
    let (big, fds): (CoreToChardev, _) = b.recv().unwrap();
    assert_eq!(big, CoreToChardev::Output(vec![0xaa; 100_000]));
    assert!(fds.is_empty());
}

fn tempfile_with(contents: &[u8]) -> std::os::fd::OwnedFd {
    let fd = nix::sys::memfd::memfd_create(c"ipc-test", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap();
    let mut f = std::fs::File::from(fd);
    f.write_all(contents).unwrap();
    f.into()
}

#[test]
fn handshake_checks_role_and_version() {
    let (a, b) = Channel::pair().unwrap();
    let t = std::thread::spawn(move || b.handshake(Role::Core, Role::Launcher));
    a.handshake(Role::Launcher, Role::Core).unwrap();
    t.join().unwrap().unwrap();

    // A chardev where a core was expected: both sides say so.
    let (a, b) = Channel::pair().unwrap();
    let t = std::thread::spawn(move || b.handshake(Role::Chardev, Role::Launcher));
    let err = a.handshake(Role::Launcher, Role::Core).unwrap_err();
    assert_eq!(err.to_string(), "IPC handshake with tessera-core failed: the peer is tessera-chardev");
    t.join().unwrap().unwrap();
}

#[test]
fn a_peer_that_is_not_tessera_fails_the_handshake() {
    let (a, b) = Channel::pair().unwrap();
    b.send_raw(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let err = a.handshake(Role::Launcher, Role::Core).unwrap_err();
    assert!(err.to_string().contains("bad frame magic"), "{err}");
}

#[test]
fn truncated_oversized_and_garbage_frames_are_errors_not_panics() {
    // Truncated: a header promising 100 bytes, 10 sent, then the peer goes away.
    let (a, b) = Channel::pair().unwrap();
    let mut bytes = frame::encode(&CoreToChardev::Output(vec![1; 98]), 0).unwrap();
    bytes.truncate(18);
    b.send_raw(&bytes).unwrap();
    drop(b);
    match a.recv::<CoreToChardev>() {
        Err(IpcError::Truncated { have: 18 }) => {}
        other => panic!("expected a truncated-frame error, got {other:?}"),
    }

    // Oversized: refused from the header, before the body is read.
    let (a, b) = Channel::pair().unwrap();
    let mut h = b"TS".to_vec();
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&(MAX_BODY as u32 + 1).to_le_bytes());
    b.send_raw(&h).unwrap();
    match a.recv::<CoreToChardev>() {
        Err(IpcError::Frame(FrameError::Oversized { .. })) => {}
        other => panic!("expected an oversized-frame error, got {other:?}"),
    }

    // Unknown message: a variant that does not exist.
    let (a, b) = Channel::pair().unwrap();
    let mut h = b"TS".to_vec();
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.push(9);
    b.send_raw(&h).unwrap();
    let err = a.recv::<ChardevToCore>().unwrap_err();
    assert!(err.to_string().starts_with("malformed frame body (1 bytes)"), "{err}");

    // A frame announcing descriptors that never came.
    let (a, b) = Channel::pair().unwrap();
    b.send_raw(&frame::encode(&ChardevToCore::Break, 2).unwrap()).unwrap();
    match a.recv::<ChardevToCore>() {
        Err(IpcError::MissingFds { expected: 2, got: 0 }) => {}
        other => panic!("expected a missing-descriptors error, got {other:?}"),
    }

    // Clean close between frames.
    let (a, b) = Channel::pair().unwrap();
    drop(b);
    assert!(matches!(a.recv::<ChardevToCore>(), Err(IpcError::Closed)));
}

#[test]
fn non_blocking_receive_keeps_partial_frames() {
    let (a, b) = Channel::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    assert!(matches!(a.try_recv::<ChardevToCore>(), Err(IpcError::WouldBlock)));
    let bytes = frame::encode(&ChardevToCore::Input(b"abc".to_vec()), 0).unwrap();
    b.send_raw(&bytes[..5]).unwrap();
    assert!(matches!(a.try_recv::<ChardevToCore>(), Err(IpcError::WouldBlock)));
    assert!(a.has_partial_frame());
    b.send_raw(&bytes[5..]).unwrap();
    let (msg, _) = a.try_recv::<ChardevToCore>().unwrap();
    assert_eq!(msg, ChardevToCore::Input(b"abc".to_vec()));
}
