//! Tessera's core process: guest RAM, vCPUs and device front halves

fn main() {
    eprintln!("tessera-core: not implemented yet");
    std::process::exit(1);
}
