//! tessera-net's vhost-user socket spoken to directly: the features it offers, and that
//! malformed messages (oversized, truncated, unknown, SET_VRING_ENABLE before SET_FEATURES)
//! end at most that connection, never the backend, which then serves the next one.

#[path = "net_support.rs"]
mod net_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use net_support::{Backend, TempDir};

const GET_FEATURES: u32 = 1;
const SET_VRING_ENABLE: u32 = 18;

fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

fn connect(sock: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

/// GET_FEATURES on a fresh connection; the feature word.
fn features(sock: &std::path::Path) -> u64 {
    let mut s = connect(sock);
    s.write_all(&msg(GET_FEATURES, 1, &[])).expect("send GET_FEATURES");
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("GET_FEATURES reply");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), GET_FEATURES);
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

/// Whether the backend closed the connection (read returns 0 or an error, not a timeout).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn offers_the_documented_features() {
    let dir = TempDir::new("net-proto").expect("temp dir");
    let (_backend, sock) = Backend::start(dir.path(), &["--user"]);
    let f = features(&sock);
    for (bit, name) in [(32, "VERSION_1"), (29, "EVENT_IDX"), (28, "INDIRECT_DESC"), (5, "MAC"), (16, "STATUS")]
        .into_iter()
        .chain([(15, "MRG_RXBUF"), (3, "MTU"), (30, "PROTOCOL_FEATURES")])
    {
        assert!(f & (1 << bit) != 0, "{name} (bit {bit}) not offered: {f:#x}");
    }
    for (bit, name) in [(0, "CSUM"), (1, "GUEST_CSUM"), (7, "GUEST_TSO4"), (11, "HOST_TSO4"), (17, "CTRL_VQ")] {
        assert!(f & (1 << bit) == 0, "{name} (bit {bit}) offered: {f:#x}");
    }
}

#[test]
fn malformed_messages_end_only_their_connection() {
    let dir = TempDir::new("net-proto-bad").expect("temp dir");
    let (mut backend, sock) = Backend::start(dir.path(), &["--user"]);
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("oversized payload", msg(GET_FEATURES, 1, &[]).into_iter().take(8).chain(u32::MAX.to_le_bytes()).collect()),
        ("unknown request", msg(9999, 1, &[0; 8])),
        ("truncated header", vec![1, 0, 0]),
        ("truncated body", msg(SET_VRING_ENABLE, 1, &[0; 8]).into_iter().take(16).collect()),
        ("bad SET_VRING_ENABLE size", msg(SET_VRING_ENABLE, 1, &[0; 3])),
    ];
    for (what, bytes) in bad {
        let mut s = connect(&sock);
        s.write_all(&bytes).expect("send");
        let _ = s.shutdown(std::net::Shutdown::Write);
        assert!(closed(&mut s), "{what}: connection left open");
        assert!(backend.alive(), "{what}: tessera-net died:\n{}", backend.logs());
        // The next front end is served.
        assert!(features(&sock) & (1 << 32) != 0, "{what}: next connection not served:\n{}", backend.logs());
    }
    // QEMU's early SET_VRING_ENABLE (before SET_FEATURES) is held back, not fatal.
    let mut s = connect(&sock);
    let mut payload = Vec::new();
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&1u32.to_le_bytes());
    s.write_all(&msg(SET_VRING_ENABLE, 1, &payload)).expect("send");
    s.write_all(&msg(GET_FEATURES, 1, &[])).expect("send");
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("connection survives an early SET_VRING_ENABLE");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), GET_FEATURES);
}
