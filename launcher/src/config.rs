//! What a command line means: options interpreted and checked as QEMU 8.2 checks them, into a [`VmConfig`].
//! Nothing here touches the host except looking users up (`-runas`) and directories (`-chroot`); files,
//! sockets and devices are opened later, by `resources`, from the plan.
//!
//! QEMU reports problems in two phases and so do we: while reading the options (the message names the option,
//! `-m foo: ...`), then while building the machine (no location: `invalid accelerator foo`).

use crate::error::{Error, Result};
use crate::options::{help_text, Opt};
use crate::opts::{is_help, parse_size, parse_u64, split_argv, ArgOpt, KeyVals};

/// QEMU's default RAM size for the pc machine.
pub const DEFAULT_RAM: u64 = 128 << 20;
/// The machine Tessera emulates (QEMU's `pc` alias points at the newest i440fx machine).
pub const MACHINE: &str = "pc-i440fx-8.2";
/// QEMU's limit for the i440fx machine.
pub const MAX_CPUS: u32 = 255;
/// ISA serial ports COM1..COM4.
pub const MAX_SERIALS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelKind {
    Kvm,
    Tcg,
}

impl AccelKind {
    pub fn name(self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Smp {
    pub cpus: u32,
    pub sockets: u32,
    pub dies: u32,
    pub cores: u32,
    pub threads: u32,
    pub maxcpus: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryBackend {
    pub id: String,
    pub size: u64,
    pub share: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketAddr {
    Unix(String),
    Tcp { host: String, port: String },
}

impl std::fmt::Display for SocketAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketAddr::Unix(p) => write!(f, "{p}"),
            SocketAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketSpec {
    pub addr: SocketAddr,
    pub server: bool,
    /// Server only: wait for a client before the guest starts.
    pub wait: bool,
    pub telnet: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CharBackend {
    Null,
    Stdio,
    File { path: String, append: bool },
    Socket(SocketSpec),
    Pty,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChardevSpec {
    pub id: String,
    pub backend: CharBackend,
    pub mux: bool,
    /// `signal=` (stdio only; QEMU's default is on).
    pub signal: bool,
    pub logfile: Option<String>,
    pub logappend: bool,
    /// The option that defined it, for messages about opening it.
    pub location: String,
}

/// `-device vhost-user-blk-pci,chardev=ID[,num-queues=N][,addr=SLOT][,id=]`: a block device served by a
/// vhost-user backend the user started, reached through a `-chardev socket` client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserBlkSpec {
    pub id: String,
    /// The unix socket the backend listens on (the chardev's `path=`).
    pub path: String,
    pub num_queues: Option<u16>,
    pub slot: Option<u8>,
    /// The `-device` option, for messages.
    pub location: String,
    /// The `-chardev` option, for messages about connecting.
    pub chardev_location: String,
}

/// A disk served by a tessera-blk the launcher starts: `-drive if=virtio`, or `-drive if=none` used by
/// `-device virtio-blk-pci,drive=`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkDrive {
    pub id: String,
    pub file: String,
    /// `raw` or `qcow2`; probed by tessera-blk when absent (as QEMU probes).
    pub format: Option<String>,
    pub read_only: bool,
    /// `cache=none`/`directsync`: O_DIRECT.
    pub direct: bool,
    /// `aio=threads|io_uring` (tessera-blk's `--aio`, which only matters with O_DIRECT); `None` keeps
    /// tessera-blk's default.
    pub aio: Option<String>,
    pub num_queues: Option<u16>,
    pub slot: Option<u8>,
    /// The `-drive` option, for messages about the image.
    pub drive_location: String,
    /// The option that made the device (`-drive ...,if=virtio` or `-device virtio-blk-pci,...`).
    pub location: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebugExit {
    pub iobase: u16,
    pub iosize: u16,
}

/// A fully checked command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Accelerators to try in order (QEMU falls back along `-accel kvm -accel tcg` or `accel=kvm:tcg`).
    pub accels: Vec<AccelKind>,
    pub cpu_model: String,
    pub smp: Smp,
    pub ram_size: u64,
    pub memory_backend: Option<MemoryBackend>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: String,
    /// Every chardev that a serial port uses, in command-line order (unused `-chardev`s are checked only).
    pub chardevs: Vec<ChardevSpec>,
    /// The chardev id of each UART, COM1 first.
    pub serials: Vec<String>,
    pub debug_exit: Option<DebugExit>,
    pub vhost_user_blk: Vec<VhostUserBlkSpec>,
    pub drives: Vec<BlkDrive>,
    /// virtio-net-pci devices and their netdevs (`-nic`, `-netdev`, `-device virtio-net-pci`): see [`crate::net`].
    pub nics: Vec<crate::net::Nic>,
    pub name: Option<String>,
    pub process_name: Option<String>,
    pub no_reboot: bool,
    pub no_shutdown: bool,
    pub start_paused: bool,
    pub daemonize: bool,
    pub pidfile: Option<String>,
    pub log_items: Vec<String>,
    pub log_file: Option<String>,
    /// `--tessera-dump-plan`: print the plan, start nothing.
    pub dump_plan: bool,
    /// `-sandbox`, `-runas`, `-chroot`, `-run-with`: how every child confines itself (docs/SECURITY.md).
    pub sandbox: tessera_policy::SandboxOptions,
    /// `-qmp` / `-mon mode=control`: QMP monitors the launcher serves.
    pub monitors: Vec<crate::qmp::MonitorSpec>,
    /// `-tessera-restart-limit`: see [`crate::restart`].
    pub restart_limit: u32,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<VmConfig>),
    /// Print `text` on stdout and exit with `code` (`-version`, `-h`, `-machine help`, ...).
    Print {
        text: String,
        code: i32,
    },
}

/// The result of parsing: a command and the warnings QEMU would have printed on the way (each rendered
/// without the program-name prefix, which the caller adds).
#[derive(Debug)]
pub struct Parsed {
    pub command: Command,
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------------------------------
// tables

/// `-d` items of QEMU 8.2's system emulator.
pub const LOG_ITEMS: &[(&str, &str)] = &[
    ("out_asm", "host code generated for each translation block"),
    ("in_asm", "guest code of each translation block"),
    ("op", "micro ops of each translation block"),
    ("op_opt", "micro ops after optimisation"),
    ("op_ind", "micro ops before indirect lowering"),
    ("op_plugin", "micro ops with plugin instrumentation"),
    ("int", "interrupts and exceptions, short form"),
    ("exec", "each executed translation block"),
    ("cpu", "CPU registers before each translation block"),
    ("fpu", "FPU registers too, with 'cpu'"),
    ("mmu", "MMU activity"),
    ("pcall", "protected-mode far calls, returns and exceptions"),
    ("cpu_reset", "CPU state at reset"),
    ("unimp", "unimplemented functionality"),
    ("guest_errors", "invalid things the guest does (such as touching a register that does not exist)"),
    ("page", "pages at the start of user-mode emulation"),
    ("nochain", "no chaining of translation blocks, for complete 'exec'/'cpu' traces"),
    ("plugin", "output of TCG plugins"),
    ("strace", "every user-mode system call"),
    ("tid", "one log file per thread (the -D name must contain '%d')"),
    // Tessera's own item (QEMU has no such item): each child prints how it is confined.
    ("sandbox", "how each Tessera process is confined (Tessera only)"),
];

fn log_usage() -> String {
    let mut s = String::from("Log items (comma separated):\n");
    for (name, what) in LOG_ITEMS {
        s.push_str(&format!("{name:<15} {what}\n"));
    }
    s.push_str("trace:PATTERN   enable trace events (not supported by tessera yet)\n");
    s
}

/// x86 CPU model families QEMU 8.2 knows; Tessera models only `host`, `max` and `qemu64`.
const QEMU_CPU_FAMILIES: &[&str] = &[
    "486",
    "athlon",
    "base",
    "Broadwell",
    "Cascadelake",
    "Conroe",
    "Cooperlake",
    "core2duo",
    "coreduo",
    "Denverton",
    "Dhyana",
    "EPYC",
    "GraniteRapids",
    "Haswell",
    "Icelake",
    "IvyBridge",
    "KnightsMill",
    "kvm32",
    "kvm64",
    "n270",
    "Nehalem",
    "Opteron_G",
    "Penryn",
    "pentium",
    "phenom",
    "qemu32",
    "SandyBridge",
    "SapphireRapids",
    "SierraForest",
    "Skylake",
    "Snowridge",
    "Westmere",
    "YongFeng",
];

const CPU_MODELS: &[(&str, &str)] = &[
    ("host", "the host's CPU, as KVM exposes it (KVM only)"),
    ("max", "every feature the accelerator supports"),
    ("qemu64", "QEMU's default 64-bit model"),
];

/// Devices QEMU 8.2 has for x86 that Tessera does not (yet): refused with "not supported yet".
const QEMU_DEVICES: &[&str] = &[
    "ahci",
    "ati-vga",
    "bochs-display",
    "cirrus-vga",
    "e1000",
    "e1000e",
    "ich9-ahci",
    "ich9-intel-hda",
    "ide-cd",
    "ide-hd",
    "intel-hda",
    "intel-iommu",
    "ipmi-bmc-sim",
    "isa-applesmc",
    "isa-cirrus-vga",
    "isa-debugcon",
    "isa-fdc",
    "isa-ipmi-kcs",
    "isa-parallel",
    "isa-serial",
    "isa-vga",
    "i6300esb",
    "ib700",
    "lsi53c895a",
    "megasas",
    "ne2k_isa",
    "ne2k_pci",
    "nvdimm",
    "nvme",
    "pc-dimm",
    "pci-bridge",
    "pci-serial",
    "pcie-root-port",
    "pcnet",
    "pvpanic",
    "qemu-xhci",
    "qxl",
    "qxl-vga",
    "rtl8139",
    "scsi-cd",
    "scsi-hd",
    "sga",
    "tpm-crb",
    "tpm-tis",
    "usb-ehci",
    "usb-kbd",
    "usb-mouse",
    "usb-net",
    "usb-storage",
    "usb-tablet",
    "vfio-pci",
    "vhost-user-blk-pci",
    "vhost-user-fs-pci",
    "vhost-vsock-pci",
    "VGA",
    "virtio-9p-pci",
    "virtio-balloon-pci",
    "virtio-blk-pci",
    "virtio-gpu-pci",
    "virtio-input-host-pci",
    "virtio-keyboard-pci",
    "virtio-mouse-pci",
    "virtio-net-pci",
    "virtio-rng-pci",
    "virtio-scsi-pci",
    "virtio-serial-pci",
    "virtio-tablet-pci",
    "virtio-vga",
    "virtconsole",
    "virtserialport",
    "vmcoreinfo",
    "vmport",
    "vmware-svga",
    "vmxnet3",
];

/// `-chardev` backends QEMU 8.2 has that Tessera does not.
const QEMU_CHAR_BACKENDS: &[&str] = &[
    "braille",
    "dbus",
    "memory",
    "msmouse",
    "parallel",
    "parport",
    "pipe",
    "qemu-vdagent",
    "ringbuf",
    "serial",
    "spiceport",
    "spicevmc",
    "testdev",
    "tty",
    "udp",
    "vc",
    "wctablet",
];

/// Every key QEMU's `-chardev` options list accepts (keys a backend does not use are ignored, as in QEMU).
const CHARDEV_KEYS: &[&str] = &[
    "backend",
    "id",
    "path",
    "host",
    "port",
    "fd",
    "local",
    "localaddr",
    "localport",
    "to",
    "ipv4",
    "ipv6",
    "wait",
    "server",
    "delay",
    "nodelay",
    "reconnect",
    "telnet",
    "tn3270",
    "websocket",
    "width",
    "height",
    "cols",
    "rows",
    "mux",
    "signal",
    "name",
    "debug",
    "size",
    "chardev",
    "append",
    "logfile",
    "logappend",
    "abstract",
    "tight",
    "tls-creds",
    "tls-authz",
];

/// Socket keys QEMU honours and Tessera does not yet.
const SOCKET_UNSUPPORTED_KEYS: &[&str] =
    &["fd", "to", "ipv4", "ipv6", "reconnect", "tn3270", "websocket", "abstract", "tight", "tls-creds", "tls-authz"];

/// Machine properties of QEMU 8.2's pc machine that Tessera does not implement.
const MACHINE_PROPS: &[&str] = &[
    "acpi",
    "append",
    "boot",
    "confidential-guest-support",
    "default-bus-bypass-iommu",
    "dtb",
    "dump-guest-core",
    "dumpdtb",
    "firmware",
    "graphics",
    "hmat",
    "hpet",
    "i8042",
    "initrd",
    "kernel",
    "kernel-irqchip",
    "kvm-shadow-mem",
    "max-fw-size",
    "max-ram-below-4g",
    "mem-merge",
    "memory-encryption",
    "nvdimm",
    "nvdimm-persistence",
    "pcspk-audiodev",
    "phandle-start",
    "pic",
    "pit",
    "pflash0",
    "pflash1",
    "sata",
    "sgx-epc",
    "smbios-entry-point-type",
    "smbus",
    "smm",
    "suppress-vmdesc",
    "usb",
    "vmport",
    "x-oem-id",
    "x-oem-table-id",
    "bus-lock-ratelimit",
    "dt-compatible",
    "smp",
    "memory",
];

/// QEMU machine types Tessera does not emulate.
const QEMU_MACHINES: &[&str] =
    &["q35", "pc-q35", "pc-i440fx", "microvm", "isapc", "none", "xenfv", "xenpv", "x-remote"];

/// QOM types QEMU 8.2 accepts for `-object` that Tessera does not.
const QEMU_OBJECTS: &[&str] = &[
    "authz-list",
    "authz-listfile",
    "authz-pam",
    "authz-simple",
    "can-bus",
    "can-host-socketcan",
    "colo-compare",
    "cryptodev-backend",
    "cryptodev-backend-builtin",
    "cryptodev-backend-lkcf",
    "cryptodev-vhost-user",
    "dbus-vmstate",
    "filter-buffer",
    "filter-dump",
    "filter-mirror",
    "filter-redirector",
    "filter-replay",
    "filter-rewriter",
    "input-barrier",
    "input-linux",
    "iothread",
    "main-loop",
    "memory-backend-epc",
    "memory-backend-file",
    "memory-backend-ram",
    "pr-manager-helper",
    "qtest",
    "rng-builtin",
    "rng-egd",
    "rng-random",
    "secret",
    "secret_keyring",
    "sev-guest",
    "thread-context",
    "throttle-group",
    "tls-cipher-suites",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
    "x-remote-object",
    "x-vfio-user-server",
];

/// `memory-backend-memfd` properties Tessera does not implement.
const MEMFD_UNSUPPORTED: &[&str] = &[
    "hugetlb",
    "hugetlbsize",
    "seal",
    "prealloc",
    "prealloc-threads",
    "prealloc-context",
    "merge",
    "dump",
    "host-nodes",
    "policy",
    "reserve",
    "x-use-canonical-path-for-ramblock-id",
];

// ---------------------------------------------------------------------------------------------------------------
// parsing

/// Everything gathered while reading the options, before the machine-level checks.
#[derive(Default)]
struct Raw {
    warnings: Vec<String>,
    /// `-device vhost-user-blk-pci` options with their locations, resolved once every `-chardev` is known.
    vhost_user_blk: Vec<(KeyVals, String)>,
    /// `-drive` options (checked as read), and `-device virtio-blk-pci` options, with locations.
    drives: Vec<(BlkDrive, bool)>,
    virtio_blk: Vec<(KeyVals, String)>,
    /// `-blockdev` nodes with their locations.
    blockdevs: Vec<(KeyVals, String)>,
    net: crate::net::NetOptions,
    machine: KeyVals,
    machine_accel_set: bool,
    accel_opts: Vec<(String, String)>, // (accelerator name, location)
    cpu: Option<String>,
    smp: Option<KeyVals>,
    mem: Option<(KeyVals, String)>,
    kernel: Option<String>,
    initrd: Option<String>,
    append: Option<String>,
    serial_specs: Vec<(String, String)>, // (spec, location)
    chardevs: Vec<ChardevSpec>,
    debug_exit: Option<DebugExit>,
    objects: Vec<MemoryBackend>,
    nographic: bool,
    default_monitor: bool,
    default_serial: bool,
    name: Option<String>,
    process_name: Option<String>,
    no_reboot: bool,
    no_shutdown: bool,
    start_paused: bool,
    daemonize: bool,
    pidfile: Option<String>,
    sandbox: tessera_policy::SandboxOptions,
    log_items: Option<String>,
    log_file: Option<String>,
    dump_plan: bool,
    help_request: Option<String>,
    monitors: Vec<crate::qmp::RawMonitor>,
    restart_limit: Option<u32>,
}

/// The confinement without any `-sandbox` option: the policy crate's default (on, Landlock when the kernel has
/// it). QEMU's default is off; docs/SECURITY.md says why Tessera differs.
pub fn default_sandbox() -> tessera_policy::SandboxOptions {
    tessera_policy::SandboxOptions::default()
}

/// Parse argv (without argv[0]); `prog` is the name messages are printed under.
pub fn parse(args: &[String], prog: &str) -> Result<Parsed> {
    let opts = split_argv(args)?;
    let mut raw = Raw { default_monitor: true, default_serial: true, sandbox: default_sandbox(), ..Raw::default() };
    for o in &opts {
        if let Some(print) = read_option(&mut raw, o, prog).map_err(|e| locate(e, o))? {
            return Ok(Parsed { command: print, warnings: raw.warnings });
        }
    }
    if let Some(text) = raw.help_request.take() {
        return Ok(Parsed { command: Command::Print { text, code: 0 }, warnings: raw.warnings });
    }
    let config = check(&mut raw)?;
    Ok(Parsed { command: Command::Run(Box::new(config)), warnings: raw.warnings })
}

/// Errors raised while reading an option name it, unless they already carry a location.
fn locate(e: Error, o: &ArgOpt) -> Error {
    match e {
        Error::At { .. } => e,
        e => e.at(o.location()),
    }
}

fn parse_kv(o: &ArgOpt, raw: &mut Raw) -> KeyVals {
    let kv = KeyVals::parse(o.arg(), o.def.implied);
    for w in &kv.warnings {
        raw.warnings.push(format!("{}: {w}", o.location()));
    }
    kv
}

/// Read one option into `raw`. `Ok(Some(..))` means: print this and stop.
fn read_option(raw: &mut Raw, o: &ArgOpt, prog: &str) -> Result<Option<Command>> {
    let arg = o.arg();
    match o.def.opt {
        Opt::Version => return Ok(Some(Command::Print { text: format!("{}\n", crate::version_text()), code: 0 })),
        Opt::Help => return Ok(Some(Command::Print { text: help_text(prog), code: 0 })),
        Opt::Machine => {
            let kv = parse_kv(o, raw);
            if kv.get("type").is_some_and(is_help) {
                raw.help_request.get_or_insert_with(machine_help);
            }
            if kv.has("accel") {
                raw.machine_accel_set = true;
            }
            // Later -machine options add to and override earlier ones (QEMU merges them).
            raw.machine.pairs.extend(kv.pairs);
        }
        Opt::Accel => {
            let kv = parse_kv(o, raw);
            let name = kv.get("accel").unwrap_or_default().to_string();
            if is_help(&name) {
                return Ok(Some(Command::Print {
                    text: "Accelerators supported in QEMU binary:\ntcg\nkvm\n".into(),
                    code: 0,
                }));
            }
            let owner = match name.as_str() {
                "kvm" => "kvm-accel",
                "tcg" => "tcg-accel",
                "" => return Err(Error::MissingParameter("accel".into())),
                "hvf" | "whpx" | "nvmm" | "xen" | "qtest" => {
                    return Err(Error::NotSupportedYet(format!("the {name} accelerator")))
                }
                _ => return Err(Error::InvalidAccelerator(name)),
            };
            const ACCEL_PROPS: &[&str] = &[
                "kernel-irqchip",
                "kvm-shadow-mem",
                "dirty-ring-size",
                "eager-split-size",
                "notify-vmexit",
                "notify-window",
                "xen-version",
                "thread",
                "tb-size",
                "split-wx",
                "one-insn-per-tb",
            ];
            if let Some(key) = kv.unknown_keys(&["accel"]).next() {
                if ACCEL_PROPS.contains(&key) {
                    return Err(Error::NotSupportedYet(format!("the accelerator property '{key}'")));
                }
                return Err(Error::PropertyNotFound { owner: owner.into(), property: key.into() });
            }
            raw.accel_opts.push((name, o.location()));
        }
        Opt::EnableKvm => {
            raw.machine.pairs.push(("accel".into(), "kvm".into()));
            raw.machine_accel_set = true;
        }
        Opt::Cpu => {
            let model = arg.split(',').next().unwrap_or_default();
            if is_help(model) {
                raw.help_request.get_or_insert_with(cpu_help);
            }
            raw.cpu = Some(arg.to_string());
        }
        Opt::Smp => {
            let kv = parse_kv(o, raw);
            let merged = raw.smp.get_or_insert_with(KeyVals::default);
            merged.pairs.extend(kv.pairs);
        }
        Opt::Memory => {
            let kv = parse_kv(o, raw);
            kv.check_keys(&["size", "slots", "maxmem"])?;
            // Types are checked as the option is read (QEMU_OPT_SIZE / QEMU_OPT_NUMBER).
            kv.get_size("size")?;
            kv.get_number("slots")?;
            kv.get_size("maxmem")?;
            match &mut raw.mem {
                Some((merged, loc)) => {
                    merged.pairs.extend(kv.pairs);
                    *loc = o.location();
                }
                None => raw.mem = Some((kv, o.location())),
            }
        }
        Opt::Kernel => raw.kernel = Some(arg.to_string()),
        Opt::Initrd => raw.initrd = Some(arg.to_string()),
        Opt::Append => raw.append = Some(arg.to_string()),
        Opt::Bios => return Err(Error::NotSupportedYet("loading firmware with -bios (boot with -kernel)".into())),
        Opt::Serial => {
            raw.default_serial = false;
            raw.serial_specs.push((arg.to_string(), o.location()));
        }
        Opt::Chardev => {
            let kv = parse_kv(o, raw);
            let spec = chardev_from_kv(&kv, o.location())?;
            if raw.chardevs.iter().any(|c| c.id == spec.id) {
                return Err(Error::DuplicateId { id: spec.id, kind: "chardev" });
            }
            if spec.backend == CharBackend::Stdio && raw.chardevs.iter().any(|c| c.backend == CharBackend::Stdio) {
                return Err(Error::StdioTwice);
            }
            raw.chardevs.push(spec);
        }
        Opt::Device => {
            let kv = parse_kv(o, raw);
            if kv.get("driver") == Some("virtio-blk-pci") {
                const KEYS: &[&str] = &["driver", "id", "drive", "num-queues", "addr", "bus"];
                if let Some(k) = kv.unknown_keys(KEYS).next() {
                    return Err(Error::PropertyNotFound { owner: "virtio-blk-pci".into(), property: k.into() });
                }
                raw.virtio_blk.push((kv, o.location()));
            } else if kv.get("driver") == Some("vhost-user-blk-pci") {
                const KEYS: &[&str] = &["driver", "id", "chardev", "num-queues", "addr", "bus"];
                if let Some(k) = kv.unknown_keys(KEYS).next() {
                    return Err(Error::PropertyNotFound { owner: "vhost-user-blk-pci".into(), property: k.into() });
                }
                raw.vhost_user_blk.push((kv, o.location()));
            } else if crate::net::is_nic_driver(kv.get("driver").unwrap_or_default()) {
                crate::net::read_device(&mut raw.net, &kv, o.location())?;
            } else if let Some(text) = device(raw, &kv)? {
                return Ok(Some(Command::Print { text, code: 0 }));
            }
        }
        Opt::Blockdev => {
            let kv = parse_kv(o, raw);
            let Some(name) = kv.get("node-name").map(String::from) else {
                return Err(Error::MissingParameter("node-name".into()));
            };
            if raw.blockdevs.iter().any(|(b, _)| b.get("node-name") == Some(name.as_str())) {
                return Err(Error::Message(format!("Duplicate nodes with node-name='{name}'")));
            }
            raw.blockdevs.push((kv, o.location()));
        }
        Opt::Drive => {
            let kv = parse_kv(o, raw);
            let (d, virtio) = drive(&kv, o.location())?;
            if raw.drives.iter().any(|(x, _)| x.id == d.id) {
                return Err(Error::Message(format!("Duplicate ID '{}' for drive", d.id)));
            }
            raw.drives.push((d, virtio));
        }
        Opt::Nic | Opt::Netdev => {
            let kv = parse_kv(o, raw);
            let read = if o.def.opt == Opt::Nic { crate::net::read_nic } else { crate::net::read_netdev };
            if let Some(text) = read(&mut raw.net, &kv, o.location())? {
                return Ok(Some(Command::Print { text, code: 0 }));
            }
        }
        Opt::Nographic => raw.nographic = true,
        Opt::Display => {
            let kv = parse_kv(o, raw);
            match kv.get("type").unwrap_or_default() {
                "none" => {}
                t @ ("gtk" | "sdl" | "vnc" | "curses" | "egl-headless" | "spice-app" | "dbus" | "cocoa") => {
                    return Err(Error::NotSupportedYet(format!("the {t} display")))
                }
                t => return Err(Error::DoesNotAccept { key: "type".into(), value: t.into() }),
            }
            let unexpected = kv.unknown_keys(&["type"]).next().map(String::from);
            if let Some(k) = unexpected {
                return Err(Error::UnexpectedParameter(k));
            }
        }
        Opt::Name => {
            let kv = parse_kv(o, raw);
            kv.check_keys(&["guest", "process", "debug-threads"])?;
            // Thread names are for debugging only; the value is checked as QEMU checks it.
            kv.get_bool("debug-threads")?;
            if let Some(g) = kv.get("guest") {
                raw.name = Some(g.to_string());
            }
            if let Some(p) = kv.get("process") {
                raw.process_name = Some(p.to_string());
            }
        }
        Opt::NoReboot => raw.no_reboot = true,
        Opt::NoShutdown => raw.no_shutdown = true,
        Opt::StartPaused => raw.start_paused = true,
        Opt::Daemonize => raw.daemonize = true,
        Opt::Pidfile => raw.pidfile = Some(arg.to_string()),
        Opt::Runas => {
            check_user(arg)?;
            raw.sandbox.apply_runas_arg(arg).map_err(policy_error)?;
        }
        Opt::Chroot => {
            if !std::path::Path::new(arg).is_dir() {
                return Err(Error::NotADirectory(arg.to_string()));
            }
            raw.sandbox.apply_chroot_arg(arg).map_err(policy_error)?;
        }
        Opt::Sandbox => {
            // QEMU's grammar and wording first (`enable` is the implied key), then the meaning.
            let kv = parse_kv(o, raw);
            if !kv.has("enable") {
                return Err(Error::MissingParameter("enable".into()));
            }
            kv.get_bool("enable")?;
            raw.sandbox.apply_sandbox_arg(arg).map_err(policy_error)?;
        }
        Opt::RunWith => raw.sandbox.apply_run_with_arg(arg).map_err(policy_error)?,
        Opt::Object => {
            let kv = parse_kv(o, raw);
            if let Some(m) = object(&kv)? {
                if raw.objects.iter().any(|b| b.id == m.id) {
                    return Err(Error::DuplicateId { id: m.id, kind: "object" });
                }
                raw.objects.push(m);
            }
        }
        Opt::LogFile => raw.log_file = Some(arg.to_string()),
        Opt::LogItems => raw.log_items = Some(arg.to_string()),
        Opt::Readconfig => return Err(Error::NotSupportedYet("-readconfig".into())),
        Opt::Monitor => match arg {
            "none" => raw.default_monitor = false,
            _ => return Err(Error::NotSupportedYet("the monitor (only -monitor none is accepted)".into())),
        },
        Opt::Nodefaults => {
            raw.default_serial = false;
            raw.default_monitor = false;
        }
        Opt::Unsupported => return Err(Error::NotSupportedYet(o.spelled.clone())),
        Opt::DumpPlan => raw.dump_plan = true,
        Opt::Qmp => raw.monitors.push(crate::qmp::RawMonitor::Qmp { spec: arg.to_string(), location: o.location() }),
        Opt::Mon => {
            let kv = parse_kv(o, raw);
            raw.monitors.push(crate::qmp::mon_option(&kv, o.location())?);
        }
        Opt::RestartLimit => raw.restart_limit = Some(restart_limit(arg)?),
    }
    Ok(None)
}

fn machine_help() -> String {
    format!("Supported machines are:\npc                   Standard PC (i440FX + PIIX, 1996) (alias of {MACHINE})\n{MACHINE:<20} Standard PC (i440FX + PIIX, 1996) (default)\n")
}

fn cpu_help() -> String {
    let mut s = String::from("Available CPUs:\n");
    for (name, what) in CPU_MODELS {
        s.push_str(&format!("x86 {name:<22} {what}\n"));
    }
    s
}

/// The policy crate's message without the option it names: the caller's location already says which option.
fn policy_error(e: tessera_policy::PolicyError) -> Error {
    use tessera_policy::PolicyError as P;
    match e {
        P::SandboxOption { message, .. } | P::RunAs { message, .. } | P::RunWith { message, .. } => {
            Error::Sandbox(message)
        }
        P::Chroot { dir, message } => Error::Sandbox(format!("{}: {message}", dir.display())),
        other => Error::Sandbox(other.to_string()),
    }
}

fn check_user(spec: &str) -> Result<()> {
    if let Ok(Some(_)) = nix::unistd::User::from_name(spec) {
        return Ok(());
    }
    // "<uid>:<gid>" needs no user entry.
    if let Some((u, g)) = spec.split_once(':') {
        if u.parse::<u32>().is_ok() && g.parse::<u32>().is_ok() {
            return Ok(());
        }
    }
    Err(Error::UnknownUser(spec.to_string()))
}

fn chardev_from_kv(kv: &KeyVals, location: String) -> Result<ChardevSpec> {
    kv.check_keys(CHARDEV_KEYS)?;
    let backend_name = kv.get("backend").unwrap_or_default();
    let mux = kv.get_bool("mux")?.unwrap_or(false);
    let signal = kv.get_bool("signal")?.unwrap_or(true);
    let logappend = kv.get_bool("logappend")?.unwrap_or(false);
    for key in ["wait", "server", "delay", "nodelay", "telnet", "append", "ipv4", "ipv6"] {
        kv.get_bool(key)?;
    }
    let id = kv.get("id").ok_or(Error::ChardevNoId)?.to_string();
    let backend = match backend_name {
        "null" => CharBackend::Null,
        "stdio" => CharBackend::Stdio,
        "pty" => CharBackend::Pty,
        "file" => {
            let path = kv.get("path").ok_or(Error::FileNoPath)?.to_string();
            CharBackend::File { path, append: kv.get_bool("append")?.unwrap_or(false) }
        }
        "socket" => CharBackend::Socket(socket_from_kv(kv)?),
        b if QEMU_CHAR_BACKENDS.contains(&b) => {
            return Err(Error::NotSupportedYet(format!("the '{b}' chardev backend")))
        }
        b => return Err(Error::InvalidCharDriverName(b.to_string())),
    };
    Ok(ChardevSpec { id, backend, mux, signal, logfile: kv.get("logfile").map(String::from), logappend, location })
}

fn socket_from_kv(kv: &KeyVals) -> Result<SocketSpec> {
    let path = kv.get("path");
    let host = kv.get("host");
    let addr = match (path, host, kv.has("fd")) {
        (Some(_), Some(_), _) | (Some(_), _, true) | (_, Some(_), true) => return Err(Error::SocketTwoAddresses),
        (Some(p), None, false) => SocketAddr::Unix(p.to_string()),
        (None, Some(h), false) => {
            let port = kv.get("port").ok_or(Error::SocketNoPort)?;
            SocketAddr::Tcp { host: h.to_string(), port: port.to_string() }
        }
        (None, None, true) => {
            return Err(Error::NotSupportedYet("passing a socket chardev by file descriptor (fd=)".into()))
        }
        (None, None, false) => return Err(Error::SocketNoAddress),
    };
    if let Some(k) = SOCKET_UNSUPPORTED_KEYS.iter().find(|k| kv.has(k)) {
        return Err(Error::NotSupportedYet(format!("the socket chardev option '{k}'")));
    }
    let server = kv.get_bool("server")?.unwrap_or(false);
    // QEMU's default for a server is to wait for the first client.
    let wait = server && kv.get_bool("wait")?.unwrap_or(true);
    let telnet = kv.get_bool("telnet")?.unwrap_or(false);
    Ok(SocketSpec { addr, server, wait, telnet })
}

/// `-serial` in QEMU's legacy syntax (`qemu_chr_parse_compat`). `Ok(None)` for `none`; the string names a
/// chardev (`chardev:id`) or an implicit one to create.
pub(crate) enum SerialSpec {
    None,
    Existing(String),
    New(CharBackend, bool),
}

pub(crate) fn serial_spec(spec: &str) -> Result<SerialSpec> {
    let fail = || Error::SerialBackend(spec.to_string());
    if spec == "none" {
        return Ok(SerialSpec::None);
    }
    if let Some(id) = spec.strip_prefix("chardev:") {
        return Ok(SerialSpec::Existing(id.to_string()));
    }
    let (mux, rest) = match spec.strip_prefix("mon:") {
        Some(r) => (true, r),
        None => (false, spec),
    };
    let backend = match rest {
        "null" => CharBackend::Null,
        "stdio" => CharBackend::Stdio,
        "pty" => CharBackend::Pty,
        _ if rest.starts_with("file:") => CharBackend::File { path: rest[5..].to_string(), append: false },
        _ if rest.starts_with("tcp:") || rest.starts_with("telnet:") => {
            let telnet = rest.starts_with("telnet:");
            let body = rest.split_once(':').map(|x| x.1).unwrap_or_default();
            let (addr, opts) = body.split_once(',').unwrap_or((body, ""));
            // QEMU's "%64[^:]:%32[^,]" then ":%32[^,]": an empty host is allowed, an empty port is not.
            let (host, port) = addr.split_once(':').ok_or_else(fail)?;
            if port.is_empty() || port.contains(':') {
                return Err(fail());
            }
            let kv = KeyVals::parse(opts, None);
            kv.check_keys(CHARDEV_KEYS)?;
            let mut kv2 = kv.clone();
            kv2.pairs.insert(0, ("host".into(), host.into()));
            kv2.pairs.insert(1, ("port".into(), port.into()));
            if telnet {
                kv2.pairs.push(("telnet".into(), "on".into()));
            }
            CharBackend::Socket(socket_from_kv(&kv2)?)
        }
        _ if rest.starts_with("unix:") => {
            let (path, opts) = rest[5..].split_once(',').unwrap_or((&rest[5..], ""));
            let kv = KeyVals::parse(opts, None);
            kv.check_keys(CHARDEV_KEYS)?;
            let mut kv2 = kv.clone();
            kv2.pairs.insert(0, ("path".into(), path.into()));
            CharBackend::Socket(socket_from_kv(&kv2)?)
        }
        _ => {
            let driver = rest.split([':', ',']).next().unwrap_or_default();
            if QEMU_CHAR_BACKENDS.contains(&driver) || rest.starts_with("/dev/") || driver == "vc" {
                return Err(Error::NotSupportedYet(format!("the serial backend '{rest}'")));
            }
            return Err(Error::InvalidCharDriver(rest.to_string()));
        }
    };
    Ok(SerialSpec::New(backend, mux))
}

/// `-device`: returns help text to print when asked.
fn device(raw: &mut Raw, kv: &KeyVals) -> Result<Option<String>> {
    let driver = kv.get("driver").unwrap_or_default();
    if is_help(driver) {
        return Ok(Some(
            "Misc devices:\nname \"isa-debug-exit\", bus ISA, desc \"exit the VM with a status the guest writes\"\n"
                .into(),
        ));
    }
    match driver {
        "isa-debug-exit" => {}
        d if QEMU_DEVICES.contains(&d) => return Err(Error::NotSupportedYet(format!("the device '{d}'"))),
        d => return Err(Error::InvalidDevice(d.to_string())),
    }
    if kv.pairs.iter().any(|(k, v)| k != "driver" && is_help(v)) || kv.pairs.iter().any(|(k, _)| is_help(k)) {
        return Ok(Some(
            "isa-debug-exit options:\n  iobase=<uint32>        -  (default: 1281)\n  iosize=<uint32>        -  (default: 2)\n"
                .into(),
        ));
    }
    if let Some(k) = kv.unknown_keys(&["driver", "id", "bus", "iobase", "iosize"]).next() {
        return Err(Error::PropertyNotFound { owner: "isa-debug-exit".into(), property: k.into() });
    }
    if let Some(bus) = kv.get("bus") {
        if bus != "isa.0" {
            return Err(Error::Message(format!("Bus '{bus}' not found")));
        }
    }
    let prop = |key: &str, default: u32| -> Result<u32> {
        match kv.get(key) {
            None => Ok(default),
            Some(v) => {
                // qdev's uint32 properties: an integer (decimal, hex, octal), in range.
                let n = parse_i128(v).ok_or_else(|| Error::ExpectsInteger(key.to_string()))?;
                u32::try_from(n).map_err(|_| Error::Message(format!("Parameter '{key}' expects uint32_t")))
            }
        }
    };
    let iobase = prop("iobase", 0x501)?;
    let iosize = prop("iosize", 2)?;
    // Tessera serves the device on the 16-bit I/O port bus; the range must be inside it.
    if iosize == 0 || u64::from(iobase) + u64::from(iosize) > 0x1_0000 {
        return Err(Error::Message(format!(
            "isa-debug-exit: ports 0x{iobase:x}..+0x{iosize:x} do not fit in the 64 KiB I/O port space"
        )));
    }
    if raw.debug_exit.is_some() {
        return Err(Error::NotSupportedYet("more than one isa-debug-exit device".into()));
    }
    raw.debug_exit = Some(DebugExit { iobase: iobase as u16, iosize: iosize as u16 });
    Ok(None)
}

/// Resolve a `-device vhost-user-blk-pci` against the `-chardev`s (QEMU hw/block/vhost-user-blk.c realize).
fn vhost_user_blk(raw: &Raw, kv: &KeyVals) -> Result<VhostUserBlkSpec> {
    let Some(chardev) = kv.get("chardev") else {
        return Err(Error::Message("chardev is mandatory".into()));
    };
    let Some(spec) = raw.chardevs.iter().find(|c| c.id == chardev) else {
        return Err(Error::Message(format!("Property 'vhost-user-blk-pci.chardev' can't find value '{chardev}'")));
    };
    let path = match &spec.backend {
        CharBackend::Socket(SocketSpec { addr: SocketAddr::Unix(p), server: false, .. }) => p.clone(),
        _ => {
            return Err(Error::NotSupportedYet(format!(
                "vhost-user over chardev '{chardev}': only a unix socket client (-chardev socket,path=...) is \
                 supported"
            )))
        }
    };
    let (num_queues, slot) = pci_props(kv, "vhost-user-blk-pci")?;
    Ok(VhostUserBlkSpec {
        id: kv.get("id").unwrap_or(chardev).to_string(),
        path,
        num_queues,
        slot,
        location: String::new(),
        chardev_location: spec.location.clone(),
    })
}

/// `num-queues=`, `bus=` and `addr=` of a virtio PCI block device.
pub(crate) fn pci_props(kv: &KeyVals, driver: &str) -> Result<(Option<u16>, Option<u8>)> {
    let num_queues = match kv.get("num-queues") {
        None => None,
        Some(v) => {
            let n = parse_i128(v)
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| Error::Message("Parameter 'num-queues' expects uint16_t".into()))?;
            if n == 0 {
                return Err(Error::Message("num-queues property must be larger than 0".into()));
            }
            if n > 64 {
                return Err(Error::NotSupportedYet(format!("more than 64 queues on a {driver} device")));
            }
            Some(n)
        }
    };
    if let Some(bus) = kv.get("bus") {
        if bus != "pci.0" {
            return Err(Error::Message(format!("Bus '{bus}' not found")));
        }
    }
    let slot = match kv.get("addr") {
        None => None,
        Some(a) => {
            // PCI address "slot[.function]" in hex; only function 0 exists here.
            let (slot, func) = a.split_once('.').unwrap_or((a, "0"));
            match (u8::from_str_radix(slot.trim_start_matches("0x"), 16), func) {
                (Ok(s), "0") if (1..32).contains(&s) => Some(s),
                _ => return Err(Error::Message(format!("Property '{driver}.addr' doesn't take value '{a}'"))),
            }
        }
    };
    Ok((num_queues, slot))
}

/// A `-blockdev` format node (`raw`, `qcow2`) over a `file` node, or a `file` node alone, as a drive.
fn blockdev_drive(raw: &Raw, kv: &KeyVals, location: &str) -> Result<BlkDrive> {
    const FILE_KEYS: &[&str] = &["driver", "node-name", "filename", "read-only", "cache.direct", "discard", "locking"];
    let file_node = |f: &KeyVals| -> Result<(String, bool, bool)> {
        match f.get("driver") {
            Some("file" | "host_device") => {}
            Some(d) => return Err(Error::NotSupportedYet(format!("the block driver '{d}' under a format node"))),
            None => return Err(Error::MissingParameter("driver".into())),
        }
        if let Some(k) = f.unknown_keys(FILE_KEYS).next() {
            return Err(Error::InvalidParameter(k.to_string()));
        }
        let name = f.get("filename").ok_or_else(|| Error::MissingParameter("filename".into()))?;
        Ok((name.to_string(), f.get_bool("read-only")?.unwrap_or(false), f.get_bool("cache.direct")?.unwrap_or(false)))
    };
    let (file, format, ro, direct) = match kv.get("driver") {
        Some("file" | "host_device") => {
            let (f, ro, direct) = file_node(kv)?;
            (f, "raw".to_string(), ro, direct)
        }
        Some(fmt @ ("raw" | "qcow2")) => {
            // The protocol node: a reference (`file=NODE`) or inline (`file.driver=file,file.filename=...`).
            let (f, ro, direct) = match kv.get("file") {
                Some(child) => {
                    let Some((c, _)) = raw.blockdevs.iter().find(|(b, _)| b.get("node-name") == Some(child)) else {
                        return Err(Error::Message(format!("Cannot find device='' nor node-name='{child}'")));
                    };
                    file_node(c)?
                }
                None => {
                    let inline = KeyVals {
                        pairs: kv
                            .pairs
                            .iter()
                            .filter_map(|(k, v)| k.strip_prefix("file.").map(|k| (k.to_string(), v.clone())))
                            .collect(),
                        ..KeyVals::default()
                    };
                    if inline.pairs.is_empty() {
                        return Err(Error::MissingParameter("file".into()));
                    }
                    file_node(&inline)?
                }
            };
            let mut own = kv.unknown_keys(&["driver", "node-name", "file", "read-only", "cache.direct", "discard"]);
            if let Some(k) = own.find(|k| !k.starts_with("file.")) {
                return Err(Error::InvalidParameter(k.to_string()));
            }
            let ro = ro || kv.get_bool("read-only")?.unwrap_or(false);
            let direct = direct || kv.get_bool("cache.direct")?.unwrap_or(false);
            (f, fmt.to_string(), ro, direct)
        }
        Some(d) => return Err(Error::NotSupportedYet(format!("the block driver '{d}' (file, raw and qcow2 are)"))),
        None => return Err(Error::MissingParameter("driver".into())),
    };
    Ok(BlkDrive {
        id: kv.get("node-name").unwrap_or_default().to_string(),
        file,
        format: Some(format),
        read_only: ro,
        direct,
        aio: None,
        num_queues: None,
        slot: None,
        drive_location: location.to_string(),
        location: location.to_string(),
    })
}

/// `-drive`: the options tessera-blk can serve. Returns the drive and whether it is `if=virtio`.
fn drive(kv: &KeyVals, location: String) -> Result<(BlkDrive, bool)> {
    const QEMU_DRIVE_KEYS: &[&str] = &[
        "bus",
        "unit",
        "index",
        "media",
        "snapshot",
        "werror",
        "rerror",
        "copy-on-read",
        "bps",
        "iops",
        "throttling.bps-total",
        "node-name",
        "detect-zeroes",
        "serial",
        "addr",
        "file.locking",
        "auto-read-only",
        "force-share",
        "cache.direct",
        "cache.no-flush",
        "read-only",
    ];
    if let Some(k) = kv.unknown_keys(&["file", "if", "format", "readonly", "cache", "discard", "id", "aio"]).next() {
        if QEMU_DRIVE_KEYS.contains(&k) {
            return Err(Error::NotSupportedYet(format!("the -drive option '{k}'")));
        }
        return Err(Error::InvalidParameter(k.to_string()));
    }
    let virtio = match kv.get("if").unwrap_or("ide") {
        "virtio" => true,
        "none" => false,
        i @ ("ide" | "scsi" | "floppy" | "pflash" | "mtd" | "sd" | "xen") => {
            return Err(Error::NotSupportedYet(format!("-drive if={i} (use if=virtio)")))
        }
        i => return Err(Error::Message(format!("unsupported bus type '{i}'"))),
    };
    let Some(file) = kv.get("file").filter(|f| !f.is_empty()) else {
        return Err(Error::NotSupportedYet("a -drive without file= (empty drives)".into()));
    };
    let format = match kv.get("format") {
        None => None,
        Some(f @ ("raw" | "qcow2")) => Some(f.to_string()),
        Some(f @ ("vmdk" | "vdi" | "vhdx" | "vpc" | "qed" | "luks" | "dmg" | "parallels" | "bochs" | "cloop")) => {
            return Err(Error::NotSupportedYet(format!("the image format '{f}' (raw and qcow2 are)")))
        }
        Some(f) => return Err(Error::Message(format!("'{f}' invalid format"))),
    };
    let direct = match kv.get("cache").unwrap_or("writeback") {
        "writeback" => false,
        "none" | "directsync" => true,
        c @ ("writethrough" | "unsafe") => return Err(Error::NotSupportedYet(format!("cache={c}"))),
        c => return Err(Error::Message(format!("invalid cache option '{c}'"))),
    };
    match kv.get("discard").unwrap_or("ignore") {
        "ignore" | "off" | "unmap" | "on" => {}
        d => return Err(Error::Message(format!("Invalid discard option '{d}'"))),
    }
    // QEMU's aio= values; tessera-blk runs threads or io_uring (docs/blk.md).
    let aio = match kv.get("aio") {
        None => None,
        Some(a @ ("threads" | "io_uring")) => Some(a.to_string()),
        Some("native") => return Err(Error::NotSupportedYet("aio=native (aio=threads and aio=io_uring are)".into())),
        Some(_) => return Err(Error::Message("invalid aio option".into())),
    };
    let read_only = kv.get_bool("readonly")?.unwrap_or(false);
    let id = kv.get("id").map(String::from).unwrap_or_else(|| format!("virtio-disk-{file}"));
    Ok((
        BlkDrive {
            id,
            file: file.to_string(),
            format,
            read_only,
            direct,
            aio,
            num_queues: None,
            slot: None,
            drive_location: location.clone(),
            location,
        },
        virtio,
    ))
}

fn parse_i128(v: &str) -> Option<i128> {
    let (neg, body) = match v.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, v),
    };
    let n = i128::from(parse_u64(body)?);
    Some(if neg { -n } else { n })
}

/// `-object`: memory-backend-memfd only.
fn object(kv: &KeyVals) -> Result<Option<MemoryBackend>> {
    let ty = kv.get("qom-type").unwrap_or_default();
    match ty {
        "memory-backend-memfd" => {}
        t if QEMU_OBJECTS.contains(&t) => return Err(Error::NotSupportedYet(format!("-object {t}"))),
        t => return Err(Error::DoesNotAccept { key: "qom-type".into(), value: t.into() }),
    }
    let mut known = vec!["qom-type", "id", "size", "share"];
    known.extend_from_slice(MEMFD_UNSUPPORTED);
    kv.check_keys(&known)?;
    let id = kv.get("id").ok_or_else(|| Error::MissingParameter("id".into()))?.to_string();
    // -object values are QAPI sizes and booleans (keyval): their wording differs from QemuOpts' a little.
    let size = match kv.get("size") {
        Some(v) => parse_size(v, 1).map_err(|_| Error::ExpectsSizeValue("size".into()))?,
        None => return Err(Error::MissingParameter("size".into())),
    };
    let share = kv.get_bool("share")?.unwrap_or(false);
    if let Some(k) = MEMFD_UNSUPPORTED.iter().find(|k| kv.has(k)) {
        return Err(Error::NotSupportedYet(format!("the memory-backend-memfd property '{k}'")));
    }
    Ok(Some(MemoryBackend { id, size, share }))
}

// ---------------------------------------------------------------------------------------------------------------
// machine-level checks (QEMU's qemu_init after the options are read)

fn check(raw: &mut Raw) -> Result<VmConfig> {
    if raw.nographic && raw.daemonize {
        return Err(Error::NographicDaemonize);
    }
    if raw.daemonize {
        if let Some(c) = raw.chardevs.iter().find(|c| c.backend == CharBackend::Stdio) {
            return Err(Error::StdioDaemonize.at(c.location.clone()));
        }
    }
    // -d is looked at right after the options (QEMU's qemu_process_early_options).
    let log_items = match raw.log_items.as_deref() {
        None => Vec::new(),
        Some(items) => {
            let mut out = Vec::new();
            for item in items.split(',') {
                if item.starts_with("trace:") {
                    return Err(Error::NotSupportedYet("trace events (-d trace:...)".into()));
                }
                if !LOG_ITEMS.iter().any(|(n, _)| *n == item) {
                    return Err(Error::LogUsage(log_usage()));
                }
                out.push(item.to_string());
            }
            out
        }
    };

    // Machine type and properties.
    let machine_type = raw.machine.get("type").unwrap_or("pc");
    if machine_type != "pc" && machine_type != MACHINE {
        if QEMU_MACHINES.iter().any(|m| machine_type == *m || machine_type.starts_with(&format!("{m}-"))) {
            return Err(Error::NotSupportedYet(format!("the machine type '{machine_type}' (use pc)")));
        }
        return Err(Error::UnsupportedMachine);
    }
    if let Some(key) = raw.machine.unknown_keys(&["type", "accel", "memory-backend"]).next() {
        if MACHINE_PROPS.contains(&key) {
            return Err(Error::NotSupportedYet(format!("the machine property '{key}'")));
        }
        return Err(Error::PropertyNotFound { owner: format!("{MACHINE}-machine"), property: key.to_string() });
    }

    // Accelerators: -accel (repeatable) or -machine accel=a:b, never both; TCG when neither (as QEMU).
    let mut accels = Vec::new();
    if raw.machine_accel_set {
        if !raw.accel_opts.is_empty() {
            return Err(Error::AccelIncompatible);
        }
        for name in raw.machine.get("accel").unwrap_or_default().split(':') {
            accels.push(match name {
                "kvm" => AccelKind::Kvm,
                "tcg" => AccelKind::Tcg,
                n => return Err(Error::InvalidAccelerator(n.to_string())),
            });
        }
    } else {
        for (name, _) in &raw.accel_opts {
            accels.push(if name == "kvm" { AccelKind::Kvm } else { AccelKind::Tcg });
        }
    }
    if accels.is_empty() {
        accels.push(AccelKind::Tcg);
    }

    let smp = check_smp(raw)?;

    // Memory (QEMU's parse_memory_options).
    let mut ram_size = DEFAULT_RAM;
    let mut have_custom_ram = false;
    if let Some((kv, loc)) = &raw.mem {
        if let Some(v) = kv.get("size") {
            have_custom_ram = true;
            let bytes = parse_size(v, 1).map_err(|_| Error::ExpectsSize("size".into()).at(loc.clone()))?;
            // A size without a suffix is in MiB ("legacy suffix-less format").
            ram_size = if v.ends_with(|c: char| c.is_ascii_digit()) {
                bytes
                    .checked_mul(1 << 20)
                    .ok_or_else(|| Error::Message("Parameter 'memory.size' expects size".into()))?
            } else {
                bytes
            };
            if ram_size == 0 {
                ram_size = DEFAULT_RAM;
            }
            // QEMU rounds RAM up to 8 KiB.
            ram_size = ram_size.checked_next_multiple_of(8192).unwrap_or(ram_size);
        }
        let slots = kv.get_number("slots").map_err(|e| e.at(loc.clone()))?.unwrap_or(0);
        let maxmem = kv.get_size("maxmem").map_err(|e| e.at(loc.clone()))?;
        if let Some(maxmem) = maxmem {
            if maxmem < ram_size {
                return Err(Error::MaxmemTooSmall { maxmem, size: ram_size });
            }
        }
        if slots > 0 && maxmem.is_none() {
            return Err(Error::SlotsWithoutMaxmem);
        }
        if slots > 0 {
            return Err(Error::NotSupportedYet("memory hotplug (-m slots=)".into()).at(loc.clone()));
        }
    }
    let memory_backend = match raw.machine.get("memory-backend") {
        None => None,
        Some(id) => {
            let b = raw.objects.iter().find(|b| b.id == id).ok_or_else(|| Error::MemoryBackendNotFound(id.into()))?;
            if have_custom_ram && b.size != ram_size {
                return Err(Error::MemoryBackendSizeMismatch);
            }
            ram_size = b.size;
            Some(b.clone())
        }
    };

    // CPU model.
    let cpu_arg = raw.cpu.clone().unwrap_or_else(|| "qemu64".into());
    let mut parts = cpu_arg.split(',');
    let model = parts.next().unwrap_or_default().to_string();
    if !CPU_MODELS.iter().any(|(m, _)| *m == model) {
        if QEMU_CPU_FAMILIES.iter().any(|f| model.starts_with(f)) {
            return Err(Error::NotSupportedYet(format!("the CPU model '{model}' (use host, max or qemu64)")));
        }
        return Err(Error::UnknownCpuModel(model));
    }
    if let Some(feature) = parts.next() {
        return Err(Error::NotSupportedYet(format!("CPU features on -cpu ('{feature}')")));
    }
    if model == "host" && !accels.contains(&AccelKind::Kvm) {
        return Err(Error::HostCpuNeedsKvm);
    }

    // Serial ports and their chardevs.
    let mut specs = std::mem::take(&mut raw.serial_specs);
    if raw.default_serial {
        if raw.nographic {
            // QEMU: serial and monitor share the terminal through a mux; with -monitor none the serial port
            // has it alone.
            specs.push((if raw.default_monitor { "mon:stdio" } else { "stdio" }.into(), "-nographic".into()));
        } else {
            // QEMU connects COM1 to a virtual console of the display; Tessera has no display, so the port
            // exists with its output discarded, as with `-display none`.
            specs.push(("null".into(), "-serial null".into()));
        }
    }
    let mut chardevs: Vec<ChardevSpec> = Vec::new();
    let mut serials = Vec::new();
    let mut uses: Vec<String> = Vec::new();
    let stdio_in_use = raw.chardevs.iter().any(|c| c.backend == CharBackend::Stdio);
    let mut implicit_stdio = false;
    for (index, (spec, loc)) in specs.iter().enumerate() {
        let parsed = serial_spec(spec).map_err(|e| e.at(loc.clone()))?;
        let id = match parsed {
            SerialSpec::None => continue,
            SerialSpec::Existing(id) => {
                let Some(c) = raw.chardevs.iter().find(|c| c.id == id) else {
                    return Err(Error::SerialBackend(spec.clone()).at(loc.clone()));
                };
                if uses.contains(&id) && !c.mux {
                    return Err(Error::Message(format!("Device '{id}' is in use")));
                }
                if !chardevs.iter().any(|x| x.id == id) {
                    chardevs.push(c.clone());
                }
                id
            }
            SerialSpec::New(backend, mux) => {
                let backend_is_stdio = backend == CharBackend::Stdio;
                if backend == CharBackend::Stdio {
                    if stdio_in_use || implicit_stdio {
                        return Err(Error::StdioTwice.at(loc.clone()));
                    }
                    if raw.daemonize {
                        return Err(Error::StdioDaemonize.at(loc.clone()));
                    }
                    implicit_stdio = true;
                }
                let id = format!("serial{index}");
                chardevs.push(ChardevSpec {
                    id: id.clone(),
                    backend,
                    mux,
                    // QEMU's compat syntax: a terminal shared with the monitor passes Ctrl-C to the guest
                    // (`mon:stdio`, hence -nographic); plain `stdio` ends the VM on Ctrl-C.
                    signal: !(mux && backend_is_stdio),
                    logfile: None,
                    logappend: false,
                    location: loc.clone(),
                });
                id
            }
        };
        if serials.len() == MAX_SERIALS {
            return Err(Error::NotSupportedYet(format!("more than {MAX_SERIALS} serial ports")).at(loc.clone()));
        }
        uses.push(id.clone());
        serials.push(id);
    }
    // -nographic with an explicit stdio serial port: QEMU's default monitor wants the terminal too.
    if raw.nographic && raw.default_monitor && !raw.default_serial && (implicit_stdio || stdio_in_use) {
        let loc = specs.iter().find(|(s, _)| s == "stdio").map(|(_, l)| l.clone());
        let e = Error::StdioTwice;
        return Err(match loc {
            Some(l) => e.at(l),
            None => e,
        });
    }

    // Boot.
    if raw.kernel.is_none() {
        if raw.initrd.is_some() {
            return Err(Error::InitrdWithoutKernel);
        }
        if raw.append.is_some() {
            return Err(Error::AppendWithoutKernel);
        }
        return Err(Error::NotSupportedYet("booting from firmware (give the guest with -kernel)".into()));
    }

    let vhost_user_blk = raw
        .vhost_user_blk
        .iter()
        .map(|(kv, loc)| {
            vhost_user_blk(raw, kv)
                .map(|s| VhostUserBlkSpec { location: loc.clone(), ..s })
                .map_err(|e| e.at(loc.clone()))
        })
        .collect::<Result<Vec<_>>>()?;

    // Disks: `if=virtio` drives are devices by themselves; `if=none` ones need a virtio-blk-pci.
    let mut drives: Vec<BlkDrive> = raw.drives.iter().filter(|(_, v)| *v).map(|(d, _)| d.clone()).collect();
    for (kv, loc) in &raw.virtio_blk {
        let at = |e: Error| e.at(loc.clone());
        let Some(id) = kv.get("drive") else { return Err(at(Error::Message("drive property not set".into()))) };
        let from_blockdev;
        let (d, virtio) = match raw.drives.iter().find(|(d, _)| d.id == id) {
            Some((d, v)) => (d, v),
            None => match raw.blockdevs.iter().find(|(b, _)| b.get("node-name") == Some(id)) {
                Some((b, bloc)) => {
                    from_blockdev = blockdev_drive(raw, b, bloc).map_err(|e| e.at(bloc.clone()))?;
                    (&from_blockdev, &false)
                }
                None => {
                    return Err(at(Error::Message(format!("Property 'virtio-blk-pci.drive' can't find value '{id}'"))))
                }
            },
        };
        if *virtio || drives.iter().any(|x| x.id == id) {
            return Err(at(Error::Message(format!(
                "Drive '{id}' is already in use because it has been automatically connected to another device \
                 (did you need 'if=none' in the drive options?)"
            ))));
        }
        let (num_queues, slot) = pci_props(kv, "virtio-blk-pci").map_err(at)?;
        drives.push(BlkDrive { num_queues, slot, location: loc.clone(), ..d.clone() });
    }

    let nics = crate::net::resolve(&raw.net, &raw.chardevs, &mut raw.warnings)?;
    let monitors = crate::qmp::resolve(&raw.monitors, &raw.chardevs, &serials)?;

    Ok(VmConfig {
        accels,
        cpu_model: model,
        smp,
        ram_size,
        memory_backend,
        kernel: raw.kernel.clone(),
        initrd: raw.initrd.clone(),
        append: raw.append.clone().unwrap_or_default(),
        chardevs,
        serials,
        debug_exit: raw.debug_exit.clone(),
        vhost_user_blk,
        drives,
        nics,
        name: raw.name.clone(),
        process_name: raw.process_name.clone(),
        no_reboot: raw.no_reboot,
        no_shutdown: raw.no_shutdown,
        start_paused: raw.start_paused,
        daemonize: raw.daemonize,
        pidfile: raw.pidfile.clone(),
        log_items,
        log_file: raw.log_file.clone(),
        dump_plan: raw.dump_plan,
        sandbox: raw.sandbox.clone(),
        monitors,
        restart_limit: raw.restart_limit.unwrap_or(crate::restart::DEFAULT_RESTART_LIMIT),
    })
}

/// `-tessera-restart-limit N`: a number, 0 allowed (no restarts).
fn restart_limit(arg: &str) -> Result<u32> {
    arg.parse::<u32>()
        .map_err(|_| Error::Message(format!("-tessera-restart-limit: '{arg}' is not a number of restarts")))
}

/// `-smp`, as QEMU 8.2's `machine_parse_smp_config` computes and checks it for the pc machine (which has
/// dies but no clusters, and prefers cores over sockets).
fn check_smp(raw: &mut Raw) -> Result<Smp> {
    let kv = raw.smp.take().unwrap_or_default();
    const KEYS: &[&str] = &["cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus"];
    let mut vals = [None::<u64>; 7];
    for (k, v) in &kv.pairs {
        let Some(i) = KEYS.iter().position(|x| x == k) else {
            return Err(Error::Message(format!("Parameter 'smp.{k}' is unexpected")));
        };
        let n = parse_u64(v).ok_or_else(|| Error::Message(format!("Parameter 'smp.{k}' expects integer")))?;
        vals[i] = Some(n);
    }
    if vals.contains(&Some(0)) {
        raw.warnings.push(
            "warning: Deprecated CPU topology (considered invalid): CPU topology parameters must be greater than zero"
                .into(),
        );
    }
    let too_big = |n: u64| n > u64::from(u32::MAX);
    if vals.iter().flatten().any(|n| too_big(*n)) {
        return Err(Error::Message(format!(
            "Invalid SMP CPUs {}. The max CPUs supported by machine '{MACHINE}' is {MAX_CPUS}",
            vals.iter().flatten().max().copied().unwrap_or(0)
        )));
    }
    let get = |i: usize| vals[i].unwrap_or(0);
    let (mut cpus, mut sockets, dies, clusters, mut cores, mut threads, mut maxcpus) =
        (get(0), get(1), get(2), get(3), get(4), get(5), get(6));
    if clusters > 1 {
        return Err(Error::Message("clusters not supported by this machine's CPU topology".into()));
    }
    let dies = dies.max(1);
    if cpus == 0 && maxcpus == 0 {
        sockets = sockets.max(1);
        cores = cores.max(1);
        threads = threads.max(1);
    } else {
        maxcpus = if maxcpus > 0 { maxcpus } else { cpus };
        // The divisors are never zero: each factor was given (non-zero) or defaulted to 1.
        let mul3 = |a: u64, b: u64, c: u64| a.saturating_mul(b).saturating_mul(c);
        if cores == 0 {
            sockets = sockets.max(1);
            threads = threads.max(1);
            cores = maxcpus / mul3(sockets, dies, threads);
        } else if sockets == 0 {
            threads = threads.max(1);
            sockets = maxcpus / mul3(dies, cores, threads);
        }
        if threads == 0 {
            threads = maxcpus / mul3(sockets, dies, cores);
        }
    }
    let total = sockets.saturating_mul(dies).saturating_mul(cores).saturating_mul(threads);
    maxcpus = if maxcpus > 0 { maxcpus } else { total };
    cpus = if cpus > 0 { cpus } else { maxcpus };
    let topo = format!("sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads})");
    if total != maxcpus {
        return Err(Error::Message(format!(
            "Invalid CPU topology: product of the hierarchy must match maxcpus: {topo} != maxcpus ({maxcpus})"
        )));
    }
    if maxcpus < cpus {
        return Err(Error::Message(format!(
            "Invalid CPU topology: maxcpus must be equal to or greater than smp: {topo} == maxcpus ({maxcpus}) < \
             smp_cpus ({cpus})"
        )));
    }
    if maxcpus > u64::from(MAX_CPUS) {
        return Err(Error::Message(format!(
            "Invalid SMP CPUs {maxcpus}. The max CPUs supported by machine '{MACHINE}' is {MAX_CPUS}"
        )));
    }
    // Every value is at most MAX_CPUS now.
    let n = |v: u64| v as u32;
    Ok(Smp {
        cpus: n(cpus),
        sockets: n(sockets),
        dies: n(dies),
        cores: n(cores),
        threads: n(threads),
        maxcpus: n(maxcpus),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing on a command line panics the parser: random lines built from pieces of real options.
    #[test]
    fn random_lines_never_panic() {
        const PIECES: &[&str] = &[
            "-m",
            "-smp",
            "-machine",
            "-M",
            "-accel",
            "-cpu",
            "-serial",
            "-chardev",
            "-device",
            "-object",
            "-d",
            "-D",
            "-nographic",
            "-display",
            "-name",
            "-kernel",
            "-initrd",
            "-append",
            "-daemonize",
            "-runas",
            "-chroot",
            "-monitor",
            "--m",
            "-",
            "--",
            "1G",
            "0",
            "0x",
            "1.5",
            "99999999999999999999E",
            "4,sockets=0",
            "cores=4294967295,threads=4294967295,sockets=4294967295,dies=4294967295",
            "maxcpus=0",
            "cpus=",
            "pc,accel=kvm:tcg:",
            "accel=",
            "type=",
            "help",
            "?",
            "host",
            "max",
            "qemu64,+x",
            "stdio",
            "mon:stdio",
            "mon:",
            "tcp:",
            "tcp::",
            "tcp:a:b:c",
            "unix:",
            "unix:/x,server",
            "chardev:",
            "file:",
            "null,id=a",
            "socket,id=s,host=,port=",
            "socket,id=s,path=",
            "isa-debug-exit,iobase=-0x1",
            "iosize=0",
            "memory-backend-memfd,id=m,size=1k,share",
            "memory-backend=m",
            ",",
            ",,",
            "=",
            "a=b=c",
            "noshare",
            "é",
            "\u{0}",
            "int,",
            ",int",
            "none,",
            "/etc/hostname",
            "-serial",
            "-chardev",
        ];
        let mut seed: u64 = 0x5eed;
        for _ in 0..20_000 {
            let mut args = Vec::new();
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let n = (seed >> 60) as usize;
            for _ in 0..n {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                args.push(PIECES[(seed >> 33) as usize % PIECES.len()].to_string());
            }
            // Either outcome is fine; only a panic fails the test.
            let _ = parse(&args, "t").map(|p| match p.command {
                Command::Run(cfg) => {
                    let _ = crate::plan::build(&cfg).dump();
                }
                Command::Print { .. } => {}
            });
        }
    }
}
