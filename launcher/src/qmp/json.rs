//! Splitting a QMP client's byte stream into JSON values, as QEMU's json-streamer does (qobject/json-streamer.c):
//! a value ends when its braces and brackets balance; a scalar at the top level is a value by itself; a
//! stray `}` or `]` is an error of its own. QEMU's JSON also takes single-quoted strings (docs/interop/qmp-spec
//! §2.1 "the JSON syntax accepted is relaxed": 'string'); they are rewritten to standard JSON before
//! serde_json parses the value. The splitter is hand-written because serde_json's stream reader cannot resync
//! after an error, and QEMU's monitor keeps serving after bad input.

/// Largest value a client may send (QEMU's limit is 64 MiB of tokens; a monitor command is tiny).
pub const MAX_VALUE: usize = 1 << 20;
/// Deepest nesting (QEMU's MAX_NESTING).
pub const MAX_NESTING: usize = 1024;

/// What the splitter produced: a complete value's text (already standard JSON), or an error for the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Value(String),
    Error(String),
}

#[derive(Default)]
pub struct Splitter {
    cur: Vec<u8>,
    depth: usize,
    /// Inside a string opened by this quote.
    quote: Option<u8>,
    escape: bool,
    /// A bare top-level scalar (number, keyword) is being read.
    scalar: bool,
    /// After an oversized value: skip to the next newline.
    recovering: bool,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

impl Splitter {
    pub fn new() -> Splitter {
        Splitter::default()
    }

    fn reset(&mut self) {
        self.cur.clear();
        self.depth = 0;
        self.quote = None;
        self.escape = false;
        self.scalar = false;
    }

    fn finish(&mut self, out: &mut Vec<Piece>) {
        let text = String::from_utf8_lossy(&self.cur).into_owned();
        out.push(Piece::Value(single_to_double(&text)));
        self.reset();
    }

    /// Feed bytes; complete values and errors come out in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.recovering {
                if b == b'\n' {
                    self.recovering = false;
                }
                continue;
            }
            if self.cur.len() >= MAX_VALUE {
                out.push(Piece::Error("JSON parse error, input too large".into()));
                self.reset();
                self.recovering = b != b'\n';
                continue;
            }
            if let Some(q) = self.quote {
                self.cur.push(b);
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == q {
                    self.quote = None;
                    if self.depth == 0 {
                        self.finish(&mut out);
                    }
                }
                continue;
            }
            if self.scalar {
                if is_space(b) || matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b'\'' | b',' | b':') {
                    self.finish(&mut out);
                    // The byte that ended the scalar starts the next piece.
                } else {
                    self.cur.push(b);
                    continue;
                }
            }
            match b {
                b'"' | b'\'' => {
                    self.quote = Some(b);
                    self.cur.push(b);
                }
                b'{' | b'[' => {
                    if self.depth >= MAX_NESTING {
                        out.push(Piece::Error("JSON parse error, nesting too deep".into()));
                        self.reset();
                        self.recovering = true;
                        continue;
                    }
                    self.depth += 1;
                    self.cur.push(b);
                }
                b'}' | b']' if self.depth == 0 => out.push(Piece::Error("JSON parse error, expecting value".into())),
                b'}' | b']' => {
                    self.depth -= 1;
                    self.cur.push(b);
                    if self.depth == 0 {
                        self.finish(&mut out);
                    }
                }
                _ if is_space(b) && self.depth == 0 => {}
                _ if self.depth == 0 => {
                    self.scalar = true;
                    self.cur.push(b);
                }
                _ => self.cur.push(b),
            }
        }
        out
    }
}

/// Rewrite QEMU's single-quoted strings as JSON strings: `'a"b\'c'` → `"a\"b'c"`.
fn single_to_double(text: &str) -> String {
    if !text.contains('\'') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                let mut esc = false;
                for d in chars.by_ref() {
                    out.push(d);
                    if esc {
                        esc = false;
                    } else if d == '\\' {
                        esc = true;
                    } else if d == '"' {
                        break;
                    }
                }
            }
            '\'' => {
                out.push('"');
                let mut esc = false;
                for d in chars.by_ref() {
                    if esc {
                        esc = false;
                        // \' is an escaped single quote in QEMU's JSON; other escapes are JSON's.
                        if d != '\'' {
                            out.push('\\');
                        }
                        out.push(d);
                    } else if d == '\\' {
                        esc = true;
                    } else if d == '\'' {
                        break;
                    } else if d == '"' {
                        out.push_str("\\\"");
                    } else {
                        out.push(d);
                    }
                }
                out.push('"');
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(s: &mut Splitter, input: &str) -> Vec<Piece> {
        s.feed(input.as_bytes())
    }

    #[test]
    fn values_split_at_balanced_braces_even_across_reads() {
        let mut s = Splitter::new();
        assert_eq!(values(&mut s, r#"{"execute": "a", "arguments": {"x": "}{"#), vec![]);
        assert_eq!(
            values(&mut s, r#""}}{"execute":"b"}  "str" 12 "#),
            vec![
                Piece::Value(r#"{"execute": "a", "arguments": {"x": "}{"}}"#.into()),
                Piece::Value(r#"{"execute":"b"}"#.into()),
                Piece::Value(r#""str""#.into()),
                Piece::Value("12".into()),
            ]
        );
    }

    #[test]
    fn stray_closers_are_errors_each_and_the_stream_goes_on() {
        let mut s = Splitter::new();
        let out = values(&mut s, "}}]\n{\"execute\":\"x\"}");
        assert_eq!(out.len(), 4);
        assert!(out[..3].iter().all(|p| matches!(p, Piece::Error(e) if e.contains("expecting value"))));
        assert_eq!(out[3], Piece::Value("{\"execute\":\"x\"}".into()));
    }

    #[test]
    fn single_quoted_strings_become_json() {
        let mut s = Splitter::new();
        let out = values(&mut s, r#"{'execute':'a"b\'c', "x": "it's"}"#);
        let Piece::Value(v) = &out[0] else { panic!("{out:?}") };
        let parsed: serde_json::Value = serde_json::from_str(v).unwrap();
        assert_eq!(parsed["execute"], "a\"b'c");
        assert_eq!(parsed["x"], "it's");
    }

    #[test]
    fn oversized_and_too_deep_input_is_refused_and_skipped_to_the_next_line() {
        let mut s = Splitter::new();
        let mut big = String::from("{\"a\":\"");
        big.push_str(&"x".repeat(MAX_VALUE + 10));
        big.push_str("\"}\n{\"execute\":\"ok\"}");
        let out = values(&mut s, &big);
        assert_eq!(
            out,
            vec![Piece::Error("JSON parse error, input too large".into()), Piece::Value("{\"execute\":\"ok\"}".into())]
        );
        let deep = format!("{}\n[]", "[".repeat(MAX_NESTING + 1));
        let out = values(&mut s, &deep);
        assert_eq!(out, vec![Piece::Error("JSON parse error, nesting too deep".into()), Piece::Value("[]".into())]);
    }
}
