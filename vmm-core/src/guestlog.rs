//! The `-d`/`-D` log: which items are on, and where lines go (the `-D` file the launcher opened, or stderr).

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};

pub struct GuestLog {
    items: HashSet<String>,
    out: Mutex<Box<dyn Write + Send>>,
}

impl GuestLog {
    pub fn new(items: Vec<String>, out: Box<dyn Write + Send>) -> Arc<GuestLog> {
        Arc::new(GuestLog { items: items.into_iter().collect(), out: Mutex::new(out) })
    }

    pub fn stderr(items: Vec<String>) -> Arc<GuestLog> {
        Self::new(items, Box::new(std::io::stderr()))
    }

    /// Whether `-d item` was given.
    pub fn enabled(&self, item: &str) -> bool {
        self.items.contains(item)
    }

    /// A line for an enabled item.
    pub fn line_for(&self, item: &str, msg: &str) {
        if self.enabled(item) {
            self.line(msg);
        }
    }

    /// A problem worth telling the user about whatever `-d` says (the guest's output was lost, ...).
    pub fn error(&self, msg: &str) {
        self.line(&format!("tessera-core: {msg}"));
    }

    fn line(&self, msg: &str) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // Logging must never take the VM down: a full disk or closed log file loses the line only.
        let _ = writeln!(out, "{msg}");
        let _ = out.flush();
    }
}
