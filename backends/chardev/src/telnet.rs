//! Minimal telnet server side for `-chardev socket,telnet=on` (RFC 854/855), as QEMU does it: announce
//! character-at-a-time binary mode on connect, strip commands from what the client sends, turn
//! `IAC BREAK` into a serial break. No option state is kept: the client's answers are simply dropped.

/// RFC 854 command bytes.
const IAC: u8 = 255;
const DONT: u8 = 254;
const WILL: u8 = 251;
const DO: u8 = 253;
const SB: u8 = 250;
const SE: u8 = 240;
const BREAK: u8 = 243;
/// Option codes: RFC 856 (binary), 857 (echo), 858 (suppress go-ahead).
const OPT_BINARY: u8 = 0;
const OPT_ECHO: u8 = 1;
const OPT_SGA: u8 = 3;

/// What the server sends when a client connects: the same four requests QEMU sends. `WILL ECHO` makes the
/// client stop echoing locally (the guest echoes), `WILL SUPPRESS-GO-AHEAD` asks for character mode, and
/// binary mode both ways keeps 8-bit bytes intact.
pub const NEGOTIATION: [u8; 12] = [IAC, WILL, OPT_ECHO, IAC, WILL, OPT_SGA, IAC, WILL, OPT_BINARY, IAC, DO, OPT_BINARY];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Data,
    /// After IAC.
    Command,
    /// After IAC WILL/WONT/DO/DONT: the option byte comes next.
    Option,
    /// Inside IAC SB ... IAC SE.
    Sub,
    /// IAC inside a subnegotiation.
    SubIac,
}

/// What the client's bytes amount to, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TelnetInput {
    Data(Vec<u8>),
    Break,
}

/// The receive-side filter; one per connection.
#[derive(Debug, Default)]
pub struct TelnetFilter {
    state: State,
}

impl TelnetFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Strip telnet commands from `bytes`. Unlike QEMU, which always skips two bytes after IAC (so
    /// `IAC NOP` eats the next data byte), two-byte commands take two bytes and subnegotiations are skipped
    /// whole, as RFC 854 defines them.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<TelnetInput> {
        let mut out = Vec::new();
        let mut data = Vec::new();
        for &b in bytes {
            self.state = match (self.state, b) {
                (State::Data, IAC) => State::Command,
                (State::Data, _) => {
                    data.push(b);
                    State::Data
                }
                // IAC IAC is a literal 255.
                (State::Command, IAC) => {
                    data.push(IAC);
                    State::Data
                }
                (State::Command, WILL..=DONT) => State::Option,
                (State::Command, SB) => State::Sub,
                (State::Command, BREAK) => {
                    if !data.is_empty() {
                        out.push(TelnetInput::Data(std::mem::take(&mut data)));
                    }
                    out.push(TelnetInput::Break);
                    State::Data
                }
                // NOP, DM, IP, AO, AYT, EC, EL, GA, a stray SE: two-byte commands with nothing to do here.
                (State::Command, _) => State::Data,
                (State::Option, _) => State::Data,
                (State::Sub, IAC) => State::SubIac,
                (State::Sub, _) => State::Sub,
                (State::SubIac, SE) => State::Data,
                (State::SubIac, _) => State::Sub,
            };
        }
        if !data.is_empty() {
            out.push(TelnetInput::Data(data));
        }
        out
    }
}

/// Merge adjacent [`TelnetInput::Data`]: the grouping of bytes depends on how reads split them.
pub fn normalize(input: Vec<TelnetInput>) -> Vec<TelnetInput> {
    let mut out: Vec<TelnetInput> = Vec::with_capacity(input.len());
    for i in input {
        match (out.last_mut(), i) {
            (Some(TelnetInput::Data(prev)), TelnetInput::Data(more)) => prev.extend(more),
            (_, i) => out.push(i),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_replies_are_stripped() {
        let mut f = TelnetFilter::new();
        // A typical client's answers, then typed text.
        let got = f.feed(&[IAC, DO, OPT_ECHO, IAC, DO, OPT_SGA, IAC, WILL, OPT_BINARY, b'l', b's', b'\r', 0]);
        assert_eq!(got, vec![TelnetInput::Data(b"ls\r\0".to_vec())]);
    }

    #[test]
    fn escaped_iac_break_and_split_sequences() {
        let mut f = TelnetFilter::new();
        assert_eq!(f.feed(&[b'a', IAC, IAC, b'b', IAC]), vec![TelnetInput::Data(vec![b'a', IAC, b'b'])]);
        assert_eq!(f.feed(&[BREAK, b'c']), vec![TelnetInput::Break, TelnetInput::Data(b"c".to_vec())]);
        assert_eq!(f.feed(&[IAC, DONT]), vec![]);
        assert_eq!(f.feed(&[OPT_ECHO, b'd']), vec![TelnetInput::Data(b"d".to_vec())]);
    }

    #[test]
    fn subnegotiation_is_skipped_whole() {
        let mut f = TelnetFilter::new();
        let got = f.feed(&[IAC, SB, 24, 0, b'x', b't', IAC, IAC, b'm', IAC, SE, b'z']);
        assert_eq!(got, vec![TelnetInput::Data(b"z".to_vec())]);
    }

    #[test]
    fn any_split_of_the_input_gives_the_same_result() {
        let mut x = 0x2545_f491u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let alphabet = [IAC, IAC, WILL, DO, DONT, SB, SE, BREAK, 241, OPT_ECHO, b'a', b'b'];
        for _ in 0..300 {
            let bytes: Vec<u8> = (0..next() % 48).map(|_| alphabet[next() as usize % alphabet.len()]).collect();
            let whole = normalize(TelnetFilter::new().feed(&bytes));
            let mut f = TelnetFilter::new();
            let mut parts = Vec::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = (next() as usize % 3 + 1).min(rest.len());
                parts.extend(f.feed(&rest[..n]));
                rest = &rest[n..];
            }
            assert_eq!(whole, normalize(parts), "bytes {bytes:?}");
        }
    }

    #[test]
    fn two_byte_commands_do_not_eat_data() {
        let mut f = TelnetFilter::new();
        // IAC NOP (241), then data.
        assert_eq!(f.feed(&[IAC, 241, b'k']), vec![TelnetInput::Data(b"k".to_vec())]);
    }
}
