//! `tessera`: the launcher. Everything is in the library; see `tessera_launcher::main_entry`.

fn main() {
    std::process::exit(tessera_launcher::main_entry());
}
