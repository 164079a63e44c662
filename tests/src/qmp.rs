//! A QMP client for tests, and a tiny guest to drive with it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::tiny_guest::pvh_guest;

/// How long one step of a QMP test may take.
pub const STEP: Duration = Duration::from_secs(30);

/// A guest that prints "boot\n", then "t" after every `delay` iterations of a busy loop, forever.
pub fn ticking_guest(dir: &Path, delay: u32) -> PathBuf {
    let code = format!(
        r#"
    mov $0x90000, %esp
    mov $msg, %esi
    call 20f
4:  mov $tick, %esi
    call 20f
    mov ${delay}, %ecx
5:  dec %ecx
    jnz 5b
    jmp 4b
20: movb (%esi), %bl
    test %bl, %bl
    jz 23f
    mov $0x3fd, %dx
21: inb %dx, %al
    test $0x20, %al
    jz 21b
    mov $0x3f8, %dx
    mov %bl, %al
    outb %al, %dx
    inc %esi
    jmp 20b
23: ret
"#
    );
    pvh_guest(dir, "ticking", &code, "msg: .asciz \"boot\\n\"\ntick: .asciz \"t\"\n").unwrap()
}

/// A QMP client: replies and events as JSON values; events seen while waiting for a reply are kept.
pub struct Qmp {
    reader: BufReader<Box<dyn std::io::Read>>,
    writer: Box<dyn Write>,
    pub events: Vec<Value>,
}

impl Qmp {
    fn from_streams(r: Box<dyn std::io::Read>, w: Box<dyn Write>) -> (Qmp, Value) {
        let mut q = Qmp { reader: BufReader::new(r), writer: w, events: Vec::new() };
        let greeting = q.read();
        (q, greeting)
    }

    /// Connect to a unix socket monitor (retrying while the VM starts); returns the greeting too.
    pub fn unix(path: &str) -> (Qmp, Value) {
        let deadline = Instant::now() + STEP;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect to {path}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        s.set_read_timeout(Some(STEP)).unwrap();
        Qmp::from_streams(Box::new(s.try_clone().unwrap()), Box::new(s))
    }

    pub fn tcp(port: u16) -> (Qmp, Value) {
        let deadline = Instant::now() + STEP;
        let s = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect to port {port}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        s.set_read_timeout(Some(STEP)).unwrap();
        Qmp::from_streams(Box::new(s.try_clone().unwrap()), Box::new(s))
    }

    /// One message; QEMU ends each with "\r\n".
    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("reading from the monitor");
        assert!(n > 0, "the monitor closed the connection");
        assert!(line.ends_with("\r\n"), "QMP lines end in CR LF: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
    }

    pub fn send(&mut self, raw: &str) {
        self.send_bytes(raw.as_bytes());
    }

    pub fn send_bytes(&mut self, raw: &[u8]) {
        self.writer.write_all(raw).unwrap();
        self.writer.flush().unwrap();
    }

    /// The next reply (events on the way are kept).
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                assert!(v["timestamp"]["seconds"].is_u64() && v["timestamp"]["microseconds"].is_u64(), "{v}");
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    pub fn cmd(&mut self, raw: &str) -> Value {
        self.send(raw);
        self.reply()
    }

    pub fn negotiate(&mut self) {
        assert_eq!(self.cmd(r#"{"execute": "qmp_capabilities"}"#), json!({"return": {}}));
    }

    /// Event `name` (kept already, or the next ones read).
    pub fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.read();
            if v["event"] == name {
                return v;
            }
            assert!(v.get("event").is_some(), "a reply while waiting for event {name}: {v}");
            self.events.push(v);
        }
    }
}

pub fn error_class(v: &Value) -> (&str, &str) {
    (v["error"]["class"].as_str().unwrap_or("-"), v["error"]["desc"].as_str().unwrap_or("-"))
}

/// A guest that prints a counter, one line of 8 hex digits per value from 00000000 up, with a busy loop of
/// `delay` iterations between lines: lost or repeated output shows as a gap or a repeat.
pub fn counting_guest(dir: &Path, delay: u32) -> PathBuf {
    let code = format!(
        r#"
    mov $0x90000, %esp
    xor %edi, %edi
4:  mov %edi, %eax
    mov $8, %ecx
6:  rol $4, %eax
    mov %eax, %ebx
    and $0xf, %ebx
    movb hex(%ebx), %bl
    call 20f
    dec %ecx
    jnz 6b
    mov $0x0a, %bl
    call 20f
    inc %edi
    mov ${delay}, %ecx
5:  dec %ecx
    jnz 5b
    jmp 4b
20: push %eax
    push %edx
    mov $0x3fd, %dx
21: inb %dx, %al
    test $0x20, %al
    jz 21b
    mov $0x3f8, %dx
    mov %bl, %al
    outb %al, %dx
    pop %edx
    pop %eax
    ret
"#
    );
    pvh_guest(dir, "counting", &code, "hex: .ascii \"0123456789abcdef\"\n").unwrap()
}

/// Check the output of [`counting_guest`]: every value from 0 up, once, in order (a last line may be cut
/// short). Returns how many lines there were.
pub fn check_count(text: &str) -> Result<usize, String> {
    let mut next = 0u32;
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if i + 1 == lines.len() {
            // The line being printed when the output was read.
            break;
        }
        let v = u32::from_str_radix(line, 16).map_err(|_| format!("line {i}: {line:?} is not a counter value"))?;
        if v != next {
            return Err(format!("line {i}: {v:08x} where {next:08x} was expected (lost or repeated output)"));
        }
        next += 1;
    }
    Ok(next as usize)
}
