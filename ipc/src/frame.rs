//! The frame format: header + bincode body, with limits.
//!
//! ```text
//! offset 0  u8[2]  magic "TS"
//! offset 2  u16le  number of file descriptors attached to this frame (sent with SCM_RIGHTS)
//! offset 4  u32le  body length in bytes (<= MAX_BODY)
//! offset 8  body   bincode (varint integers, little endian, no trailing bytes)
//! ```

use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};

pub const MAGIC: [u8; 2] = *b"TS";
pub const HEADER_LEN: usize = 8;
/// Largest body accepted or sent. Messages are control messages and serial data chunks: 1 MiB is generous and
/// bounds what a hostile peer can make us allocate.
pub const MAX_BODY: usize = 1 << 20;
/// Most file descriptors one frame may carry.
pub const MAX_FDS: usize = 64;

/// What is wrong with a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad frame magic {0:02x?} (expected \"TS\")")]
    BadMagic([u8; 2]),
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("frame announces {count} file descriptors, more than the limit of {max}")]
    TooManyFds { count: usize, max: usize },
    #[error("malformed frame body ({len} bytes): {reason}")]
    Malformed { len: usize, reason: String },
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(MAX_BODY as u64)
        .with_little_endian()
        .with_varint_encoding()
        .reject_trailing_bytes()
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fds: usize,
    pub len: usize,
}

/// Parse a header from the first [`HEADER_LEN`] bytes of `buf`. Returns `Ok(None)` if `buf` is shorter.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let magic = [h[0], h[1]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let fds = u16::from_le_bytes([h[2], h[3]]) as usize;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_BODY {
        return Err(FrameError::Oversized { len, max: MAX_BODY });
    }
    if fds > MAX_FDS {
        return Err(FrameError::TooManyFds { count: fds, max: MAX_FDS });
    }
    Ok(Some(Header { fds, len }))
}

/// Encode `msg` as one frame that announces `fds` attached descriptors.
pub fn encode<T: Serialize>(msg: &T, fds: usize) -> Result<Vec<u8>, FrameError> {
    if fds > MAX_FDS {
        return Err(FrameError::TooManyFds { count: fds, max: MAX_FDS });
    }
    let body = options().serialize(msg).map_err(|e| FrameError::Malformed { len: 0, reason: e.to_string() })?;
    if body.len() > MAX_BODY {
        return Err(FrameError::Oversized { len: body.len(), max: MAX_BODY });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(fds as u16).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// A complete frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<T> {
    pub msg: T,
    /// How many file descriptors belong to this frame.
    pub fds: usize,
    /// How many bytes of the buffer the frame used.
    pub consumed: usize,
}

/// Decode the frame at the start of `buf`: `Ok(None)` if more bytes are needed.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<Decoded<T>>, FrameError> {
    let Some(header) = parse_header(buf)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + header.len) else {
        return Ok(None);
    };
    let msg =
        options().deserialize(body).map_err(|e| FrameError::Malformed { len: header.len, reason: e.to_string() })?;
    Ok(Some(Decoded { msg, fds: header.fds, consumed: HEADER_LEN + header.len }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{ChardevToCore, CoreToChardev};

    #[test]
    fn round_trip() {
        let msg = CoreToChardev::Output(b"hello".to_vec());
        let bytes = encode(&msg, 2).unwrap();
        let d: Decoded<CoreToChardev> = decode(&bytes).unwrap().unwrap();
        assert_eq!(d.msg, msg);
        assert_eq!(d.fds, 2);
        assert_eq!(d.consumed, bytes.len());
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let bytes = encode(&CoreToChardev::Output(vec![7; 300]), 0).unwrap();
        for n in 0..bytes.len() {
            assert_eq!(decode::<CoreToChardev>(&bytes[..n]), Ok(None), "prefix of {n} bytes");
        }
    }

    #[test]
    fn bad_magic() {
        let mut bytes = encode(&CoreToChardev::Output(vec![]), 0).unwrap();
        bytes[0] = b'X';
        assert_eq!(decode::<CoreToChardev>(&bytes), Err(FrameError::BadMagic([b'X', b'S'])));
    }

    #[test]
    fn oversized_is_refused_from_the_header_alone() {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&((MAX_BODY as u32) + 1).to_le_bytes());
        assert_eq!(decode::<CoreToChardev>(&h), Err(FrameError::Oversized { len: MAX_BODY + 1, max: MAX_BODY }));
    }

    #[test]
    fn unknown_variant_and_trailing_bytes_are_malformed() {
        // Variant 200 does not exist.
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.push(200);
        assert!(matches!(decode::<ChardevToCore>(&bytes), Err(FrameError::Malformed { .. })));
        // A valid body followed by junk inside the frame.
        let mut good = encode(&ChardevToCore::Input(vec![1]), 0).unwrap();
        good.push(0);
        let len = (good.len() - HEADER_LEN) as u32;
        good[4..8].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(decode::<ChardevToCore>(&good), Err(FrameError::Malformed { .. })));
    }

    #[test]
    fn a_length_inside_the_body_cannot_make_us_allocate_past_the_limit() {
        // Output(Vec<u8>) whose varint length claims 2^40 bytes, in a 12-byte body.
        let body = [0u8, 253, 0, 0, 0, 0, 0, 1, 0, 0];
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        assert!(matches!(decode::<CoreToChardev>(&bytes), Err(FrameError::Malformed { .. })));
    }

    /// A stable-toolchain cousin of the fuzz target (ipc/fuzz): mutated valid frames and random bytes never
    /// panic, and whatever decodes re-encodes to the same message.
    #[test]
    fn mutated_frames_never_panic() {
        use crate::messages::{ChildConfig, LauncherToChild, LogConfig};
        let seeds: Vec<Vec<u8>> = vec![
            encode(&CoreToChardev::Output(b"hello\n".to_vec()), 0).unwrap(),
            encode(&ChardevToCore::Break, 1).unwrap(),
            encode(
                &LauncherToChild::Configure(ChildConfig::Chardev(crate::messages::ChardevConfig {
                    id: "serial0".into(),
                    backend: crate::messages::ChardevBackend::Null,
                    frontends: vec![crate::messages::FdIndex(0)],
                    mux: true,
                    signal: false,
                    logfile: None,
                    log: LogConfig::default(),
                })),
                1,
            )
            .unwrap(),
        ];
        // xorshift64*: deterministic, no dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for round in 0..20_000 {
            let mut bytes = seeds[round % seeds.len()].clone();
            for _ in 0..(next() % 4 + 1) {
                let r = next();
                match r % 3 {
                    0 if !bytes.is_empty() => {
                        let i = (r >> 8) as usize % bytes.len();
                        bytes[i] = (r >> 32) as u8;
                    }
                    1 => bytes.truncate((r >> 8) as usize % (bytes.len() + 1)),
                    _ => bytes.push((r >> 8) as u8),
                }
            }
            if round % 7 == 0 {
                bytes = (0..(next() % 64)).map(|_| next() as u8).collect();
            }
            if let Ok(Some(d)) = decode::<LauncherToChild>(&bytes) {
                let again = encode(&d.msg, d.fds).unwrap();
                assert_eq!(decode::<LauncherToChild>(&again).unwrap().unwrap().msg, d.msg);
            }
            let _ = decode::<CoreToChardev>(&bytes);
            let _ = decode::<ChardevToCore>(&bytes);
        }
    }
}
