//! Boot Debian's Linux kernel with a busybox initramfs the test builds itself.
//!
//! ```no_run
//! use std::time::Duration;
//! use tessera_tests::linux_guest::*;
//! ensure_debian_packages(&["busybox-static", "linux-image-amd64"]).unwrap();
//! let dir = TempDir::new("example").unwrap();
//! let initrd = Initramfs::new("echo hello; poweroff -f")
//!     .modules(&["virtio_blk", "virtio_pci"])
//!     .build(&dir.path().join("initrd.gz"))
//!     .unwrap();
//! let mut cmd = std::process::Command::new("qemu-system-x86_64");
//! cmd.args(["-accel", "tcg", "-m", "256M"]).args(direct_boot_args(&kernel().unwrap(), &initrd));
//! let run = run_guest(cmd, Duration::from_secs(120), Some("hello")).unwrap();
//! assert!(run.serial.contains("hello"), "{}", run.serial);
//! ```
//!
//! The initramfs holds busybox (symlinked by `/init` itself), the kernel modules asked for and
//! their dependencies from `modules.dep` (in load order), host binaries asked for together with
//! their shared libraries (as `ldd` lists them), extra files, and the `/init` script given.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A directory removed on drop (unless `TESSERA_KEEP_TEMP` is set, for debugging).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "tessera-{prefix}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TESSERA_KEEP_TEMP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Installs the Debian packages that are missing (tests run as root on Debian); a no-op when all
/// are installed.
pub fn ensure_debian_packages(packages: &[&str]) -> io::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing missing Debian packages: {missing:?}");
    let ok = |s: io::Result<std::process::ExitStatus>| -> io::Result<()> {
        match s {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(io::Error::other(format!("apt-get failed: {s}"))),
            Err(e) => Err(e),
        }
    };
    ok(Command::new("apt-get").arg("update").status())?;
    ok(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status())
}

/// The newest `/boot/vmlinuz-*` (Debian's `linux-image-amd64`).
pub fn kernel() -> io::Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir("/boot")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .collect();
    found.sort();
    found.pop().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no /boot/vmlinuz-* (install linux-image-amd64)"))
}

/// Kernel release of a `/boot/vmlinuz-<release>` path.
pub fn kernel_release(kernel: &Path) -> Option<String> {
    kernel.file_name()?.to_str()?.strip_prefix("vmlinuz-").map(str::to_owned)
}

/// What goes into an initramfs.
pub struct Initramfs {
    init: String,
    modules: Vec<String>,
    binaries: Vec<PathBuf>,
    files: Vec<(String, Vec<u8>)>,
    release: Option<String>,
}

impl Initramfs {
    /// `script` is the body of `/init` (a busybox `sh` script); the builder prepends the busybox
    /// set-up, the mounts of /proc, /sys and /dev, and the module loading.
    pub fn new(script: &str) -> Self {
        Initramfs {
            init: script.to_owned(),
            modules: Vec::new(),
            binaries: Vec::new(),
            files: Vec::new(),
            release: None,
        }
    }

    /// Kernel modules (by name, e.g. `virtio_blk`) to load before the script runs.
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|s| s.to_string()));
        self
    }

    /// Host binaries (absolute paths) copied with their shared libraries, at the same path.
    pub fn binaries(mut self, paths: &[&str]) -> Self {
        self.binaries.extend(paths.iter().map(PathBuf::from));
        self
    }

    /// A file at `path` (absolute, inside the guest) with `contents`.
    pub fn file(mut self, path: &str, contents: Vec<u8>) -> Self {
        self.files.push((path.to_owned(), contents));
        self
    }

    /// Kernel release whose modules to use; default: that of [`kernel()`].
    pub fn release(mut self, release: &str) -> Self {
        self.release = Some(release.to_owned());
        self
    }

    /// Writes the gzip-compressed newc cpio archive to `out` and returns `out`.
    pub fn build(self, out: &Path) -> io::Result<PathBuf> {
        let root_dir = TempDir::new("initramfs")?;
        let root = root_dir.path();
        for d in ["bin", "sbin", "proc", "sys", "dev", "tmp", "mnt", "etc", "lib/modules"] {
            fs::create_dir_all(root.join(d))?;
        }
        fs::copy(find_busybox()?, root.join("bin/busybox"))?;

        let mut init = String::from(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sys /sys\n\
             mount -t devtmpfs dev /dev\n\
             ln -sf /proc/mounts /etc/mtab\n",
        );
        if !self.modules.is_empty() {
            let release = match self.release {
                Some(r) => r,
                None => kernel_release(&kernel()?).ok_or_else(|| io::Error::other("cannot tell the kernel release"))?,
            };
            for m in resolve_modules(&release, &self.modules)? {
                let name = m.file_name().and_then(|n| n.to_str()).ok_or_else(|| io::Error::other("bad module path"))?;
                let plain = name.strip_suffix(".xz").or_else(|| name.strip_suffix(".zst")).unwrap_or(name).to_owned();
                let dest = root.join("lib/modules").join(&plain);
                copy_module(&m, &dest)?;
                init.push_str(&format!("insmod /lib/modules/{plain}\n"));
            }
        }
        for b in &self.binaries {
            copy_with_libs(b, root)?;
        }
        for (path, contents) in &self.files {
            let dest = root.join(path.trim_start_matches('/'));
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(dest, contents)?;
        }
        init.push_str(&self.init);
        init.push_str("\necho TESSERA-INIT-END\npoweroff -f\n");
        let init_path = root.join("init");
        fs::write(&init_path, init)?;
        set_mode(&init_path, 0o755)?;

        let out_abs = if out.is_absolute() { out.to_owned() } else { std::env::current_dir()?.join(out) };
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("find . -print | cpio --quiet -o -H newc -R 0:0 | gzip -1 > '{}'", out_abs.display()))
            .current_dir(root)
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!("cpio|gzip failed: {status}")));
        }
        Ok(out_abs)
    }
}

fn set_mode(p: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
}

fn find_busybox() -> io::Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "busybox not found (install busybox-static)"))
}

/// Module files for `names` and all their dependencies, dependencies first.
fn resolve_modules(release: &str, names: &[String]) -> io::Result<Vec<PathBuf>> {
    let base = PathBuf::from("/lib/modules").join(release);
    let dep = fs::read_to_string(base.join("modules.dep"))?;
    let mut deps = std::collections::HashMap::new();
    for line in dep.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let list: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(module.to_owned(), list);
    }
    let module_name = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        let stem = file.split(".ko").next().unwrap_or(file);
        stem.replace('-', "_")
    };
    let by_name: std::collections::HashMap<String, String> = deps.keys().map(|k| (module_name(k), k.clone())).collect();

    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        m: &str,
        deps: &std::collections::HashMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_owned()) {
            return;
        }
        // modules.dep lists the full transitive closure, in an order where later entries are
        // needed by earlier ones; visiting each recursively gives dependencies first.
        if let Some(list) = deps.get(m) {
            for d in list.iter().rev() {
                visit(d, deps, seen, order);
            }
        }
        order.push(m.to_owned());
    }
    for n in names {
        let key = by_name.get(&n.replace('-', "_")).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("module {n} not in {}/modules.dep (built in, or missing?)", base.display()),
            )
        })?;
        visit(key, &deps, &mut seen, &mut order);
    }
    Ok(order.into_iter().map(|m| base.join(m)).collect())
}

/// Copies a module, decompressing `.ko.xz`/`.ko.zst` (busybox insmod loads plain ones only).
fn copy_module(src: &Path, dest: &Path) -> io::Result<()> {
    let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tool = match ext {
        "xz" => Some("xz"),
        "zst" => Some("zstd"),
        _ => None,
    };
    match tool {
        None => fs::copy(src, dest).map(|_| ()),
        Some(tool) => {
            let out = Command::new(tool).args(["-dc"]).arg(src).output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!("{tool} -dc {} failed", src.display())));
            }
            fs::write(dest, out.stdout)
        }
    }
}

/// Copies `bin` and the shared libraries `ldd` lists for it into `root` at the same paths.
fn copy_with_libs(bin: &Path, root: &Path) -> io::Result<()> {
    let mut files = vec![bin.to_owned()];
    let out = Command::new("ldd").arg(bin).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dest = root.join(f.strip_prefix("/").unwrap_or(&f));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        // Follow symlinks: copy the real contents under the name asked for.
        fs::copy(&f, &dest)?;
    }
    Ok(())
}

/// `-kernel`, `-initrd` and `-append` for a direct Linux boot with the console on the first
/// serial port, rebooting (and so, with `-no-reboot`, exiting) on panic.
pub fn direct_boot_args(kernel: &Path, initrd: &Path) -> Vec<String> {
    vec![
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        "console=ttyS0 panic=-1 loglevel=4".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-monitor".into(),
        "none".into(),
        "-no-reboot".into(),
    ]
}

/// The outcome of [`run_guest`].
pub struct GuestRun {
    /// Everything the guest wrote to its serial port (QEMU's stdout) and QEMU's stderr.
    pub serial: String,
    /// QEMU's exit status; `None` if it was killed at the timeout.
    pub status: Option<std::process::ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Runs `cmd` (a QEMU command line whose serial port is on stdout) until it exits, or until
/// `timeout`, after which it is killed. If `done_marker` appears in the output, QEMU is given
/// a few seconds to exit on its own and then killed (a guest that printed its verdict need not
/// finish shutting down).
pub fn run_guest(cmd: Command, timeout: Duration, done_marker: Option<&str>) -> io::Result<GuestRun> {
    run_guest_watching(cmd, timeout, done_marker, |_| {})
}

/// [`run_guest`], calling `watch` with the whole output so far whenever more arrives, so a test
/// can act on the host when the guest reaches a point (restart a backend, ...).
pub fn run_guest_watching(
    cmd: Command,
    timeout: Duration,
    done_marker: Option<&str>,
    mut watch: impl FnMut(&str),
) -> io::Result<GuestRun> {
    run_guest_until(cmd, timeout, done_marker, |out| {
        watch(out);
        false
    })
}

/// [`run_guest_watching`] where `watch` may also end the run: when it returns true, QEMU is killed at once
/// (the test has seen what it needed; not a time-out).
pub fn run_guest_until(
    mut cmd: Command,
    timeout: Duration,
    done_marker: Option<&str>,
    mut watch: impl FnMut(&str) -> bool,
) -> io::Result<GuestRun> {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut readers = Vec::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let out = out.clone();
        readers.push(std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut o) = out.lock() {
                    o.extend_from_slice(&buf[..n]);
                }
            }
        }));
    }
    let mut marker_seen_at: Option<Instant> = None;
    let mut seen_len = 0;
    let (status, timed_out) = loop {
        if let Some(s) = child.try_wait()? {
            break (Some(s), false);
        }
        let now = out.lock().map(|o| String::from_utf8_lossy(&o).into_owned()).unwrap_or_default();
        if now.len() != seen_len {
            seen_len = now.len();
            if watch(&now) {
                let _ = child.kill();
                let status = child.wait().ok();
                break (status, false);
            }
        }
        if marker_seen_at.is_none() {
            if let Some(m) = done_marker {
                let seen = out.lock().map(|o| String::from_utf8_lossy(&o).contains(m)).unwrap_or(false);
                if seen {
                    marker_seen_at = Some(Instant::now());
                }
            }
        }
        let grace_over = marker_seen_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5));
        if start.elapsed() > timeout || grace_over {
            let _ = child.kill();
            let _ = child.wait();
            break (None, !grace_over);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for r in readers {
        let _ = r.join();
    }
    let serial = out.lock().map(|o| String::from_utf8_lossy(&o).into_owned()).unwrap_or_default();
    Ok(GuestRun { serial, status, timed_out, elapsed: start.elapsed() })
}

/// Path of a workspace binary (`tessera-blk`, ...) in the target directory of the running test,
/// (re)built with `cargo build --bin <name>` first so a test never runs a stale binary.
pub fn built_binary(name: &str) -> io::Result<PathBuf> {
    // Test executables live in <target>/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let profile_dir =
        exe.parent().and_then(Path::parent).ok_or_else(|| io::Error::other("cannot locate the target directory"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--workspace", "--bin", name]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd.status()?;
    if !status.success() {
        return Err(io::Error::other(format!("cargo build --bin {name} failed: {status}")));
    }
    let bin = profile_dir.join(name);
    if bin.exists() {
        Ok(bin)
    } else {
        Err(io::Error::new(io::ErrorKind::NotFound, format!("{} not found after building it", bin.display())))
    }
}
