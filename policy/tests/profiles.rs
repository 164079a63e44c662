//! The profiles' data and the option parsers, checked against independent sources: kvm-bindings' struct sizes
//! for the KVM ioctl numbers, an strace of the real tessera-blk for its allow-list, QEMU's option grammar.
//! (That the filters confine a process is proven from outside by tests/sandbox_probe.rs.)

use std::collections::BTreeSet;

use tessera_policy::{
    build_seccomp_filters, syscalls, ArgValue, LandlockMode, ProcessKind, Profile, RunAs, SandboxOptions, SeccompMode,
};

#[test]
fn every_profile_loads_and_every_group_says_who_needs_it() {
    for kind in ProcessKind::ALL {
        let p = Profile::load(kind).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(p.kind, kind);
        for (from, g) in &p.allow {
            assert!(g.why.len() > 20, "{kind}: group {} from {from} needs a real explanation", g.name);
        }
        assert!(p.capabilities.keep.is_empty());
        assert!(p.namespaces.mount && p.namespaces.user && p.namespaces.ipc && p.namespaces.uts);
        assert_eq!(p.rlimits.core, Some(0), "{kind}: a core dump would hold guest data");
    }
}

/// Escapes that no Tessera child may have in any form.
#[test]
fn no_profile_allows_an_escape() {
    let never = [
        "execve",
        "execveat",
        "fork",
        "vfork",
        "ptrace",
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "socket",
        "connect",
        "bind",
        "listen",
        "process_vm_readv",
        "process_vm_writev",
        "setuid",
        "setgid",
        "setresuid",
        "setresgid",
        "setgroups",
        "capset",
        "seccomp",
        "bpf",
        "perf_event_open",
        "keyctl",
        "add_key",
        "request_key",
        "userfaultfd",
        "io_uring_setup",
        "kexec_load",
        "init_module",
        "finit_module",
        "delete_module",
        "reboot",
        "swapon",
        "kill",
        "tkill",
        "open",
        "openat",
        "openat2",
        "clone3",
        "landlock_create_ruleset",
    ];
    // tessera-net's relay (both net profiles) binds, listens and connects on AF_UNIX sockets it creates after
    // it is confined, and user-mode networking needs host sockets: socket is allowed there by family only.
    let net_families = |kind: ProcessKind| -> &'static [u64] {
        match kind {
            ProcessKind::Net => &[1],
            ProcessKind::NetUser => &[1, 2, 10],
            _ => &[],
        }
    };
    // Exceptions by kind, each with its other layer: net-user opens the two files bound into its otherwise
    // empty root (filesystem.read_only; Landlock lets it read those only); blk's io_uring rings are created
    // disabled and restricted to the data path's opcodes before they are enabled (backends/blk/src/uring.rs).
    let exempt = |kind: ProcessKind, s: &str| -> bool {
        match kind {
            ProcessKind::NetUser => s == "openat",
            ProcessKind::Blk => s == "io_uring_setup",
            _ => false,
        }
    };
    for kind in ProcessKind::ALL {
        let p = Profile::load(kind).unwrap();
        let families = net_families(kind);
        for s in never {
            if !families.is_empty() && ["socket", "connect", "bind", "listen"].contains(&s) {
                continue;
            }
            if exempt(kind, s) {
                continue;
            }
            assert!(!p.allows(s), "{kind} allows {s}");
        }
        let socket_rules: Vec<_> =
            p.allow.iter().flat_map(|(_, g)| g.rules.iter()).filter(|r| r.syscall == "socket").collect();
        assert!(
            !p.allow.iter().any(|(_, g)| g.syscalls.iter().any(|s| s == "socket")),
            "{kind}: socket only by family"
        );
        let allowed: Vec<u64> = socket_rules
            .iter()
            .map(|r| {
                assert!(r.arg == 0 && r.and.is_empty(), "{kind}: socket rules compare the family");
                match r.value {
                    ArgValue::Number(n) => n,
                    _ => panic!("{kind}: socket family must be a number"),
                }
            })
            .collect();
        assert_eq!(allowed, families, "{kind}: socket families");
    }
}

#[test]
fn threads_only_as_threads() {
    for kind in ProcessKind::ALL {
        let p = Profile::load(kind).unwrap();
        let clone_rules: Vec<_> =
            p.allow.iter().flat_map(|(_, g)| g.rules.iter()).filter(|r| r.syscall == "clone").collect();
        // Every kind starts threads (chardev: its writer threads, seen under strace).
        assert!(!clone_rules.is_empty(), "{kind} starts threads");
        for r in clone_rules {
            assert_eq!((r.arg, r.mask, &r.value), (0, Some(0x10000), &ArgValue::Number(0x10000)), "CLONE_THREAD");
        }
        assert!(p.errno.iter().any(|(_, g)| g.errno == "ENOSYS" && g.syscalls.iter().any(|s| s == "clone3")));
        // RLIMIT_NPROC counts threads: a limit would break them.
        assert_eq!(p.rlimits.nproc, None, "{kind}");
    }
}

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    // include/uapi/asm-generic/ioctl.h: dir in bits 30-31, size in 16-29, type 0xAE (KVMIO) in 8-15, nr in 0-7.
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}

#[test]
fn kvm_ioctl_numbers_match_kvm_bindings() {
    use kvm_bindings::*;
    use std::mem::size_of;
    let rw = IOC_READ | IOC_WRITE;
    let expected: &[(&str, u64)] = &[
        ("KVM_GET_API_VERSION", ioc(IOC_NONE, 0x00, 0)),
        ("KVM_CREATE_VM", ioc(IOC_NONE, 0x01, 0)),
        ("KVM_GET_MSR_INDEX_LIST", ioc(rw, 0x02, size_of::<kvm_msr_list>())),
        ("KVM_CHECK_EXTENSION", ioc(IOC_NONE, 0x03, 0)),
        ("KVM_GET_VCPU_MMAP_SIZE", ioc(IOC_NONE, 0x04, 0)),
        ("KVM_GET_SUPPORTED_CPUID", ioc(rw, 0x05, size_of::<kvm_cpuid2>())),
        ("KVM_GET_EMULATED_CPUID", ioc(rw, 0x09, size_of::<kvm_cpuid2>())),
        ("KVM_GET_MSR_FEATURE_INDEX_LIST", ioc(rw, 0x0a, size_of::<kvm_msr_list>())),
        ("KVM_CREATE_VCPU", ioc(IOC_NONE, 0x41, 0)),
        ("KVM_SET_USER_MEMORY_REGION", ioc(IOC_WRITE, 0x46, size_of::<kvm_userspace_memory_region>())),
        ("KVM_SET_TSS_ADDR", ioc(IOC_NONE, 0x47, 0)),
        ("KVM_SET_IDENTITY_MAP_ADDR", ioc(IOC_WRITE, 0x48, size_of::<u64>())),
        ("KVM_CREATE_IRQCHIP", ioc(IOC_NONE, 0x60, 0)),
        ("KVM_IRQ_LINE", ioc(IOC_WRITE, 0x61, size_of::<kvm_irq_level>())),
        ("KVM_GET_IRQCHIP", ioc(rw, 0x62, size_of::<kvm_irqchip>())),
        // Declared _IOR in linux/kvm.h although it writes: the number is what counts.
        ("KVM_SET_IRQCHIP", ioc(IOC_READ, 0x63, size_of::<kvm_irqchip>())),
        ("KVM_IRQ_LINE_STATUS", ioc(rw, 0x67, size_of::<kvm_irq_level>())),
        ("KVM_SET_GSI_ROUTING", ioc(IOC_WRITE, 0x6a, size_of::<kvm_irq_routing>())),
        ("KVM_IRQFD", ioc(IOC_WRITE, 0x76, size_of::<kvm_irqfd>())),
        ("KVM_CREATE_PIT2", ioc(IOC_WRITE, 0x77, size_of::<kvm_pit_config>())),
        ("KVM_IOEVENTFD", ioc(IOC_WRITE, 0x79, size_of::<kvm_ioeventfd>())),
        ("KVM_SET_CLOCK", ioc(IOC_WRITE, 0x7b, size_of::<kvm_clock_data>())),
        ("KVM_GET_CLOCK", ioc(IOC_READ, 0x7c, size_of::<kvm_clock_data>())),
        ("KVM_GET_PIT2", ioc(IOC_READ, 0x9f, size_of::<kvm_pit_state2>())),
        ("KVM_SET_PIT2", ioc(IOC_WRITE, 0xa0, size_of::<kvm_pit_state2>())),
        ("KVM_ENABLE_CAP", ioc(IOC_WRITE, 0xa3, size_of::<kvm_enable_cap>())),
        ("KVM_SIGNAL_MSI", ioc(IOC_WRITE, 0xa5, size_of::<kvm_msi>())),
        ("KVM_RUN", ioc(IOC_NONE, 0x80, 0)),
        ("KVM_GET_REGS", ioc(IOC_READ, 0x81, size_of::<kvm_regs>())),
        ("KVM_SET_REGS", ioc(IOC_WRITE, 0x82, size_of::<kvm_regs>())),
        ("KVM_GET_SREGS", ioc(IOC_READ, 0x83, size_of::<kvm_sregs>())),
        ("KVM_SET_SREGS", ioc(IOC_WRITE, 0x84, size_of::<kvm_sregs>())),
        ("KVM_TRANSLATE", ioc(rw, 0x85, size_of::<kvm_translation>())),
        ("KVM_INTERRUPT", ioc(IOC_WRITE, 0x86, size_of::<kvm_interrupt>())),
        ("KVM_GET_MSRS", ioc(rw, 0x88, size_of::<kvm_msrs>())),
        ("KVM_SET_MSRS", ioc(IOC_WRITE, 0x89, size_of::<kvm_msrs>())),
        ("KVM_SET_SIGNAL_MASK", ioc(IOC_WRITE, 0x8b, size_of::<kvm_signal_mask>())),
        ("KVM_GET_FPU", ioc(IOC_READ, 0x8c, size_of::<kvm_fpu>())),
        ("KVM_SET_FPU", ioc(IOC_WRITE, 0x8d, size_of::<kvm_fpu>())),
        ("KVM_GET_LAPIC", ioc(IOC_READ, 0x8e, size_of::<kvm_lapic_state>())),
        ("KVM_SET_LAPIC", ioc(IOC_WRITE, 0x8f, size_of::<kvm_lapic_state>())),
        ("KVM_SET_CPUID2", ioc(IOC_WRITE, 0x90, size_of::<kvm_cpuid2>())),
        ("KVM_GET_CPUID2", ioc(rw, 0x91, size_of::<kvm_cpuid2>())),
        ("KVM_GET_MP_STATE", ioc(IOC_READ, 0x98, size_of::<kvm_mp_state>())),
        ("KVM_SET_MP_STATE", ioc(IOC_WRITE, 0x99, size_of::<kvm_mp_state>())),
        ("KVM_SET_GUEST_DEBUG", ioc(IOC_WRITE, 0x9b, size_of::<kvm_guest_debug>())),
        ("KVM_GET_VCPU_EVENTS", ioc(IOC_READ, 0x9f, size_of::<kvm_vcpu_events>())),
        ("KVM_SET_VCPU_EVENTS", ioc(IOC_WRITE, 0xa0, size_of::<kvm_vcpu_events>())),
        ("KVM_GET_DEBUGREGS", ioc(IOC_READ, 0xa1, size_of::<kvm_debugregs>())),
        ("KVM_SET_DEBUGREGS", ioc(IOC_WRITE, 0xa2, size_of::<kvm_debugregs>())),
        ("KVM_SET_TSC_KHZ", ioc(IOC_NONE, 0xa2, 0)),
        ("KVM_GET_TSC_KHZ", ioc(IOC_NONE, 0xa3, 0)),
        ("KVM_GET_XSAVE", ioc(IOC_READ, 0xa4, size_of::<kvm_xsave>())),
        ("KVM_SET_XSAVE", ioc(IOC_WRITE, 0xa5, size_of::<kvm_xsave>())),
        ("KVM_GET_XCRS", ioc(IOC_READ, 0xa6, size_of::<kvm_xcrs>())),
        ("KVM_SET_XCRS", ioc(IOC_WRITE, 0xa7, size_of::<kvm_xcrs>())),
        ("KVM_KVMCLOCK_CTRL", ioc(IOC_NONE, 0xad, 0)),
        ("KVM_GET_XSAVE2", ioc(IOC_READ, 0xcf, size_of::<kvm_xsave>())),
    ];
    let core = Profile::load(ProcessKind::Core).unwrap();
    let mut seen = BTreeSet::new();
    for (_, g) in &core.allow {
        for r in g.rules.iter().filter(|r| r.name.starts_with("KVM_")) {
            let want = expected
                .iter()
                .find(|(n, _)| *n == r.name)
                .unwrap_or_else(|| panic!("{} is not in this test's table: add it", r.name))
                .1;
            assert_eq!(r.value, ArgValue::Number(want), "{}: profile has {:?}, expected {want:#x}", r.name, r.value);
            assert_eq!((r.syscall.as_str(), r.arg), ("ioctl", 1));
            seen.insert(r.name.as_str());
        }
    }
    assert_eq!(seen.len(), expected.len(), "every KVM ioctl of the table is in the core profile");
}

/// The syscalls the real binaries made under strace must all be answered by their profile (allowed, or
/// failed with an errno glibc copes with), except those made before the sandbox is entered.
#[test]
fn profiles_cover_what_the_real_binaries_do_under_strace() {
    for (kind, observed) in [
        (ProcessKind::Blk, include_str!("observed/blk.txt")),
        (ProcessKind::Core, include_str!("observed/core.txt")),
        (ProcessKind::NetUser, include_str!("observed/net-user.txt")),
    ] {
        let p = Profile::load(kind).unwrap();
        let errno: BTreeSet<&str> = p.errno.iter().flat_map(|(_, g)| g.syscalls.iter().map(String::as_str)).collect();
        let mut checked = 0;
        for line in observed.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            if line.ends_with("start-up") {
                continue;
            }
            let s = line.trim();
            assert!(syscalls::number(s).is_some(), "{s} is not in the syscall table");
            assert!(p.allows(s) || errno.contains(s), "tessera-{kind} makes {s} and its profile would kill it");
            checked += 1;
        }
        assert!(checked > 30, "{kind}: the observed list was read ({checked} entries)");
    }
}

#[test]
fn filters_build_for_every_kind_in_both_modes() {
    for kind in ProcessKind::ALL {
        let p = Profile::load(kind).unwrap();
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            let f = build_seccomp_filters(&p, mode, 4242).unwrap_or_else(|e| panic!("{kind}: {e}"));
            // One program per distinct errno (ENOENT for paths; ENOSYS for clone3 where threads are used), then
            // the allow-list.
            let errnos: BTreeSet<&str> = p.errno.iter().map(|(_, g)| g.errno.as_str()).collect();
            assert_eq!(f.programs.len(), errnos.len() + 1, "{kind}");
            assert!(f.programs.iter().all(|prog| !prog.is_empty() && prog.len() < 4096), "{kind}: BPF size");
        }
    }
}

#[test]
fn sandbox_option_follows_qemu_grammar() {
    let mut o = SandboxOptions::default();
    assert!(o.enabled, "Tessera sandboxes by default");
    assert_eq!(o.landlock, LandlockMode::IfAvailable);
    o.apply_sandbox_arg("off").unwrap();
    assert!(!o.enabled);
    o.apply_sandbox_arg("on,obsolete=deny,elevateprivileges=children,spawn=deny,resourcecontrol=deny").unwrap();
    assert!(o.enabled);
    assert_eq!(o.landlock, LandlockMode::Required, "an explicit -sandbox on asks for every layer");
    assert!(o.notes().is_empty());
    o.apply_sandbox_arg("enable=on,spawn=allow,obsolete=allow").unwrap();
    let notes = o.notes();
    assert_eq!(notes.len(), 2);
    assert!(notes.iter().any(|n| n.contains("spawn=allow")), "{notes:?}");
    o.apply_sandbox_arg("on,seccomp=log,landlock=auto").unwrap();
    assert_eq!((o.seccomp, o.landlock), (SeccompMode::Log, LandlockMode::IfAvailable));
    for (bad, says) in [
        ("maybe", "\"maybe\" is not on or off"),
        ("on,spawn=yes", "invalid argument for spawn"),
        ("on,elevateprivileges=children2", "invalid argument for elevateprivileges"),
        ("on,foo=bar", "Invalid parameter 'foo'"),
        ("on,spawn", "\"spawn\" is not key=value"),
        ("on,seccomp=off", "invalid argument for seccomp"),
    ] {
        let e = SandboxOptions::default().apply_sandbox_arg(bad).unwrap_err().to_string();
        assert!(e.starts_with(&format!("-sandbox {bad}: ")) && e.contains(says), "{bad}: {e}");
    }
}

#[test]
fn runas_takes_names_numbers_and_groups() {
    assert_eq!(RunAs::parse("nobody").unwrap(), RunAs { uid: 65534, gid: 65534 });
    assert_eq!(RunAs::parse("nobody:nogroup").unwrap(), RunAs { uid: 65534, gid: 65534 });
    assert_eq!(RunAs::parse("65534:100").unwrap(), RunAs { uid: 65534, gid: 100 });
    assert_eq!(RunAs::parse("nobody:users").unwrap(), RunAs { uid: 65534, gid: 100 });
    for (bad, says) in [
        ("tessera-no-such-user", "does not exist"),
        ("nobody:tessera-no-such-group", "does not exist"),
        ("nobody:", "expected user[:group]"),
        ("4000", "needs a group"),
        ("root", "refusing to run as root"),
        ("nobody:0", "refusing to run as root"),
    ] {
        let e = RunAs::parse(bad).unwrap_err().to_string();
        assert!(e.starts_with(&format!("-runas {bad}: ")) && e.contains(says), "{bad}: {e}");
    }
}

#[test]
fn chroot_must_be_an_existing_absolute_directory() {
    let mut o = SandboxOptions::default();
    o.apply_chroot_arg("/").unwrap();
    assert!(o.apply_chroot_arg("relative").unwrap_err().to_string().contains("absolute"));
    assert!(o
        .apply_chroot_arg("/tessera-no-such-dir")
        .unwrap_err()
        .to_string()
        .contains("-chroot /tessera-no-such-dir"));
    assert!(o.apply_chroot_arg("/etc/passwd").unwrap_err().to_string().contains("not a directory"));
}

#[test]
fn options_cross_the_environment_unchanged() {
    let mut o = SandboxOptions::default();
    o.apply_sandbox_arg("on,seccomp=log").unwrap();
    o.runas = Some(RunAs { uid: 1000, gid: 1001 });
    o.chroot = Some("/var/lib/tessera/a,b=c".into());
    o.parent_pid = Some(1234);
    let v = o.to_env_value();
    let back = SandboxOptions::from_env_value(&v).unwrap();
    assert_eq!(back.enabled, o.enabled);
    assert_eq!(back.seccomp, o.seccomp);
    assert_eq!(back.landlock, o.landlock);
    assert_eq!(back.runas, o.runas);
    assert_eq!(back.chroot, o.chroot);
    assert_eq!(back.parent_pid, o.parent_pid);
    for bad in ["", "v2,on", "v1,maybe", "v1,on,runas=x:1", "v1,on,chroot=zz", "v1,on,what=1"] {
        assert!(SandboxOptions::from_env_value(bad).is_err(), "{bad}");
    }
}

/// Every other named value in the profiles, against the libc crate's constants (or the kernel's ioctl
/// encoding where libc has none).
#[test]
fn named_rule_values_match_libc() {
    let v = |x: i64| x as u64;
    let table: &[(&str, u64, Option<u64>)] = &[
        // (name, value, mask)
        ("FIONBIO", v(libc::FIONBIO as i64), None),
        ("FIOCLEX", v(libc::FIOCLEX as i64), None),
        ("TCGETS", v(libc::TCGETS as i64), None),
        ("TCSETS", v(libc::TCSETS as i64), None),
        ("TCSETSW", v(libc::TCSETSW as i64), None),
        ("TCSETSF", v(libc::TCSETSF as i64), None),
        ("TIOCGWINSZ", v(libc::TIOCGWINSZ as i64), None),
        ("PR_SET_NAME", v(libc::PR_SET_NAME.into()), None),
        ("PR_SET_PDEATHSIG", v(libc::PR_SET_PDEATHSIG.into()), None),
        ("AF_UNIX", v(libc::AF_UNIX.into()), None),
        ("AF_INET", v(libc::AF_INET.into()), None),
        ("AF_INET6", v(libc::AF_INET6.into()), None),
        ("FIONREAD", v(libc::FIONREAD as i64), None),
        ("MFD_CLOEXEC", v(libc::MFD_CLOEXEC.into()), None),
        ("CLONE_THREAD", v(libc::CLONE_THREAD.into()), Some(v(libc::CLONE_THREAD.into()))),
        ("prot without PROT_EXEC", 0, Some(v(libc::PROT_EXEC.into()))),
        ("IPPROTO_TCP, TCP_NODELAY", v(libc::IPPROTO_TCP.into()), None),
        ("SOL_SOCKET, SO_RCVTIMEO", v(libc::SOL_SOCKET.into()), None),
        ("SOL_SOCKET, SO_SNDTIMEO", v(libc::SOL_SOCKET.into()), None),
        ("new_limit NULL (read only)", 0, None),
        ("own process", u64::MAX, None), // "$pid", checked below
        ("F_GETFD", v(libc::F_GETFD.into()), None),
        ("F_SETFD", v(libc::F_SETFD.into()), None),
        ("F_GETFL", v(libc::F_GETFL.into()), None),
        ("F_SETFL", v(libc::F_SETFL.into()), None),
        ("F_DUPFD_CLOEXEC", v(libc::F_DUPFD_CLOEXEC.into()), None),
        ("F_ADD_SEALS", v(libc::F_ADD_SEALS.into()), None),
        ("F_GET_SEALS", v(libc::F_GET_SEALS.into()), None),
        ("BLKSSZGET", v(libc::BLKSSZGET as i64), None),
        ("BLKPBSZGET", v(libc::BLKPBSZGET as i64), None),
        // _IOR(0x12, 114, size_t): libc has no constant.
        ("BLKGETSIZE64", (2 << 30) | (8 << 16) | (0x12 << 8) | 114, None),
        ("TUNSETOFFLOAD", v(libc::TUNSETOFFLOAD as i64), None),
        ("TUNSETVNETHDRSZ", v(libc::TUNSETVNETHDRSZ as i64), None),
        ("TUNGETVNETHDRSZ", v(libc::TUNGETVNETHDRSZ as i64), None),
        ("TUNGETIFF", v(libc::TUNGETIFF as i64), None),
    ];
    for kind in ProcessKind::ALL {
        let p = Profile::load(kind).unwrap();
        for r in p.allow.iter().flat_map(|(_, g)| g.rules.iter()).filter(|r| !r.name.starts_with("KVM_")) {
            let (_, want, mask) = table
                .iter()
                .find(|(n, _, _)| *n == r.name)
                .unwrap_or_else(|| panic!("{kind}: rule {:?} is not in this test's table: add it", r.name));
            if r.name == "own process" {
                assert_eq!(r.value, ArgValue::Symbol("$pid".to_string()));
            } else {
                assert_eq!(r.value, ArgValue::Number(*want), "{kind}: {}", r.name);
            }
            assert_eq!(r.mask, *mask, "{kind}: {}", r.name);
        }
    }
}

/// docs/SECURITY.md describes every group: a group added to a profile must be added there too.
#[test]
fn security_doc_names_every_group() {
    let doc = include_str!("../../docs/SECURITY.md");
    for kind in ProcessKind::ALL {
        let p = Profile::load(kind).unwrap();
        let names = p.allow.iter().map(|(_, g)| &g.name).chain(p.errno.iter().map(|(_, g)| &g.name));
        for name in names {
            assert!(doc.contains(&format!("`{name}`")), "docs/SECURITY.md does not mention group `{name}` ({kind})");
        }
    }
}

#[test]
fn sigsys_deaths_get_a_hint() {
    assert!(tessera_policy::death_hint(libc::SIGSYS).unwrap().contains("seccomp=log"));
    assert_eq!(tessera_policy::death_hint(libc::SIGKILL), None);
}

#[test]
fn run_with_takes_chroot_and_user() {
    let mut o = SandboxOptions::default();
    o.apply_run_with_arg("chroot=/,user=nobody,async-teardown=off").unwrap();
    assert_eq!(o.chroot.as_deref(), Some(std::path::Path::new("/")));
    assert_eq!(o.runas, Some(RunAs { uid: 65534, gid: 65534 }));
    for (bad, says) in [
        ("async-teardown=on", "not supported"),
        ("async-teardown=maybe", "is not on or off"),
        ("chroot", "is not key=value"),
        ("colour=red", "Invalid parameter 'colour'"),
    ] {
        let e = SandboxOptions::default().apply_run_with_arg(bad).unwrap_err().to_string();
        assert!(e.starts_with(&format!("-run-with {bad}: ")) && e.contains(says), "{bad}: {e}");
    }
    // Errors of the parts name the part's own option.
    let e = SandboxOptions::default().apply_run_with_arg("chroot=relative").unwrap_err().to_string();
    assert!(e.contains("absolute"), "{e}");
}
