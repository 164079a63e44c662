//! A fake launcher for driving the real `tessera-core` binary: it makes the control socketpair, starts the core
//! with its end at fd 3, shakes hands, sends `Configure` with the kernel file and serial channel ends attached,
//! and then plays the chardev side of the serial channel. Included by the `core_*` tests with `#[path]`.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tessera_ipc::fds::FdList;
use tessera_ipc::messages::{
    Accel, BootConfig, BootFile, ChardevToCore, ChildConfig, ChildToLauncher, CoreConfig, CoreToChardev,
    DebugExitConfig, LauncherToChild, LogConfig, RamConfig, Role, SerialConfig, VhostUserBlkConfig,
};
use tessera_ipc::{Channel, IpcError};

/// How long any one step may take. Tiny guests need well under a second even with KVM's slow emulation here.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// True when KVM tests can run; prints why not otherwise.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("SKIPPED {test}: /dev/kvm is absent on this host");
        false
    }
}

/// The built `tessera-core` next to the test executable's directory (target/<profile>/).
pub fn core_binary() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_LIBEXEC_DIR") {
        return PathBuf::from(dir).join("tessera-core");
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("tessera-core");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (cargo build -p tessera-core, or cargo test --workspace)",
        bin.display()
    );
    bin
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("tessera-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Setup {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub ram: u64,
    pub smp: u32,
    pub accel: Accel,
    pub cpu_model: String,
    pub serials: usize,
    pub debug_exit: Option<DebugExitConfig>,
    pub no_reboot: bool,
    pub log_items: Vec<String>,
    /// `share=on` of the memory backend (vhost-user needs it).
    pub ram_shared: bool,
    /// vhost-user-blk devices (socket paths: the core connects).
    pub vhost_user_blk: Vec<VhostUserBlkConfig>,
}

impl Setup {
    pub fn new(kernel: &Path) -> Setup {
        Setup {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
            ram: 64 << 20,
            smp: 1,
            accel: Accel::Kvm,
            cpu_model: "qemu64".into(),
            serials: 1,
            debug_exit: Some(DebugExitConfig { iobase: 0x501, iosize: 2 }),
            no_reboot: false,
            log_items: Vec::new(),
            ram_shared: false,
            vhost_user_blk: Vec::new(),
        }
    }
}

pub struct Core {
    pub child: Child,
    pub control: Channel,
    pub serials: Vec<Channel>,
    /// Everything received on serial channel 0 so far.
    pub output: Vec<u8>,
    /// Bytes of the core's stderr, read after it exits.
    stderr: Option<std::process::ChildStderr>,
}

pub fn start(setup: &Setup) -> Core {
    let (launcher_end, core_end) = UnixStream::pair().unwrap();
    let mut cmd = Command::new(core_binary());
    cmd.args(["--ipc-fd", "3"]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let raw = core_end.as_raw_fd();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn tessera-core");
    drop(core_end);
    let stderr = child.stderr.take();
    let control = Channel::new(launcher_end);
    control.handshake(Role::Launcher, Role::Core).expect("handshake with tessera-core");

    let kernel = File::open(&setup.kernel).expect("open kernel");
    let initrd = setup.initrd.as_ref().map(|p| File::open(p).expect("open initrd"));
    let mut serial_pairs = Vec::new();
    for _ in 0..setup.serials {
        serial_pairs.push(Channel::pair().unwrap());
    }
    // As the launcher does: /dev/kvm opened here and passed, since the core (sandboxed by default) cannot open it.
    let kvm_device = (setup.accel == Accel::Kvm)
        .then(|| std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").expect("open /dev/kvm"));
    let mut fds = FdList::new();
    let kfd = fds.push(kernel.as_fd());
    let ifd = initrd.as_ref().map(|f| fds.push(f.as_fd()));
    // As the launcher does: vhost-user sockets are connected here and passed, since the sandboxed core may not
    // create sockets. A path that cannot be connected stays a path (the core then reports the failure).
    let mut vhost_streams = Vec::new();
    let mut vhost_user_blk = setup.vhost_user_blk.clone();
    for dev in &mut vhost_user_blk {
        if let tessera_ipc::messages::VhostUserSocket::Path(p) = &dev.socket {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(p) {
                vhost_streams.push((dev.id.clone(), stream));
            }
        }
    }
    for (id, stream) in &vhost_streams {
        let index = fds.push(stream.as_fd());
        for dev in vhost_user_blk.iter_mut().filter(|d| &d.id == id) {
            dev.socket = tessera_ipc::messages::VhostUserSocket::Connected(index);
        }
    }
    let serial = serial_pairs
        .iter()
        .enumerate()
        .map(|(i, (core, _))| SerialConfig { channel: fds.push(core.as_fd()), chardev_id: format!("serial{i}") })
        .collect();
    let cfg = CoreConfig {
        name: None,
        accel: setup.accel,
        kvm: kvm_device.as_ref().map(|k| fds.push(k.as_fd())),
        topology: None,
        cpu_model: setup.cpu_model.clone(),
        smp: setup.smp,
        ram: RamConfig { size: setup.ram, shared: setup.ram_shared, backend_id: None },
        boot: BootConfig {
            kernel: Some(BootFile { fd: kfd, path: setup.kernel.display().to_string() }),
            initrd: ifd.map(|fd| BootFile { fd, path: setup.initrd.as_ref().unwrap().display().to_string() }),
            cmdline: setup.cmdline.clone(),
        },
        serial,
        debug_exit: setup.debug_exit,
        no_reboot: setup.no_reboot,
        no_shutdown: false,
        start_paused: false,
        log: LogConfig { items: setup.log_items.clone(), file: None },
        vhost_user_blk,
        vhost_user_net: Vec::new(),
    };
    control.send(&LauncherToChild::Configure(ChildConfig::Core(cfg)), fds.as_slice()).expect("send Configure");
    drop(fds);
    let serials = serial_pairs.into_iter().map(|(_core, chardev)| chardev).collect::<Vec<_>>();
    for s in &serials {
        s.set_nonblocking(true).unwrap();
    }
    control.set_nonblocking(true).unwrap();
    Core { child, control, serials, output: Vec::new(), stderr }
}

/// Wait up to `timeout` for a whole message on `ch` (non-blocking channel).
fn recv_timeout<T: serde::de::DeserializeOwned>(ch: &Channel, timeout: Duration) -> Result<Option<T>, IpcError> {
    let deadline = Instant::now() + timeout;
    loop {
        match ch.try_recv::<T>() {
            Ok((m, _)) => return Ok(Some(m)),
            Err(IpcError::WouldBlock) => {}
            Err(e) => return Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let ms = left.as_millis().min(100) as u16;
        let mut fds = [PollFd::new(ch.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }
}

impl Core {
    /// The next control message, or a panic (with the guest output so far) after the timeout.
    pub fn control_message(&mut self, timeout: Duration) -> ChildToLauncher {
        match recv_timeout::<ChildToLauncher>(&self.control, timeout) {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.drain_serial();
                panic!(
                    "no control message from tessera-core within {timeout:?}; guest output so far: {:?}",
                    self.text()
                )
            }
            Err(e) => {
                self.drain_serial();
                let status = self.wait_exit();
                panic!(
                    "control channel failed: {e}; core exit {status:?}; stderr: {}; guest output: {:?}",
                    self.stderr_text(),
                    self.text()
                )
            }
        }
    }

    /// Expect `Ready` and then the VM's end.
    pub fn expect_ready(&mut self) {
        let m = self.control_message(STEP_TIMEOUT);
        assert_eq!(m, ChildToLauncher::Ready, "guest output: {:?}", self.text());
    }

    /// Take every serial message already buffered, without waiting.
    pub fn drain_serial(&mut self) {
        while let Ok(Some(CoreToChardev::Output(b))) = recv_timeout::<CoreToChardev>(&self.serials[0], Duration::ZERO) {
            self.output.extend(b);
        }
    }

    /// Read serial output until it contains `needle` (panics with the output after the timeout).
    pub fn wait_output(&mut self, needle: &[u8]) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !self.output.windows(needle.len().max(1)).any(|w| w == needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "guest output never contained {:?}; got {:?}",
                String::from_utf8_lossy(needle),
                self.text()
            );
            match recv_timeout::<CoreToChardev>(&self.serials[0], left.min(Duration::from_millis(200))) {
                Ok(Some(CoreToChardev::Output(b))) => self.output.extend(b),
                Ok(None) => {}
                Err(e) => {
                    let control = recv_timeout::<ChildToLauncher>(&self.control, Duration::from_secs(1));
                    let status = self.wait_exit();
                    panic!(
                        "serial channel failed: {e}; output so far {:?}; control: {control:?}; core {status}; \
                         stderr: {}",
                        self.text(),
                        self.stderr_text()
                    )
                }
            }
        }
    }

    pub fn send_input(&self, bytes: &[u8]) {
        self.serials[0].send(&ChardevToCore::Input(bytes.to_vec()), &[]).unwrap();
    }

    pub fn send_break(&self) {
        self.serials[0].send(&ChardevToCore::Break, &[]).unwrap();
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// Wait for the process to end (killing it after the timeout).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let st = self.child.wait().unwrap();
                panic!("tessera-core did not exit within {STEP_TIMEOUT:?} (killed: {st})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr_text(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// Expect `Exit { code }`: the guest's output before the exit must already be on the serial channel when
    /// `Exit` arrives. Then the process must end with status 0.
    pub fn expect_exit(&mut self, code: i32) -> String {
        let m = self.control_message(STEP_TIMEOUT);
        // Whatever the core sent before Exit is in the socket now: take it without waiting.
        self.drain_serial();
        match m {
            ChildToLauncher::Exit { code: c, reason } => {
                assert_eq!(c, code, "exit reason {reason:?}; guest output {:?}", self.text());
                let st = self.wait_exit();
                assert!(st.success(), "tessera-core exited with {st} after Exit; stderr: {}", self.stderr_text());
                reason
            }
            other => panic!("expected Exit {{ code: {code} }}, got {other:?}; guest output {:?}", self.text()),
        }
    }

    /// Expect `Fatal` and exit status 1; returns the message.
    pub fn expect_fatal(&mut self) -> String {
        let m = self.control_message(STEP_TIMEOUT);
        match m {
            ChildToLauncher::Fatal { message } => {
                let st = self.wait_exit();
                assert_eq!(st.code(), Some(1), "exit status after Fatal");
                message
            }
            other => panic!("expected Fatal, got {other:?}"),
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A file with `contents` in `dir`.
pub fn write_file(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}
