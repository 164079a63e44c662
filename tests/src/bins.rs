//! Locating the binaries the workspace builds (target/<profile>/), for tests that run them as a user would.

use std::path::PathBuf;

/// target/<profile>/, derived from the running test executable (target/<profile>/deps/<test>-<hash>).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(|d| d.parent()).expect("test executables live in target/<profile>/deps/").to_path_buf()
}

/// The built binary `name` of workspace package `package`, brought up to date once per test process:
/// `cargo test -p tessera-tests` alone does not build (or rebuild) other packages' binaries.
pub fn binary(package: &str, name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let path = profile_dir().join(name);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|p| p == package) {
        built.push(package.to_string());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "--bins", "-p", package])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p {package} failed");
    }
    assert!(path.exists(), "{} does not exist after building {package}", path.display());
    path
}

/// The launcher, under the name `name` (`tessera` or `qemu-system-x86_64`).
pub fn launcher(name: &str) -> PathBuf {
    binary("tessera-launcher", name)
}
