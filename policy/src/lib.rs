//! Sandbox profiles for each Tessera process kind, as data, and the code that applies them.
//!
//! - `profiles/*.toml` (embedded at build time): per kind, the syscall allow-list with argument filters, the
//!   namespaces, the filesystem root, Landlock rules, rlimits and capabilities ([`Profile`]).
//! - [`SandboxOptions`]: QEMU's `-sandbox`, `-runas`, `-chroot`, parsed by the launcher and handed to each
//!   child in the [`SANDBOX_ENV`] environment variable.
//! - In the launcher, per child: [`prepare_command`] (the environment variable and the async-signal-safe
//!   [`pre_exec_child`] hook). At the top of a child's `main`,
//!   before it reads anything untrusted: [`enter_from_env`] (or [`prepare`] then [`Prepared::lock`]).
//!
//! docs/SECURITY.md has the threat model and what each process can reach.

mod apply;
pub mod hostile;
mod options;
mod profile;
mod seccomp;
pub mod syscalls;

pub use apply::{
    enter, enter_from_env, open_descriptors, pre_exec_child, prepare, prepare_command, Prepared, SandboxReport,
};
pub use options::{LandlockMode, QemuSubOptions, RunAs, SandboxOptions, SeccompMode, SANDBOX_ENV};
pub use profile::{
    AllowGroup, ArgOp, ArgRule, ArgValue, ErrnoGroup, LandlockRules, Namespaces, ProcessKind, Profile, Rlimits,
};
pub use seccomp::{build as build_seccomp_filters, Filters};

use std::path::PathBuf;

/// What the launcher can add when a child was killed by `signal`: SIGSYS is the seccomp filter's verdict on a
/// system call outside the child's profile.
pub fn death_hint(signal: i32) -> Option<&'static str> {
    (signal == libc::SIGSYS).then_some(
        "it made a system call its sandbox profile does not allow (the kernel log has it: audit type=1326, \
         syscall=N); -sandbox on,seccomp=log lets such calls through and logs them",
    )
}

/// Everything that can go wrong in reading profiles and options and in confining a process.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("sandbox profile {file}.toml is not valid TOML for a profile: {message}")]
    ProfileSyntax { file: String, message: String },
    #[error("sandbox profile {file}.toml: {message}")]
    ProfileInvalid { file: String, message: String },
    #[error("-sandbox {arg}: {message}")]
    SandboxOption { arg: String, message: String },
    #[error("-runas {arg}: {message}")]
    RunAs { arg: String, message: String },
    #[error("-run-with {arg}: {message}")]
    RunWith { arg: String, message: String },
    #[error("-chroot {}: {message}", dir.display())]
    Chroot { dir: PathBuf, message: String },
    #[error("{SANDBOX_ENV}={value:?} from the launcher: {message}")]
    SandboxEnv { value: String, message: String },
    #[error("tessera-{kind}: -runas needs the launcher to run as root")]
    RunAsNeedsRoot { kind: ProcessKind },
    #[error("-runas needs the launcher to run as root (it runs as uid {uid})")]
    RunAsLauncherNotRoot { uid: u32 },
    #[error("tessera-{kind}: its profile needs a user namespace or root to confine it")]
    NeedsPrivilege { kind: ProcessKind },
    #[error(
        "tessera-{kind}: the host does not allow this unprivileged process a user namespace, which its sandbox \
         needs (check the sysctls user.max_user_namespaces and kernel.unprivileged_userns_clone, or AppArmor's \
         kernel.apparmor_restrict_unprivileged_userns), run as root, or use -sandbox off"
    )]
    UserNamespaceUnavailable {
        kind: ProcessKind,
        #[source]
        source: std::io::Error,
    },
    #[error("tessera-{kind}: the sandbox must be entered before any thread starts ({count} threads are running)")]
    ThreadsRunning { kind: ProcessKind, count: usize },
    #[error("the launcher (pid {expected}) is gone: the parent is now pid {actual}")]
    ParentGone { expected: u32, actual: i32 },
    #[error("sandbox set-up failed at {step}")]
    Os {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("capabilities: {step}: {message}")]
    Capabilities { step: &'static str, message: String },
    #[error("setting {resource}")]
    Rlimit {
        resource: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "tessera-{kind}: -sandbox on asks for Landlock and this kernel does not enforce it ({status}); \
         use -sandbox on,landlock=auto to run without it"
    )]
    LandlockUnavailable { kind: ProcessKind, status: String },
    #[error("tessera-{kind}: Landlock: {message}")]
    Landlock { kind: ProcessKind, message: String },
    #[error("tessera-{kind}: building the seccomp filter: {message}")]
    SeccompBuild { kind: String, message: String },
    #[error("this kernel has no seccomp filter support (CONFIG_SECCOMP_FILTER); use -sandbox off")]
    SeccompUnavailable {
        #[source]
        source: std::io::Error,
    },
    #[error("installing the seccomp filter: {message}")]
    SeccompInstall { message: String },
}
