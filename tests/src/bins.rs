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

/// The launcher as `name` (`tessera` or `qemu-system-x86_64`), with the real tessera-core and tessera-chardev built
/// next to it, stdin closed and stdout/stderr captured.
pub fn launcher_command(name: &str) -> std::process::Command {
    binary("tessera-core", "tessera-core");
    binary("tessera-chardev", "tessera-chardev");
    let mut cmd = std::process::Command::new(launcher(name));
    cmd.env_remove("TESSERA_LIBEXEC_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// Wait for a VM started with [`launcher_command`] to end, for at most `timeout`; past it, kill it and panic with
/// the guest's serial output (stdout) and the launcher's stderr.
pub fn wait_output(mut child: std::process::Child, timeout: std::time::Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the VM did not end within {timeout:?}\nstdout (guest serial): {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Makes `sources` the child's descriptors 3, 4, ... (in order) across exec, as the launcher passes them. Each
/// source first moves above the targets, so that no `dup2` overwrites a source not moved yet and a source that
/// already is its own target still loses close-on-exec.
pub fn pass_fds(cmd: &mut std::process::Command, sources: Vec<std::os::fd::RawFd>) {
    use std::os::unix::process::CommandExt;
    let mut sources = sources;
    // SAFETY: fcntl and dup2 only between fork and exec (async-signal-safe); `sources` was allocated before the
    // fork and is only written in place; the descriptors are open in this process.
    unsafe {
        cmd.pre_exec(move || {
            for s in sources.iter_mut() {
                *s = nix::libc::fcntl(*s, nix::libc::F_DUPFD_CLOEXEC, 64);
                if *s < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, s) in sources.iter().enumerate() {
                if nix::libc::dup2(*s, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
