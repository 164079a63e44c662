//! Boots Debian's Linux 6.1 on the software CPU as far as it gets, printing the serial console.
//!
//! `cargo run -p tessera-swcpu --release --example linux-boot -- [bzImage] [seconds] [cmdline] [initrd]`
//!
//! The loader lives in `tests/support/linux_boot.rs` (shared with the ignored `linux_boot` test); see there
//! for what it sets up. `SWCPU_PVH=1` uses the PVH entry, `SWCPU_TRACE=1` logs every block.

#[path = "../tests/support/linux_boot.rs"]
#[allow(dead_code)]
mod linux_boot;

struct Logger;
impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("[swcpu {}] {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    log::set_logger(&Logger).ok();
    log::set_max_level(if std::env::var_os("SWCPU_TRACE").is_some() {
        log::LevelFilter::Trace
    } else {
        log::LevelFilter::Warn
    });
    let args: Vec<String> = std::env::args().collect();
    let initrd = match args.get(4) {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("{p}: {e}"))?),
        None => None,
    };
    let cfg = linux_boot::BootConfig {
        image: args.get(1).cloned().unwrap_or_else(|| "/boot/vmlinuz-6.1.0-56-amd64".into()),
        seconds: args.get(2).and_then(|s| s.parse().ok()).unwrap_or(60.0),
        cmdline: args.get(3).cloned().unwrap_or_else(|| "earlyprintk=serial,ttyS0 console=ttyS0 nokaslr".into()),
        initrd,
        pvh: std::env::var_os("SWCPU_PVH").is_some(),
        echo: true,
        stop_on: None,
    };
    let r = linux_boot::boot(&cfg)?;
    println!();
    eprintln!("[linux-boot] exit: {:?}", r.exit);
    eprintln!("[linux-boot] {}", r.state);
    eprintln!(
        "[linux-boot] {} instructions in {:.2} s = {:.1} MIPS; {} blocks decoded, {} code-page invalidations",
        r.stats.instructions,
        r.seconds,
        r.stats.instructions as f64 / r.seconds / 1e6,
        r.stats.blocks_decoded,
        r.stats.code_page_invalidations
    );
    eprintln!("[linux-boot] last serial line: {:?}", r.last_line);
    Ok(())
}
