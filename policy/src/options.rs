//! `-sandbox`, `-runas` and `-chroot`: QEMU's options, parsed into what the sandbox applies, and the form the
//! launcher hands each child in the [`SANDBOX_ENV`] environment variable.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::PolicyError;

/// The environment variable through which the launcher tells a child how to confine itself
/// ([`SandboxOptions::to_env_value`]); [`crate::enter_from_env`] reads it.
pub const SANDBOX_ENV: &str = "TESSERA_SANDBOX";

/// What the seccomp filter does with a syscall outside the profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// `SECCOMP_RET_KILL_PROCESS`: the whole process dies with SIGSYS.
    Kill,
    /// `SECCOMP_RET_LOG`: the call goes through and the kernel logs it (audit/dmesg). For development:
    /// `-sandbox on,seccomp=log` runs a graph and lists what each profile lacks.
    Log,
    /// No filter. Not reachable from the command line (`-sandbox off` turns the whole sandbox off); the
    /// sandbox probe uses it to test the other layers on their own.
    Off,
}

/// Whether Landlock must be enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandlockMode {
    /// The kernel must enforce the profile's Landlock rules (at least the filesystem part), or the process
    /// does not start. The default with an explicit `-sandbox on`.
    Required,
    /// Used when the kernel has Landlock; when it has not, the report carries a warning. The default without
    /// any `-sandbox` option.
    IfAvailable,
    Off,
}

/// `-runas`: the uid and gid every Tessera child switches to (the launcher resolves names, the child gets numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Parses `-runas user[:group]` as QEMU does: a user name (its primary group unless `:group` is given),
    /// or numeric `uid:gid`. Group may be a name or a number.
    pub fn parse(arg: &str) -> Result<RunAs, PolicyError> {
        let bad = |message: String| PolicyError::RunAs { arg: arg.to_string(), message };
        let (user, group) = match arg.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (arg, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(bad("expected user[:group]".to_string()));
        }
        let (uid, primary_gid) = match nix::unistd::User::from_name(user) {
            Ok(Some(u)) => (u.uid.as_raw(), Some(u.gid.as_raw())),
            Ok(None) => match user.parse::<u32>() {
                Ok(n) => (n, None),
                Err(_) => return Err(bad(format!("user \"{user}\" does not exist"))),
            },
            Err(e) => return Err(bad(format!("cannot look up user \"{user}\": {e}"))),
        };
        let gid = match group {
            Some(g) => match nix::unistd::Group::from_name(g) {
                Ok(Some(grp)) => grp.gid.as_raw(),
                Ok(None) => g.parse::<u32>().map_err(|_| bad(format!("group \"{g}\" does not exist")))?,
                Err(e) => return Err(bad(format!("cannot look up group \"{g}\": {e}"))),
            },
            None => primary_gid.ok_or_else(|| bad(format!("numeric user {uid} needs a group: use {uid}:GID")))?,
        };
        if uid == 0 || gid == 0 {
            // Running the children as root is what they do without -runas; asking for it explicitly is
            // almost certainly a mistake in a sandboxing option.
            return Err(bad("refusing to run as root (uid or gid 0)".to_string()));
        }
        Ok(RunAs { uid, gid })
    }
}

/// QEMU's `-sandbox` sub-options. QEMU's filter is a deny-list and these remove entries from it; Tessera's
/// filters are allow-lists per process and none of them contains any of these calls, so `deny` (and
/// `children`) is what every child gets anyway and `allow` is accepted with a note ([`SandboxOptions::notes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QemuSubOptions {
    pub obsolete_allow: bool,
    pub elevate_privileges_allow: bool,
    pub spawn_allow: bool,
    pub resource_control_allow: bool,
}

/// How every Tessera child is confined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxOptions {
    /// `-sandbox on|off`. Tessera's default is on (docs/SECURITY.md: QEMU's is off).
    pub enabled: bool,
    pub seccomp: SeccompMode,
    pub landlock: LandlockMode,
    pub runas: Option<RunAs>,
    /// `-chroot DIR`: with the sandbox on, DIR (bind-mounted read-only) replaces the empty root; with it off,
    /// a plain chroot(2) as in QEMU.
    pub chroot: Option<PathBuf>,
    /// The launcher's pid: the child checks that its parent is still this process once its parent-death
    /// signal is armed (otherwise the launcher died before and the signal will never come).
    pub parent_pid: Option<u32>,
    pub qemu: QemuSubOptions,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            enabled: true,
            seccomp: SeccompMode::Kill,
            landlock: LandlockMode::IfAvailable,
            runas: None,
            chroot: None,
            parent_pid: None,
            qemu: QemuSubOptions::default(),
        }
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    // QEMU's boolean spellings (qapi_bool_parse).
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

impl SandboxOptions {
    /// Applies one `-sandbox` argument: `on|off[,obsolete=allow|deny][,elevateprivileges=allow|deny|children]
    /// [,spawn=allow|deny][,resourcecontrol=allow|deny]`, plus Tessera's `seccomp=kill|log` and
    /// `landlock=on|off|auto`.
    pub fn apply_sandbox_arg(&mut self, arg: &str) -> Result<(), PolicyError> {
        let bad = |message: String| PolicyError::SandboxOption { arg: arg.to_string(), message };
        let mut parts = arg.split(',');
        let first = parts.next().unwrap_or("");
        let enable = first.strip_prefix("enable=").unwrap_or(first);
        self.enabled = parse_bool(enable).ok_or_else(|| bad(format!("\"{enable}\" is not on or off")))?;
        // An explicit "on" asks for every layer: Landlock too, unless landlock=auto says otherwise.
        self.landlock = if self.enabled { LandlockMode::Required } else { LandlockMode::Off };
        for part in parts {
            let (key, value) = part.split_once('=').ok_or_else(|| bad(format!("\"{part}\" is not key=value")))?;
            let allow_deny = |extra: bool| match value {
                "allow" => Ok(true),
                "deny" => Ok(false),
                "children" if extra => Ok(false),
                _ => Err(bad(format!("invalid argument for {key}"))),
            };
            match key {
                "obsolete" => self.qemu.obsolete_allow = allow_deny(false)?,
                "elevateprivileges" => self.qemu.elevate_privileges_allow = allow_deny(true)?,
                "spawn" => self.qemu.spawn_allow = allow_deny(false)?,
                "resourcecontrol" => self.qemu.resource_control_allow = allow_deny(false)?,
                "seccomp" => {
                    self.seccomp = match value {
                        "kill" => SeccompMode::Kill,
                        "log" => SeccompMode::Log,
                        _ => return Err(bad("invalid argument for seccomp: kill or log".to_string())),
                    }
                }
                "landlock" => {
                    self.landlock = match value {
                        "on" => LandlockMode::Required,
                        "auto" => LandlockMode::IfAvailable,
                        "off" => LandlockMode::Off,
                        _ => return Err(bad("invalid argument for landlock: on, off or auto".to_string())),
                    }
                }
                _ => return Err(bad(format!("Invalid parameter '{key}'"))),
            }
        }
        Ok(())
    }

    /// `-runas user[:group]`.
    pub fn apply_runas_arg(&mut self, arg: &str) -> Result<(), PolicyError> {
        self.runas = Some(RunAs::parse(arg)?);
        Ok(())
    }

    /// `-chroot dir`: checked here so a typo is reported before any process starts.
    pub fn apply_chroot_arg(&mut self, arg: &str) -> Result<(), PolicyError> {
        let path = PathBuf::from(arg);
        if !path.is_absolute() {
            return Err(PolicyError::Chroot { dir: path, message: "must be an absolute path".to_string() });
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(PolicyError::Chroot { dir: path, message: "is not a directory".to_string() }),
            Err(e) => return Err(PolicyError::Chroot { dir: path, message: e.to_string() }),
        }
        self.chroot = Some(path);
        Ok(())
    }

    /// `-run-with [async-teardown=on|off][,chroot=dir][,user=user[:group]]`: QEMU 8.1's replacement for
    /// `-chroot` (and, from QEMU 9.1, `-runas`). Asynchronous teardown has no meaning for Tessera's processes
    /// (the core's guest RAM goes with it) and `on` is refused rather than ignored.
    pub fn apply_run_with_arg(&mut self, arg: &str) -> Result<(), PolicyError> {
        let bad = |message: String| PolicyError::RunWith { arg: arg.to_string(), message };
        for part in arg.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| bad(format!("\"{part}\" is not key=value")))?;
            match key {
                "chroot" => self.apply_chroot_arg(value)?,
                "user" => self.apply_runas_arg(value)?,
                "async-teardown" => match parse_bool(value) {
                    Some(false) => {}
                    Some(true) => return Err(bad("async-teardown=on is not supported by Tessera".to_string())),
                    None => return Err(bad(format!("\"{value}\" is not on or off"))),
                },
                _ => return Err(bad(format!("Invalid parameter '{key}'"))),
            }
        }
        Ok(())
    }

    /// What the launcher checks before it starts any child: `-runas` needs a root launcher (only root may
    /// switch to another uid; without this check every child would fail the same way).
    pub fn check_launcher(&self) -> Result<(), PolicyError> {
        let uid = nix::unistd::geteuid();
        if self.runas.is_some() && !uid.is_root() {
            return Err(PolicyError::RunAsLauncherNotRoot { uid: uid.as_raw() });
        }
        Ok(())
    }

    /// Lines the launcher should print once at start-up: sub-options that Tessera accepts but that cannot
    /// loosen its filters.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.enabled {
            return notes;
        }
        let q = &self.qemu;
        if q.obsolete_allow {
            notes.push("-sandbox obsolete=allow: no Tessera process makes the obsolete system calls QEMU's list names; they stay denied".to_string());
        }
        if q.elevate_privileges_allow {
            notes.push("-sandbox elevateprivileges=allow: set*uid/set*gid stay denied in every Tessera child (they switch to -runas before their filter is installed)".to_string());
        }
        if q.spawn_allow {
            notes.push("-sandbox spawn=allow: fork and execve stay denied in every Tessera child; the launcher, which starts them, is not filtered".to_string());
        }
        if q.resource_control_allow {
            notes.push("-sandbox resourcecontrol=allow: no Tessera child sets affinity or scheduling priority; those calls stay denied".to_string());
        }
        notes
    }

    /// The value of [`SANDBOX_ENV`] for a child: `v1,on,seccomp=kill,landlock=auto[,runas=U:G][,parent=PID]
    /// [,chroot=HEX]` (the chroot path is hex-encoded: paths may contain commas).
    pub fn to_env_value(&self) -> String {
        let mut s = String::from("v1");
        s.push_str(if self.enabled { ",on" } else { ",off" });
        s.push_str(match self.seccomp {
            SeccompMode::Kill => ",seccomp=kill",
            SeccompMode::Log => ",seccomp=log",
            SeccompMode::Off => ",seccomp=off",
        });
        s.push_str(match self.landlock {
            LandlockMode::Required => ",landlock=on",
            LandlockMode::IfAvailable => ",landlock=auto",
            LandlockMode::Off => ",landlock=off",
        });
        if let Some(r) = self.runas {
            s.push_str(&format!(",runas={}:{}", r.uid, r.gid));
        }
        if let Some(p) = self.parent_pid {
            s.push_str(&format!(",parent={p}"));
        }
        if let Some(dir) = &self.chroot {
            s.push_str(",chroot=");
            for b in dir.as_os_str().as_bytes() {
                s.push_str(&format!("{b:02x}"));
            }
        }
        s
    }

    /// The environment variable for a child started by this process (the launcher): [`SANDBOX_ENV`] and the
    /// options with this process as the parent the child checks for.
    pub fn child_env(&self) -> (&'static str, String) {
        let mut o = self.clone();
        o.parent_pid = Some(std::process::id());
        (SANDBOX_ENV, o.to_env_value())
    }

    /// Parses [`SandboxOptions::to_env_value`]'s output.
    pub fn from_env_value(value: &str) -> Result<SandboxOptions, PolicyError> {
        let bad = |message: &str| PolicyError::SandboxEnv { value: value.to_string(), message: message.to_string() };
        let mut parts = value.split(',');
        if parts.next() != Some("v1") {
            return Err(bad("not version v1"));
        }
        let mut o = SandboxOptions {
            enabled: match parts.next() {
                Some("on") => true,
                Some("off") => false,
                _ => return Err(bad("second field must be on or off")),
            },
            ..SandboxOptions::default()
        };
        for part in parts {
            let (k, v) = part.split_once('=').ok_or_else(|| bad("field without ="))?;
            match (k, v) {
                ("seccomp", "kill") => o.seccomp = SeccompMode::Kill,
                ("seccomp", "log") => o.seccomp = SeccompMode::Log,
                ("seccomp", "off") => o.seccomp = SeccompMode::Off,
                ("landlock", "on") => o.landlock = LandlockMode::Required,
                ("landlock", "auto") => o.landlock = LandlockMode::IfAvailable,
                ("landlock", "off") => o.landlock = LandlockMode::Off,
                ("runas", v) => {
                    let (u, g) = v.split_once(':').ok_or_else(|| bad("runas must be uid:gid"))?;
                    let uid = u.parse().map_err(|_| bad("runas uid is not a number"))?;
                    let gid = g.parse().map_err(|_| bad("runas gid is not a number"))?;
                    o.runas = Some(RunAs { uid, gid });
                }
                ("parent", v) => o.parent_pid = Some(v.parse().map_err(|_| bad("parent is not a pid"))?),
                ("chroot", v) => {
                    if v.len() % 2 != 0 || v.is_empty() {
                        return Err(bad("chroot is not hex"));
                    }
                    let bytes: Result<Vec<u8>, _> =
                        (0..v.len()).step_by(2).map(|i| u8::from_str_radix(&v[i..i + 2], 16)).collect();
                    let bytes = bytes.map_err(|_| bad("chroot is not hex"))?;
                    o.chroot = Some(PathBuf::from(OsStr::from_bytes(&bytes)));
                }
                _ => return Err(bad("unknown field")),
            }
        }
        Ok(o)
    }
}
