//! The tessera launcher: QEMU command line to a supervised process graph

fn main() {
    eprintln!("tessera-launcher: not implemented yet");
    std::process::exit(1);
}
