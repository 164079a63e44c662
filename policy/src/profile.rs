//! Profiles as data: the TOML files under `policy/profiles/`, embedded at build time, parsed and composed.
//!
//! A process profile is `base.toml`'s groups, then the groups of every fragment the kind's file names in
//! `include`, then the kind's own groups; all other settings come from the kind's file alone.

use serde::Deserialize;

use crate::syscalls;
use crate::PolicyError;

/// The kinds of Tessera process that run sandboxed. The launcher itself is not one: it is trusted, opens host
/// resources and starts the others (docs/SECURITY.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProcessKind {
    /// `tessera-core`: guest RAM, vCPUs, device front halves.
    Core,
    /// `tessera-chardev`: the host side of serial ports and character devices.
    Chardev,
    /// `tessera-blk`: vhost-user-blk.
    Blk,
    /// `tessera-net` over a tap descriptor the launcher passes (`--tap-fd`): no network of its own.
    Net,
    /// `tessera-net` with user-mode networking (`--user`, libslirp): host sockets in the host's network
    /// namespace. Same binary as [`ProcessKind::Net`], its own profile (`net-user.toml`).
    NetUser,
}

impl ProcessKind {
    pub const ALL: [ProcessKind; 5] =
        [ProcessKind::Core, ProcessKind::Chardev, ProcessKind::Blk, ProcessKind::Net, ProcessKind::NetUser];

    pub fn name(self) -> &'static str {
        match self {
            ProcessKind::Core => "core",
            ProcessKind::Chardev => "chardev",
            ProcessKind::Blk => "blk",
            ProcessKind::Net => "net",
            ProcessKind::NetUser => "net-user",
        }
    }

    /// The program this kind of process is (`tessera-<program>`): both net profiles are tessera-net's.
    pub fn program(self) -> &'static str {
        match self {
            ProcessKind::NetUser => "net",
            other => other.name(),
        }
    }

    pub fn from_name(name: &str) -> Option<ProcessKind> {
        ProcessKind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn source(self) -> &'static str {
        match self {
            ProcessKind::Core => include_str!("../profiles/core.toml"),
            ProcessKind::Chardev => include_str!("../profiles/chardev.toml"),
            ProcessKind::Blk => include_str!("../profiles/blk.toml"),
            ProcessKind::Net => include_str!("../profiles/net.toml"),
            ProcessKind::NetUser => include_str!("../profiles/net-user.toml"),
        }
    }
}

/// The program's name (`tessera-{kind}` in messages), which for tessera-net's two profiles is `net`.
impl std::fmt::Display for ProcessKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.program())
    }
}

const BASE: (&str, &str) = ("base", include_str!("../profiles/base.toml"));
const FRAGMENTS: [(&str, &str); 2] = [
    ("threads", include_str!("../profiles/threads.toml")),
    ("vhost-user-backend", include_str!("../profiles/vhost-user-backend.toml")),
];

/// A value compared with a syscall argument: a number, or `"$pid"` (the process's own pid, known only when the
/// filter is built inside the process).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ArgValue {
    Number(u64),
    Symbol(String),
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ArgOp {
    #[default]
    Eq,
    MaskedEq,
}

/// One more condition on the same rule (all conditions of a rule must hold).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraCondition {
    pub arg: u8,
    #[serde(default)]
    pub op: ArgOp,
    #[serde(default)]
    pub mask: Option<u64>,
    pub value: ArgValue,
}

/// A syscall allowed only when its arguments match. Several rules for one syscall are alternatives.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgRule {
    pub syscall: String,
    pub arg: u8,
    #[serde(default)]
    pub op: ArgOp,
    #[serde(default)]
    pub mask: Option<u64>,
    pub value: ArgValue,
    /// What the value means (`KVM_RUN`, `AF_UNIX`): documentation, checked by tests where it can be.
    pub name: String,
    #[serde(default)]
    pub and: Vec<ExtraCondition>,
}

/// Syscalls allowed together, with who needs them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowGroup {
    pub name: String,
    pub why: String,
    #[serde(default)]
    pub syscalls: Vec<String>,
    #[serde(default)]
    pub rules: Vec<ArgRule>,
}

/// Syscalls that fail with `errno` instead of being allowed or killing the process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrnoGroup {
    pub name: String,
    pub why: String,
    pub errno: String,
    pub syscalls: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespaces {
    /// A user namespace when the process starts unprivileged (a root launcher's child already holds the
    /// capabilities the set-up needs, and drops them, and its uid with `-runas`).
    pub user: bool,
    pub mount: bool,
    pub ipc: bool,
    pub uts: bool,
    pub net: bool,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RootKind {
    /// An empty read-only tmpfs becomes the root.
    Empty,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filesystem {
    pub root: RootKind,
    /// Host files bind-mounted read-only into the empty root at the same path (and readable through
    /// Landlock, nothing else): for what a library reads by a fixed path at run time and cannot be given a
    /// descriptor instead (libslirp's /etc/resolv.conf). A file missing on the host is left out, with a
    /// warning in the report. Not used with `-chroot DIR` (that directory is the user's own view).
    #[serde(default)]
    pub read_only: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LandlockFs {
    /// Every filesystem access right handled, no rule: nothing may be opened by path.
    DenyAll,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LandlockTcp {
    Deny,
    Allow,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LandlockScope {
    Signal,
    AbstractUnixSocket,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockRules {
    pub filesystem: LandlockFs,
    pub tcp: LandlockTcp,
    pub scope: Vec<LandlockScope>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    pub nofile: Option<u64>,
    pub core: Option<u64>,
    pub nproc: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    pub keep: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    kind: String,
    include: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KindFile {
    profile: Header,
    namespaces: Namespaces,
    filesystem: Filesystem,
    landlock: LandlockRules,
    rlimits: Rlimits,
    capabilities: Capabilities,
    #[serde(default)]
    allow: Vec<AllowGroup>,
    #[serde(default)]
    errno: Vec<ErrnoGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    #[serde(default)]
    allow: Vec<AllowGroup>,
    #[serde(default)]
    errno: Vec<ErrnoGroup>,
}

/// A composed profile: everything the sandbox applies to one kind of process.
#[derive(Clone, Debug)]
pub struct Profile {
    pub kind: ProcessKind,
    /// Which file each group came from, in composition order.
    pub allow: Vec<(&'static str, AllowGroup)>,
    pub errno: Vec<(&'static str, ErrnoGroup)>,
    pub namespaces: Namespaces,
    pub filesystem: Filesystem,
    pub landlock: LandlockRules,
    pub rlimits: Rlimits,
    pub capabilities: Capabilities,
}

fn parse<T: for<'de> Deserialize<'de>>(file: &str, text: &str) -> Result<T, PolicyError> {
    toml::from_str(text).map_err(|e| PolicyError::ProfileSyntax { file: file.to_string(), message: e.to_string() })
}

impl Profile {
    /// The composed, checked profile of `kind`.
    pub fn load(kind: ProcessKind) -> Result<Profile, PolicyError> {
        let file_name = kind.name();
        let own: KindFile = parse(file_name, kind.source())?;
        if own.profile.kind != kind.name() {
            return Err(PolicyError::ProfileInvalid {
                file: file_name.to_string(),
                message: format!("declares kind \"{}\", expected \"{}\"", own.profile.kind, kind.name()),
            });
        }
        let base: GroupFile = parse(BASE.0, BASE.1)?;
        let mut allow: Vec<(&'static str, AllowGroup)> = base.allow.into_iter().map(|g| (BASE.0, g)).collect();
        let mut errno: Vec<(&'static str, ErrnoGroup)> = base.errno.into_iter().map(|g| (BASE.0, g)).collect();
        for inc in &own.profile.include {
            let (name, text) = FRAGMENTS.iter().find(|(n, _)| n == inc).ok_or_else(|| PolicyError::ProfileInvalid {
                file: file_name.to_string(),
                message: format!("includes \"{inc}\", which is not a fragment (known: threads, vhost-user-backend)"),
            })?;
            let frag: GroupFile = parse(name, text)?;
            allow.extend(frag.allow.into_iter().map(|g| (*name, g)));
            errno.extend(frag.errno.into_iter().map(|g| (*name, g)));
        }
        // A syscall the kind file itself allows is taken out of base.toml's errno groups: base answers path
        // lookups with ENOENT for every process, a kind with files in its root (`filesystem.read_only`) must
        // open them. Only base's answers give way, and only to the kind's own groups.
        let own_allowed: std::collections::BTreeSet<String> = own
            .allow
            .iter()
            .flat_map(|g| g.syscalls.iter().cloned().chain(g.rules.iter().map(|r| r.syscall.clone())))
            .collect();
        for (from, g) in errno.iter_mut() {
            if *from == BASE.0 {
                g.syscalls.retain(|s| !own_allowed.contains(s));
            }
        }
        errno.retain(|(_, g)| !g.syscalls.is_empty());
        allow.extend(own.allow.into_iter().map(|g| (file_name, g)));
        errno.extend(own.errno.into_iter().map(|g| (file_name, g)));
        let profile = Profile {
            kind,
            allow,
            errno,
            namespaces: own.namespaces,
            filesystem: own.filesystem,
            landlock: own.landlock,
            rlimits: own.rlimits,
            capabilities: own.capabilities,
        };
        profile.check(file_name)?;
        Ok(profile)
    }

    /// Consistency checks that the TOML grammar cannot express.
    fn check(&self, file: &str) -> Result<(), PolicyError> {
        let invalid = |message: String| PolicyError::ProfileInvalid { file: file.to_string(), message };
        let mut unconditional = std::collections::BTreeSet::new();
        let mut conditional = std::collections::BTreeSet::new();
        for (from, g) in &self.allow {
            if g.why.trim().is_empty() {
                return Err(invalid(format!("group \"{}\" (from {from}) does not say who needs it", g.name)));
            }
            if g.syscalls.is_empty() && g.rules.is_empty() {
                return Err(invalid(format!("group \"{}\" (from {from}) allows nothing", g.name)));
            }
            for s in &g.syscalls {
                syscalls::number(s)
                    .ok_or_else(|| invalid(format!("unknown syscall \"{s}\" in group \"{}\"", g.name)))?;
                if !unconditional.insert(s.as_str()) {
                    return Err(invalid(format!("syscall \"{s}\" is allowed twice (group \"{}\")", g.name)));
                }
            }
            for r in &g.rules {
                syscalls::number(&r.syscall)
                    .ok_or_else(|| invalid(format!("unknown syscall \"{}\" in group \"{}\"", r.syscall, g.name)))?;
                conditional.insert(r.syscall.as_str());
                let conds = std::iter::once((r.arg, r.op, r.mask, &r.value))
                    .chain(r.and.iter().map(|c| (c.arg, c.op, c.mask, &c.value)));
                for (arg, op, mask, value) in conds {
                    if arg > 5 {
                        return Err(invalid(format!("rule \"{}\" compares argument {arg}: syscalls have 6", r.name)));
                    }
                    if (op == ArgOp::MaskedEq) != mask.is_some() {
                        return Err(invalid(format!("rule \"{}\": a mask goes with op = \"masked_eq\" only", r.name)));
                    }
                    if let ArgValue::Symbol(s) = value {
                        if s != "$pid" {
                            return Err(invalid(format!("rule \"{}\": unknown symbolic value \"{s}\"", r.name)));
                        }
                    }
                }
            }
        }
        if let Some(both) = unconditional.intersection(&conditional).next() {
            return Err(invalid(format!("syscall \"{both}\" is allowed both always and under conditions")));
        }
        for (from, g) in &self.errno {
            if g.why.trim().is_empty() {
                return Err(invalid(format!("errno group \"{}\" (from {from}) does not say why", g.name)));
            }
            syscalls::errno_number(&g.errno)
                .ok_or_else(|| invalid(format!("unknown errno \"{}\" in group \"{}\"", g.errno, g.name)))?;
            for s in &g.syscalls {
                syscalls::number(s)
                    .ok_or_else(|| invalid(format!("unknown syscall \"{s}\" in group \"{}\"", g.name)))?;
                if unconditional.contains(s.as_str()) || conditional.contains(s.as_str()) {
                    return Err(invalid(format!("syscall \"{s}\" is both allowed and answered with {}", g.errno)));
                }
            }
        }
        for path in &self.filesystem.read_only {
            let p = std::path::Path::new(path);
            let plain = p.components().skip(1).all(|c| matches!(c, std::path::Component::Normal(_)));
            if !p.is_absolute() || !plain || p.components().count() < 2 {
                return Err(invalid(format!(
                    "filesystem.read_only: \"{path}\" is not an absolute path of plain names (no \"..\", not \"/\")"
                )));
            }
        }
        if !self.capabilities.keep.is_empty() {
            return Err(invalid(format!(
                "keeps capabilities {:?}: keeping capabilities is not implemented (every Tessera process drops all)",
                self.capabilities.keep
            )));
        }
        Ok(())
    }

    /// Every syscall this profile lets through in some form (allowed, conditionally allowed), sorted.
    pub fn allowed_syscalls(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .allow
            .iter()
            .flat_map(|(_, g)| g.syscalls.iter().map(String::as_str).chain(g.rules.iter().map(|r| r.syscall.as_str())))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Whether the profile allows `syscall` at all (with or without argument conditions).
    pub fn allows(&self, syscall: &str) -> bool {
        self.allowed_syscalls().contains(&syscall)
    }
}
