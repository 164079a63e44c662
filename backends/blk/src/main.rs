//! Tessera's vhost-user-blk backend

fn main() {
    eprintln!("tessera-blk: not implemented yet");
    std::process::exit(1);
}
