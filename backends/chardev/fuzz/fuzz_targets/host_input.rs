//! Arbitrary bytes from the host side (a telnet client, a terminal) through the telnet filter and the
//! Ctrl-A escape keys: never a panic, never more data out than came in, and the same result however the
//! bytes are split across reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_chardev::mux::{normalize as normalize_mux, Mux};
use tessera_chardev::telnet::{normalize as normalize_telnet, TelnetFilter};

fuzz_target!(|data: &[u8]| {
    let Some((&split_seed, bytes)) = data.split_first() else {
        return;
    };
    let whole = TelnetFilter::new().feed(bytes);
    let mut f = TelnetFilter::new();
    let mut parts = Vec::new();
    for chunk in bytes.chunks(usize::from(split_seed % 7) + 1) {
        parts.extend(f.feed(chunk));
    }
    assert_eq!(normalize_telnet(whole.clone()), normalize_telnet(parts));

    let whole_mux = Mux::new().feed(bytes);
    let mut m = Mux::new();
    let mut parts = Vec::new();
    for chunk in bytes.chunks(usize::from(split_seed % 5) + 1) {
        parts.extend(m.feed(chunk));
    }
    let whole_mux = normalize_mux(whole_mux);
    assert_eq!(whole_mux, normalize_mux(parts));
    let typed: usize = whole_mux
        .iter()
        .map(|e| match e {
            tessera_chardev::mux::MuxEvent::Input(b) => b.len(),
            _ => 0,
        })
        .sum();
    assert!(typed <= bytes.len());
});
