//! A fake launcher for tessera-chardev: starts the real binary with a control channel at fd 3, configures it
//! with descriptors, and plays the core's end of the serial channels.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::de::DeserializeOwned;
use tessera_ipc::messages::{
    ChardevBackend, ChardevConfig, ChardevToCore, ChildConfig, ChildToLauncher, CoreToChardev, FdIndex,
    LauncherToChild, LogConfig, Role,
};
use tessera_ipc::Channel;

/// Generous bound for anything the chardev should do "at once" on a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The built `tessera-chardev`: next to the test executable's directory (`target/<profile>/`), or in
/// `$TESSERA_LIBEXEC_DIR`.
pub fn chardev_binary() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_LIBEXEC_DIR") {
        return PathBuf::from(dir).join("tessera-chardev");
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target directory");
    let bin = dir.join("tessera-chardev");
    assert!(bin.exists(), "{} is missing: build the binaries first (cargo build --workspace --bins)", bin.display());
    bin
}

/// Descriptors of a configuration under construction; their indexes go into the config.
#[derive(Default)]
pub struct Fds {
    fds: Vec<OwnedFd>,
}

impl Fds {
    pub fn add(&mut self, fd: impl Into<OwnedFd>) -> FdIndex {
        self.fds.push(fd.into());
        FdIndex(self.fds.len() as u32 - 1)
    }
}

/// A default configuration: one chardev `id`, no mux.
pub fn config(id: &str, backend: ChardevBackend, frontends: Vec<FdIndex>) -> ChardevConfig {
    ChardevConfig {
        id: id.into(),
        backend,
        frontends,
        mux: false,
        signal: true,
        logfile: None,
        log: LogConfig::default(),
    }
}

/// The core's end of one serial channel.
pub struct CoreEnd {
    pub chan: Channel,
}

impl CoreEnd {
    pub fn output(&self, bytes: &[u8]) {
        self.chan.send(&CoreToChardev::Output(bytes.to_vec()), &[]).expect("send guest output");
    }

    /// Collect `Input` bytes until `want` bytes arrived (or fail after [`PATIENCE`]).
    pub fn input(&self, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        while got.len() < want {
            match self.recv(deadline) {
                ChardevToCore::Input(b) => got.extend(b),
                other => panic!("expected input, got {other:?} after {got:?}"),
            }
        }
        got
    }

    pub fn recv(&self, deadline: Instant) -> ChardevToCore {
        recv_by(&self.chan, deadline)
    }

    /// True if nothing arrives within `wait`.
    pub fn quiet_for(&self, wait: Duration) -> bool {
        !readable(self.chan.as_fd(), wait)
    }
}

fn readable(fd: BorrowedFd<'_>, wait: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(wait.as_millis() as u32).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, ms), Ok(n) if n > 0)
}

/// Receive one message, failing the test at `deadline`.
pub fn recv_by<T: DeserializeOwned>(chan: &Channel, deadline: Instant) -> T {
    let left = deadline.saturating_duration_since(Instant::now());
    if !chan.has_partial_frame() && !readable(chan.as_fd(), left) {
        panic!("no message arrived in time");
    }
    chan.recv::<T>().map(|(msg, _fds)| msg).expect("receive a message")
}

/// A running tessera-chardev with the launcher's end of its control channel.
pub struct Running {
    pub child: Child,
    pub control: Channel,
}

impl Running {
    /// Start the binary, hand it `cfg` and `fds`, and wait for `Ready`. Its stderr is captured.
    pub fn start(cfg: ChardevConfig, fds: Fds) -> Running {
        Self::start_with(cfg, fds, |_| {})
    }

    /// As [`Running::start`], letting the caller adjust the command (stdio, process group).
    pub fn start_with(cfg: ChardevConfig, fds: Fds, adjust: impl FnOnce(&mut Command)) -> Running {
        let running = Self::launch(cfg, fds, adjust);
        match running.next_message(Instant::now() + PATIENCE) {
            ChildToLauncher::Ready => {}
            other => panic!("expected Ready, got {other:?}"),
        }
        running
    }

    /// Start the binary and send the configuration, without waiting for its answer.
    pub fn launch(cfg: ChardevConfig, fds: Fds, adjust: impl FnOnce(&mut Command)) -> Running {
        let mut cmd = Command::new(chardev_binary());
        cmd.args(["--ipc-fd", "3"]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        adjust(&mut cmd);
        Self::launch_command(cmd, cfg, fds)
    }

    /// Run `cmd` with the control channel at fd 3 (it must end up running tessera-chardev with
    /// `--ipc-fd 3`, perhaps through a shell), shake hands and send the configuration.
    pub fn launch_command(mut cmd: Command, cfg: ChardevConfig, fds: Fds) -> Running {
        let (launcher_end, child_end) = Channel::pair().expect("socketpair");
        let child_sock = child_end.into_socket();
        let child_raw = child_sock.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) are made.
        unsafe {
            cmd.pre_exec(move || {
                if child_raw == 3 {
                    // dup2 onto itself keeps close-on-exec: clear it by hand.
                    if nix::libc::fcntl(3, nix::libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if nix::libc::dup2(child_raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn tessera-chardev");
        drop(child_sock);
        let running = Running { child, control: launcher_end };
        running.control.handshake(Role::Launcher, Role::Chardev).expect("handshake");
        let borrowed: Vec<BorrowedFd<'_>> = fds.fds.iter().map(|f| f.as_fd()).collect();
        running
            .control
            .send(&LauncherToChild::Configure(ChildConfig::Chardev(cfg)), &borrowed)
            .expect("send the configuration");
        drop(fds);
        running
    }

    pub fn next_message(&self, deadline: Instant) -> ChildToLauncher {
        recv_by(&self.control, deadline)
    }

    pub fn shutdown(&self) {
        self.control.send(&LauncherToChild::Shutdown, &[]).expect("send Shutdown");
    }

    /// Wait for the process to exit (killing it after [`PATIENCE`]); returns its status and stderr.
    pub fn wait(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait");
                let err = read_stderr(&mut self.child);
                panic!("tessera-chardev did not exit in time ({status}); stderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let err = read_stderr(&mut self.child);
        (status, err)
    }

    /// Close the launcher's end of the control channel, as a dying launcher would.
    pub fn close_control(&mut self) {
        let (dummy, _) = Channel::pair().expect("socketpair");
        drop(std::mem::replace(&mut self.control, dummy));
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_stderr(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// A serial channel pair: the core's end for the test, the chardev's end into `fds`.
pub fn serial_channel(fds: &mut Fds) -> (CoreEnd, FdIndex) {
    let (core, chardev) = Channel::pair().expect("socketpair");
    let index = fds.add(chardev.into_socket());
    (CoreEnd { chan: core }, index)
}

/// Deterministic test data: `len` bytes that differ from chunk to chunk, so reordering shows.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Read from `fd` until `pred` holds for what was read so far, or fail after [`PATIENCE`] showing it.
pub fn read_until(fd: BorrowedFd<'_>, what: &str, mut pred: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + PATIENCE;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while !pred(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !readable(fd, left) {
            panic!("timed out waiting for {what}; got so far: {:?}", String::from_utf8_lossy(&got));
        }
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => panic!("EOF while waiting for {what}; got: {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("read failed ({e}) while waiting for {what}; got: {:?}", String::from_utf8_lossy(&got)),
        }
    }
    got
}

/// Does `hay` contain `needle`?
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
