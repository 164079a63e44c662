//! The Ctrl-A escape keys of a multiplexed chardev (`mux=on`, implied by `-nographic` and `mon:stdio`).
//!
//! Behaviour follows QEMU's mux chardev (observed on QEMU 7.2): `C-a` followed by a command key runs the
//! command, `C-a C-a` sends one `C-a`, `C-a` followed by any other key swallows both. Pure logic: the event loop
//! turns [`MuxEvent`]s into actions.

use std::time::Instant;

/// The escape character: Ctrl-A, QEMU's default (`-echr` is not supported).
pub const ESCAPE: u8 = 0x01;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MuxEvent {
    /// Bytes for the front end that has the focus.
    Input(Vec<u8>),
    /// `C-a h` or `C-a ?`.
    Help,
    /// `C-a x`.
    Exit,
    /// `C-a s`.
    Commit,
    /// `C-a b`.
    Break,
    /// `C-a c`.
    SwitchFocus,
    /// `C-a t`.
    ToggleTimestamps,
}

/// The escape-key state machine; one per chardev.
#[derive(Debug, Default)]
pub struct Mux {
    got_escape: bool,
}

impl Mux {
    pub fn new() -> Self {
        Self::default()
    }

    /// Run `bytes` typed by the user through the escape keys. Ordinary bytes come out as [`MuxEvent::Input`],
    /// in order and interleaved with commands exactly as typed. An escape at the very end of `bytes` is
    /// remembered for the next call.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<MuxEvent> {
        let mut events = Vec::new();
        let mut pending = Vec::new();
        let command = |events: &mut Vec<MuxEvent>, pending: &mut Vec<u8>, ev: MuxEvent| {
            if !pending.is_empty() {
                events.push(MuxEvent::Input(std::mem::take(pending)));
            }
            events.push(ev);
        };
        for &b in bytes {
            if self.got_escape {
                self.got_escape = false;
                match b {
                    ESCAPE => pending.push(ESCAPE),
                    b'h' | b'?' => command(&mut events, &mut pending, MuxEvent::Help),
                    b'x' => command(&mut events, &mut pending, MuxEvent::Exit),
                    b's' => command(&mut events, &mut pending, MuxEvent::Commit),
                    b'b' => command(&mut events, &mut pending, MuxEvent::Break),
                    b'c' => command(&mut events, &mut pending, MuxEvent::SwitchFocus),
                    b't' => command(&mut events, &mut pending, MuxEvent::ToggleTimestamps),
                    // QEMU drops an unknown command key together with the escape.
                    _ => {}
                }
            } else if b == ESCAPE {
                self.got_escape = true;
            } else {
                pending.push(b);
            }
        }
        if !pending.is_empty() {
            events.push(MuxEvent::Input(pending));
        }
        events
    }
}

/// Merge adjacent [`MuxEvent::Input`]s: how typed bytes are grouped depends on how reads split them, and
/// is of no consequence (tests and the fuzz target compare event streams with it).
pub fn normalize(events: Vec<MuxEvent>) -> Vec<MuxEvent> {
    let mut out: Vec<MuxEvent> = Vec::with_capacity(events.len());
    for e in events {
        match (out.last_mut(), e) {
            (Some(MuxEvent::Input(prev)), MuxEvent::Input(more)) => prev.extend(more),
            (_, e) => out.push(e),
        }
    }
    out
}

/// The text `C-a h` prints. The layout (a blank line, then one key per line, each line ending in `\n\r`
/// because QEMU writes them that way and the terminal keeps output post-processing on) is QEMU's; the
/// descriptions are Tessera's own.
pub fn help_text() -> Vec<u8> {
    const KEYS: &[(&str, &str)] = &[
        ("C-a h   ", "show this list of keys"),
        ("C-a x   ", "quit the emulator"),
        ("C-a s   ", "write disk changes back to the images (with -snapshot)"),
        ("C-a t   ", "turn timestamps on console output on or off"),
        ("C-a b   ", "send a break (the magic SysRq key on Linux guests)"),
        ("C-a c   ", "move input between the serial consoles and the monitor"),
        ("C-a C-a ", "type a C-a"),
    ];
    let mut out = b"\n\r".to_vec();
    for (key, what) in KEYS {
        out.extend_from_slice(format!("{key} {what}\n\r").as_bytes());
    }
    out
}

/// `C-a t`: prefixes every output line with the time since timestamps were turned on, as QEMU's mux does
/// (`[HH:MM:SS.mmm] `). The line being written when they are turned on is not stamped.
#[derive(Debug, Default)]
pub struct Timestamps {
    on: bool,
    start: Option<Instant>,
    line_start: bool,
}

impl Timestamps {
    pub fn toggle(&mut self) {
        self.on = !self.on;
        self.start = None;
        self.line_start = false;
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Copy `data` into `out`, stamping the start of each line when timestamps are on.
    pub fn apply(&mut self, data: &[u8], now: Instant, out: &mut Vec<u8>) {
        if !self.on {
            out.extend_from_slice(data);
            return;
        }
        for &b in data {
            if self.line_start {
                let start = *self.start.get_or_insert(now);
                let ms = now.saturating_duration_since(start).as_millis();
                let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
                out.extend_from_slice(format!("[{h:02}:{m:02}:{s:02}.{ms:03}] ").as_bytes());
                self.line_start = false;
            }
            out.push(b);
            if b == b'\n' {
                self.line_start = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn plain_bytes_pass_through() {
        let mut m = Mux::new();
        assert_eq!(m.feed(b"ls -l\r"), vec![MuxEvent::Input(b"ls -l\r".to_vec())]);
    }

    #[test]
    fn commands_split_the_input_in_order() {
        let mut m = Mux::new();
        assert_eq!(
            m.feed(b"ab\x01hcd\x01x"),
            vec![MuxEvent::Input(b"ab".to_vec()), MuxEvent::Help, MuxEvent::Input(b"cd".to_vec()), MuxEvent::Exit]
        );
        assert_eq!(m.feed(b"\x01?\x01s\x01b\x01c\x01t"), {
            use MuxEvent::*;
            vec![Help, Commit, Break, SwitchFocus, ToggleTimestamps]
        });
    }

    #[test]
    fn double_escape_sends_one_and_unknown_keys_vanish() {
        let mut m = Mux::new();
        assert_eq!(m.feed(b"a\x01\x01b\x01zc"), vec![MuxEvent::Input(b"a\x01bc".to_vec())]);
    }

    #[test]
    fn an_escape_split_across_reads_is_kept() {
        let mut m = Mux::new();
        assert_eq!(m.feed(b"q\x01"), vec![MuxEvent::Input(b"q".to_vec())]);
        assert_eq!(m.feed(b"x"), vec![MuxEvent::Exit]);
        assert_eq!(m.feed(b"\x01"), vec![]);
        assert_eq!(m.feed(b"\x01"), vec![MuxEvent::Input(vec![ESCAPE])]);
    }

    #[test]
    fn any_split_of_the_input_gives_the_same_events() {
        // xorshift: deterministic pseudo-random keys, rich in escapes and command letters.
        let mut x = 0x9e37_79b9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..200 {
            const KEYS: &[u8] = b"\x01hxsbctqa?\x01";
            let keys: Vec<u8> = (0..next() % 64).map(|_| KEYS[next() as usize % KEYS.len()]).collect();
            let whole = normalize(Mux::new().feed(&keys));
            let mut m = Mux::new();
            let mut parts = Vec::new();
            let mut rest = &keys[..];
            while !rest.is_empty() {
                let n = (next() as usize % 4 + 1).min(rest.len());
                parts.extend(m.feed(&rest[..n]));
                rest = &rest[n..];
            }
            assert_eq!(whole, normalize(parts), "keys {keys:?}");
        }
    }

    #[test]
    fn help_lists_every_key_in_qemu_layout() {
        let text = String::from_utf8(help_text()).unwrap();
        assert!(text.starts_with("\n\rC-a h    "), "{text:?}");
        assert!(text.ends_with("\n\r"));
        let keys: Vec<&str> = text.split("\n\r").filter(|l| !l.is_empty()).map(|l| &l[..8]).collect();
        assert_eq!(keys, ["C-a h   ", "C-a x   ", "C-a s   ", "C-a t   ", "C-a b   ", "C-a c   ", "C-a C-a "]);
    }

    #[test]
    fn timestamps_start_at_the_next_line() {
        let t0 = Instant::now();
        let mut ts = Timestamps::default();
        let mut out = Vec::new();
        ts.apply(b"a\n", t0, &mut out);
        ts.toggle();
        ts.apply(b"tail\nline1\n", t0, &mut out);
        ts.apply(b"line2\n", t0 + Duration::from_millis(3_723_045), &mut out);
        assert_eq!(out, b"a\ntail\n[00:00:00.000] line1\n[01:02:03.045] line2\n");
        ts.toggle();
        out.clear();
        ts.apply(b"x\ny", t0, &mut out);
        assert_eq!(out, b"x\ny");
    }
}
