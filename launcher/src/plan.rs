//! The process graph a [`VmConfig`] needs, as data: which children, which host resources each one gets (in
//! the order they are attached to its `Configure`, so [`FdIndex`] *i* is the child's *i*-th resource), and
//! the configuration messages. Building a plan touches nothing on the host; `resources::open` opens what it
//! lists, in order, and `spawn` starts the children.
//!
//! Graph: one `tessera-chardev` per chardev a serial port uses (one process can serve several front ends of
//! a `mux=on` chardev), one `tessera-core`, and one socketpair per UART between them.

use tessera_ipc::messages::{
    Accel, BootConfig, BootFile, ChardevBackend, ChardevConfig, ChildConfig, CoreConfig, DebugExitConfig, FdIndex,
    LogConfig, RamConfig, Role, SerialConfig, VhostUserBlkConfig, VhostUserSocket,
};

use crate::config::{CharBackend, SocketAddr, VmConfig};

/// Something the launcher opens (or creates) on a child's behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    /// `-D`: the log file, truncated then appended to by every child (one shared open file).
    LogFile(String),
    /// The launcher's standard input / output (duplicated).
    Stdin,
    Stdout,
    /// A chardev's output file (`file:path`, `-chardev file,path=`), created, truncated unless `append`.
    OutputFile {
        path: String,
        append: bool,
        location: String,
    },
    /// A chardev's `logfile=`.
    ChardevLog {
        path: String,
        append: bool,
        location: String,
    },
    /// A listening socket (`server=on`); `wait` means the first client is accepted before anything starts.
    Listener {
        addr: SocketAddr,
        telnet: bool,
        location: String,
    },
    /// The first client of the listener that is resource number `listener` (only with `wait=on`).
    Accepted {
        listener: usize,
        location: String,
    },
    /// A client connection (`server=off`).
    Connect {
        addr: SocketAddr,
        location: String,
    },
    /// The master side of a new pty; the launcher prints the slave's path as QEMU does.
    PtyMaster {
        label: String,
    },
    /// One end of serial link number `link` (between the core's UART and a chardev process).
    SerialCore(usize),
    SerialChardev(usize),
    /// A `-drive` image, opened read-write (read-only with `readonly=on`) for tessera-blk.
    Image {
        path: String,
        read_only: bool,
        location: String,
    },
    /// The listening vhost-user socket of tessera-blk number `n` (an abstract unix address private to this
    /// launcher), and the core's connection to it (made before tessera-blk runs: the backlog holds it).
    BlkListener(usize),
    BlkConnect(usize),
    /// The same for tessera-net number `n` (launcher/src/net.rs).
    NetListener(usize),
    NetConnect(usize),
    /// A tap device, opened by the launcher (it may be privileged, tessera-net is not): `ifname=`, or a new tap
    /// the kernel names.
    Tap {
        ifname: Option<String>,
        location: String,
    },
    /// `-kernel` / `-initrd`, read-only.
    Kernel(String),
    Initrd(String),
}

/// A backend started with command-line flags instead of the control protocol (tessera-blk): `fds[i]` is at
/// descriptor `3 + i` in the child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendPlan {
    pub role: Role,
    pub binary: &'static str,
    pub label: String,
    pub fds: Vec<usize>,
    pub args: Vec<String>,
}

/// One child process of the graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildPlan {
    pub role: Role,
    /// The executable's name (looked up next to the launcher or in `$TESSERA_LIBEXEC_DIR`).
    pub binary: &'static str,
    /// For messages: the binary's name (`tessera-chardev (pid 12) died: ...`).
    pub label: String,
    /// Resource numbers, in the order their descriptors are attached: `FdIndex(i)` is `fds[i]`.
    pub fds: Vec<usize>,
    /// The configuration, complete except for what only opening can tell (the pty's path, the accelerator
    /// that initialised), which `resources` fills in.
    pub config: ChildConfig,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Everything to open, in the order it is opened (QEMU's: log file, chardevs, then kernel and initrd).
    pub resources: Vec<Resource>,
    /// Chardev processes, started first (so nothing the guest prints is lost), then the core.
    pub chardevs: Vec<ChildPlan>,
    /// Block and network backends, started after the chardevs and before the core.
    pub backends: Vec<BackendPlan>,
    pub core: ChildPlan,
    /// Accelerators to try in order.
    pub accels: Vec<crate::config::AccelKind>,
}

pub const CORE_BINARY: &str = "tessera-core";
pub const CHARDEV_BINARY: &str = "tessera-chardev";
pub const BLK_BINARY: &str = "tessera-blk";

struct Builder {
    resources: Vec<Resource>,
}

impl Builder {
    fn add(&mut self, r: Resource) -> usize {
        self.resources.push(r);
        self.resources.len() - 1
    }
}

/// Attach resource `res` to a child's list and return its index there.
fn attach(fds: &mut Vec<usize>, res: usize) -> FdIndex {
    fds.push(res);
    FdIndex((fds.len() - 1) as u32)
}

pub fn build(cfg: &VmConfig) -> Plan {
    let mut b = Builder { resources: Vec::new() };
    let log_file = cfg.log_file.as_ref().map(|p| b.add(Resource::LogFile(p.clone())));
    let log_for =
        |fds: &mut Vec<usize>| LogConfig { items: cfg.log_items.clone(), file: log_file.map(|r| attach(fds, r)) };

    // Serial links: one per UART, in COM order.
    let mut chardevs = Vec::new();
    let links: Vec<(usize, &str)> = cfg.serials.iter().enumerate().map(|(i, id)| (i, id.as_str())).collect();
    for spec in &cfg.chardevs {
        let mut fds = Vec::new();
        let backend = match &spec.backend {
            CharBackend::Null => ChardevBackend::Null,
            CharBackend::Stdio => {
                let input = attach(&mut fds, b.add(Resource::Stdin));
                let output = attach(&mut fds, b.add(Resource::Stdout));
                // QEMU puts the terminal in raw mode for a stdio chardev; the chardev process does it.
                ChardevBackend::Stdio { input, output, raw: true }
            }
            CharBackend::File { path, append } => {
                let r = b.add(Resource::OutputFile {
                    path: path.clone(),
                    append: *append,
                    location: spec.location.clone(),
                });
                ChardevBackend::File { output: attach(&mut fds, r), input: None }
            }
            CharBackend::Socket(s) if s.server => {
                let l = b.add(Resource::Listener {
                    addr: s.addr.clone(),
                    telnet: s.telnet,
                    location: spec.location.clone(),
                });
                let listener = attach(&mut fds, l);
                let connected = s.wait.then(|| {
                    attach(&mut fds, b.add(Resource::Accepted { listener: l, location: spec.location.clone() }))
                });
                ChardevBackend::SocketServer { listener, connected, telnet: s.telnet }
            }
            CharBackend::Socket(s) => {
                let r = b.add(Resource::Connect { addr: s.addr.clone(), location: spec.location.clone() });
                ChardevBackend::SocketClient { stream: attach(&mut fds, r) }
            }
            CharBackend::Pty => {
                let r = b.add(Resource::PtyMaster { label: spec.id.clone() });
                ChardevBackend::Pty { master: attach(&mut fds, r), path: String::new() }
            }
        };
        let logfile = spec.logfile.as_ref().map(|p| {
            let r = b.add(Resource::ChardevLog {
                path: p.clone(),
                append: spec.logappend,
                location: spec.location.clone(),
            });
            attach(&mut fds, r)
        });
        let mut frontends = Vec::new();
        for (link, _) in links.iter().filter(|(_, id)| *id == spec.id) {
            frontends.push(attach(&mut fds, b.add(Resource::SerialChardev(*link))));
        }
        let log = log_for(&mut fds);
        chardevs.push(ChildPlan {
            role: Role::Chardev,
            binary: CHARDEV_BINARY,
            label: CHARDEV_BINARY.to_string(),
            fds,
            config: ChildConfig::Chardev(ChardevConfig {
                id: spec.id.clone(),
                backend,
                frontends,
                mux: spec.mux,
                signal: spec.signal,
                logfile,
                log,
            }),
        });
    }

    let mut fds = Vec::new();
    let serial = links
        .iter()
        .map(|(link, id)| SerialConfig {
            channel: attach(&mut fds, b.add(Resource::SerialCore(*link))),
            chardev_id: id.to_string(),
        })
        .collect();
    let kernel = cfg
        .kernel
        .as_ref()
        .map(|p| BootFile { fd: attach(&mut fds, b.add(Resource::Kernel(p.clone()))), path: p.clone() });
    let initrd = cfg
        .initrd
        .as_ref()
        .map(|p| BootFile { fd: attach(&mut fds, b.add(Resource::Initrd(p.clone()))), path: p.clone() });
    // vhost-user backends the user started: the launcher connects (it opens host resources), the core gets the
    // connected stream.
    let vhost_user_blk: Vec<VhostUserBlkConfig> = cfg
        .vhost_user_blk
        .iter()
        .map(|d| {
            let r = b.add(Resource::Connect {
                addr: SocketAddr::Unix(d.path.clone()),
                location: d.chardev_location.clone(),
            });
            VhostUserBlkConfig {
                id: d.id.clone(),
                socket: VhostUserSocket::Connected(attach(&mut fds, r)),
                num_queues: d.num_queues,
                slot: d.slot,
                origin: d.location.clone(),
            }
        })
        .collect();
    // Drives: one tessera-blk each, given the image and a listening socket; the core gets a connection to it.
    let mut backends = Vec::new();
    let mut vhost_user_blk = vhost_user_blk;
    for (n, d) in cfg.drives.iter().enumerate() {
        let image =
            b.add(Resource::Image { path: d.file.clone(), read_only: d.read_only, location: d.drive_location.clone() });
        let listener = b.add(Resource::BlkListener(n));
        let conn = b.add(Resource::BlkConnect(n));
        let num_queues = d.num_queues.unwrap_or(cfg.smp.cpus.clamp(1, 64) as u16);
        let mut args: Vec<String> =
            ["--socket-fd", "3", "--image-fd", "4", "--num-queues"].iter().map(|s| s.to_string()).collect();
        args.push(num_queues.to_string());
        if let Some(f) = &d.format {
            args.extend(["--format".to_string(), f.clone()]);
        }
        if d.read_only {
            args.push("--read-only".into());
        }
        if d.direct {
            args.push("--direct".into());
        }
        if let Some(a) = &d.aio {
            args.extend(["--aio".to_string(), a.clone()]);
        }
        backends.push(BackendPlan {
            role: Role::Block,
            binary: BLK_BINARY,
            // The device id in parentheses is how supervision names the backend (lib.rs, restart.rs).
            label: format!("{BLK_BINARY} ({})", d.id),
            fds: vec![listener, image],
            args,
        });
        vhost_user_blk.push(VhostUserBlkConfig {
            id: d.id.clone(),
            socket: VhostUserSocket::Connected(attach(&mut fds, conn)),
            num_queues: Some(num_queues),
            slot: d.slot,
            origin: d.location.clone(),
        });
    }
    // NICs: after the disks, so that their PCI slots follow the disks' as the command line has them.
    let vhost_user_net = crate::net::plan(&cfg.nics, &mut |r| b.add(r), &mut fds, &mut backends);
    let log = log_for(&mut fds);
    let core = CoreConfig {
        name: cfg.name.clone(),
        // Settled when the accelerator initialises (resources::select_accel).
        accel: match cfg.accels.first() {
            Some(crate::config::AccelKind::Kvm) => Accel::Kvm,
            _ => Accel::Tcg,
        },
        // The /dev/kvm descriptor is attached once KVM initialised (resources::finish_config).
        kvm: None,
        topology: Some(tessera_ipc::messages::CpuTopology {
            sockets: cfg.smp.sockets,
            dies: cfg.smp.dies,
            cores: cfg.smp.cores,
            threads: cfg.smp.threads,
            maxcpus: cfg.smp.maxcpus,
        }),
        cpu_model: cfg.cpu_model.clone(),
        smp: cfg.smp.cpus,
        ram: RamConfig {
            size: cfg.ram_size,
            // `shared` is what the user declared, checked by the core for backends the user runs (QEMU's rule:
            // `-device vhost-user-blk-pci` needs share=on RAM). A `-drive if=virtio` needs no memory backend in
            // QEMU; here its tessera-blk maps the core's memfd, which the core always maps MAP_SHARED, so a
            // drive without a memory backend counts as shared (as a launcher-started tessera-net does in the
            // core). An explicit share=off, or an external vhost-user-blk device, keeps QEMU's refusal.
            shared: match &cfg.memory_backend {
                Some(m) => m.share,
                None => !cfg.drives.is_empty() && cfg.vhost_user_blk.is_empty(),
            },
            backend_id: cfg.memory_backend.as_ref().map(|m| m.id.clone()),
        },
        boot: BootConfig { kernel, initrd, cmdline: cfg.append.clone() },
        serial,
        debug_exit: cfg.debug_exit.as_ref().map(|d| DebugExitConfig { iobase: d.iobase, iosize: d.iosize }),
        no_reboot: cfg.no_reboot,
        no_shutdown: cfg.no_shutdown,
        start_paused: cfg.start_paused,
        log,
        vhost_user_blk,
        vhost_user_net,
    };
    Plan {
        resources: b.resources,
        chardevs,
        backends,
        core: ChildPlan {
            role: Role::Core,
            binary: CORE_BINARY,
            label: CORE_BINARY.to_string(),
            fds,
            config: ChildConfig::Core(core),
        },
        accels: cfg.accels.clone(),
    }
}

impl Plan {
    /// A readable listing, for `--tessera-dump-plan`.
    pub fn dump(&self) -> String {
        let mut s = String::from("resources:\n");
        for (i, r) in self.resources.iter().enumerate() {
            s.push_str(&format!("  #{i}: {r:?}\n"));
        }
        s.push_str(&format!("accelerators: {}\n", self.accels.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")));
        for c in self.chardevs.iter().chain(std::iter::once(&self.core)) {
            let id = match &c.config {
                ChildConfig::Chardev(cc) => format!(" [{}]", cc.id),
                ChildConfig::Core(_) => String::new(),
            };
            s.push_str(&format!("child {}{id}, fds {:?}:\n{:#?}\n", c.label, c.fds, c.config));
        }
        for b in &self.backends {
            s.push_str(&format!("child {}, fds {:?} at 3..: {} {}\n", b.label, b.fds, b.binary, b.args.join(" ")));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_gets_the_topology_and_no_kvm_descriptor_yet() {
        let args: Vec<String> = ["-smp", "8,sockets=2,cores=2,threads=2", "-kernel", "/etc/hostname"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let crate::config::Command::Run(cfg) = crate::config::parse(&args, "t").unwrap().command else {
            panic!("not a run command")
        };
        let ChildConfig::Core(core) = build(&cfg).core.config else { panic!("the core's config is not a core's") };
        let t = core.topology.unwrap();
        assert_eq!((t.sockets, t.dies, t.cores, t.threads, t.maxcpus), (2, 1, 2, 2, 8));
        assert_eq!(core.smp, 8);
        // Attached at run time, once KVM initialised (resources::finish_config).
        assert_eq!(core.kvm, None);
    }
}
