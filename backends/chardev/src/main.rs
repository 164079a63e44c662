//! Tessera's character-device backend process (-serial, -chardev)

fn main() {
    eprintln!("tessera-chardev: not implemented yet");
    std::process::exit(1);
}
