//! `qemu-system-x86_64`: the same launcher under QEMU's name, so tools that run QEMU by name run Tessera.
//! (An install may instead make `qemu-system-x86_64` a symlink to `tessera`: the launcher reads argv[0].)

fn main() {
    std::process::exit(tessera_launcher::main_entry());
}
