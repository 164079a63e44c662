//! Every message between Tessera processes.
//!
//! Channels (see docs/ARCHITECTURE.md):
//! * **control**: launcher ↔ each child it starts. The child finds its end at fd [`crate::CONTROL_FD`].
//!   After the handshake the launcher sends [`LauncherToChild::Configure`] with the child's configuration and
//!   the file descriptors it needs attached (a [`FdIndex`] names one of them); the child answers
//!   [`ChildToLauncher::Ready`] once it serves, and later [`ChildToLauncher::Exit`] or [`ChildToLauncher::Fatal`]
//!   when the graph must stop.
//! * **serial**: core ↔ chardev, one socketpair per front end (a UART), made by the launcher and passed to
//!   both. Guest output goes as [`CoreToChardev::Output`], host input comes back as [`ChardevToCore::Input`],
//!   and [`ChardevToCore::Written`] acknowledges output written to the host side.

use serde::{Deserialize, Serialize};

/// The kinds of Tessera processes, named in the handshake so a mis-wired socket is caught at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Launcher,
    Core,
    Chardev,
    Block,
    Net,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Launcher => "launcher",
            Role::Core => "tessera-core",
            Role::Chardev => "tessera-chardev",
            Role::Block => "tessera-blk",
            Role::Net => "tessera-net",
        })
    }
}

/// Index of a file descriptor in the list attached to the frame that carries the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdIndex(pub u32);

/// The first message each side sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always `b"tessera"`: a peer that is not Tessera at all fails here.
    pub magic: [u8; 7],
    pub version: u32,
    pub role: Role,
}

// ---------------------------------------------------------------------------------------------------------------
// control channel

// Sent once per child: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LauncherToChild {
    /// The child's whole configuration; the file descriptors named by [`FdIndex`] come attached.
    Configure(ChildConfig),
    /// Finish cleanly: flush what is buffered and exit with status 0.
    Shutdown,
    /// Core only: the backend behind vhost-user device `id` was restarted (or swapped, `x-tessera-backend-swap`).
    /// Reconnect through `socket` (a fresh stream attached, or a path to connect to) and restore the device:
    /// features, memory table, vrings and their indexes, the inflight region. The guest is not reset.
    VhostUserReconnect { id: String, socket: VhostUserSocket },
    /// Core only: the chardev process behind `chardev_id` was restarted; `channel` (attached) replaces the old
    /// serial channel. What the guest printed while it was away was buffered by the core and is sent first.
    SerialReconnect { chardev_id: String, channel: FdIndex },
    /// Core only: a monitor (QMP) command about the guest. Answered by [`ChildToLauncher::MonitorReply`] with the
    /// same `tag`.
    Monitor { tag: u64, command: MonitorCommand },
}

/// The guest-facing monitor commands the launcher forwards to the core (QMP names in the comments).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonitorCommand {
    /// `query-status`.
    QueryStatus,
    /// `stop`: pause the vCPUs.
    Stop,
    /// `cont`: resume them.
    Cont,
    /// `system_powerdown`: ACPI power button.
    SystemPowerdown,
    /// `system_reset`.
    SystemReset,
    /// Not a QMP command: the launcher serves a monitor, so the core sends [`ChildToLauncher::MonitorEvent`]s
    /// from now on (a core without a monitor sends none, and launchers or harnesses that predate them never see
    /// one).
    EnableEvents,
}

/// What a [`MonitorCommand`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonitorValue {
    /// The command has no return value (`{}` in QMP).
    Empty,
    /// `query-status`: QEMU's `StatusInfo` (`running`, and `status` such as `"running"`, `"paused"`,
    /// `"prelaunch"`, `"shutdown"`).
    Status { running: bool, status: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChildConfig {
    Core(CoreConfig),
    Chardev(ChardevConfig),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChildToLauncher {
    /// Configured and serving.
    Ready,
    /// The VM is over: stop every process and exit with `code` (the guest's isa-debug-exit value, 0 after a
    /// shutdown or `-no-reboot` reset, 0 after Ctrl-A x). `reason` is for the log.
    Exit { code: i32, reason: String },
    /// The child cannot go on; the launcher prints `message` and stops the graph with status 1.
    Fatal { message: String },
    /// Core: the answer to [`LauncherToChild::Monitor`] with the same `tag`; `Err` carries QMP's error text.
    MonitorReply { tag: u64, result: Result<MonitorValue, String> },
    /// Core: the connection to the vhost-user backend of device `id` dropped. The guest keeps running; the
    /// device's requests wait until [`LauncherToChild::VhostUserReconnect`] (or, for a backend reached by path,
    /// the core's own reconnect) restores it.
    BackendDisconnected { id: String, reason: String },
    /// Core: device `id` is served again, `stall_ms` after its backend went away.
    BackendReconnected { id: String, stall_ms: u64 },
    /// Core: the guest's run state changed, or a monitor command acted on it. The launcher turns it into the
    /// QMP event of the same name; it is sent before the [`ChildToLauncher::MonitorReply`] of the command that
    /// caused it, as QEMU sends the event before the command's return.
    MonitorEvent(MonitorEvent),
}

/// Run-state events of the guest, named after QEMU's QMP events (qapi/run-state.json).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonitorEvent {
    /// `STOP`: the vCPUs stopped (`stop`, or a guest power-off with `-no-shutdown`).
    Stop,
    /// `RESUME`: they run again (`cont`).
    Resume,
    /// `RESET`: the machine was reset; `reason` is QEMU's `ShutdownCause` (`guest-reset`,
    /// `host-qmp-system-reset`).
    Reset { guest: bool, reason: String },
    /// `SHUTDOWN`: the guest powered off or reset with `-no-reboot` (`guest-shutdown`, `guest-reset`).
    Shutdown { guest: bool, reason: String },
    /// `POWERDOWN`: the ACPI power button was pressed (`system_powerdown`).
    Powerdown,
}

/// Logging set with `-d`/`-D`, passed to every child.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogConfig {
    /// The `-d` items (`guest_errors`, `unimp`, `int`, `cpu_reset`, ...), already validated by the launcher.
    pub items: Vec<String>,
    /// `-D file`: opened by the launcher (append mode); stderr when absent.
    pub file: Option<FdIndex>,
}

// ---------------------------------------------------------------------------------------------------------------
// core

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreConfig {
    pub name: Option<String>,
    pub accel: Accel,
    /// `/dev/kvm`, opened read-write by the launcher when `accel` is KVM: a sandboxed core cannot open paths.
    /// `None` (TCG, or an older launcher) makes the core open the device itself, which only works unsandboxed.
    pub kvm: Option<FdIndex>,
    /// `-smp`'s topology as the launcher computed and checked it (QEMU's rules); `None` from a launcher that
    /// does not send it: then `smp` sockets of one core each.
    pub topology: Option<CpuTopology>,
    /// `-cpu` model: `host`, `max` or `qemu64`.
    pub cpu_model: String,
    pub smp: u32,
    pub ram: RamConfig,
    pub boot: BootConfig,
    /// UARTs in ISA order: COM1 (0x3f8, IRQ 4), COM2 (0x2f8, IRQ 3), COM3, COM4.
    pub serial: Vec<SerialConfig>,
    pub debug_exit: Option<DebugExitConfig>,
    /// `-no-reboot`: a guest reset ends the VM (exit 0) instead of rebooting it.
    pub no_reboot: bool,
    /// `-no-shutdown`: a guest power-off stops the vCPUs but keeps the processes.
    pub no_shutdown: bool,
    /// `-S`: do not start the vCPUs until told to.
    pub start_paused: bool,
    pub log: LogConfig,
    /// vhost-user block devices on PCI bus 0 (`-device vhost-user-blk-pci`, and `-drive if=virtio` /
    /// `-device virtio-blk-pci` served by a tessera-blk the launcher started), in command-line order.
    pub vhost_user_blk: Vec<VhostUserBlkConfig>,
    /// virtio-net-pci devices on PCI bus 0 served over vhost-user (`-nic`, `-netdev user|tap` with a tessera-net
    /// the launcher started, `-netdev vhost-user` with an external backend), in command-line order, placed after
    /// the block devices.
    pub vhost_user_net: Vec<VhostUserNetConfig>,
}

/// One vhost-user-blk-pci device: the core is the vhost-user front end, the backend serves the disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserBlkConfig {
    /// The device's `id=` (or the drive's), for messages.
    pub id: String,
    pub socket: VhostUserSocket,
    /// `num-queues=`; `None` is QEMU's default, one queue per vCPU.
    pub num_queues: Option<u16>,
    /// `addr=` (PCI slot on bus 0); `None` takes the next free one.
    pub slot: Option<u8>,
    /// What the user wrote for this device (`-device vhost-user-blk-pci,chardev=c0`), QEMU's prefix for
    /// errors about it.
    pub origin: String,
}

/// One virtio-net-pci device over vhost-user. vhost-user-net backends do not serve the device configuration:
/// the core builds it (virtio 1.2 §5.1.4) from these values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserNetConfig {
    /// The device's `id=` (or the netdev's), for messages.
    pub id: String,
    pub socket: VhostUserSocket,
    /// `mac=`, or QEMU's default (52:54:00:12:34:56 plus the NIC's index).
    pub mac: [u8; 6],
    /// Queue pairs (RX + TX each); 1 unless multiqueue is negotiated with a control queue.
    pub queue_pairs: u16,
    /// `addr=` (PCI slot on bus 0); `None` takes the next free one.
    pub slot: Option<u8>,
    /// The backend is not one the launcher started (`-netdev vhost-user`): as in QEMU, guest RAM must then be a
    /// `share=on` memory backend.
    pub external: bool,
    /// What the user wrote for this device, QEMU's prefix for errors about it.
    pub origin: String,
}

/// How the core reaches a vhost-user backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhostUserSocket {
    /// The core connects to this unix socket path.
    Path(String),
    /// A stream the launcher connected (or one end of a socketpair whose other end the backend has).
    Connected(FdIndex),
}

/// The guest's CPU topology (`-smp sockets=,dies=,cores=,threads=,maxcpus=`): `sockets * dies * cores *
/// threads == maxcpus`, and `smp <= maxcpus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTopology {
    pub sockets: u32,
    pub dies: u32,
    pub cores: u32,
    pub threads: u32,
    pub maxcpus: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamConfig {
    /// Bytes.
    pub size: u64,
    /// `share=on` of `-object memory-backend-memfd`: the RAM may be mapped by other processes (vhost-user).
    /// The core always allocates RAM in a memfd; this only records what the user asked for.
    pub shared: bool,
    /// The `id=` of the memory backend object, for messages.
    pub backend_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    /// `-kernel`: a Linux bzImage, an ELF with a PVH note, or a multiboot-less ELF: the core decides by content.
    pub kernel: Option<BootFile>,
    pub initrd: Option<BootFile>,
    /// `-append`.
    pub cmdline: String,
}

/// A file the launcher opened read-only on the core's behalf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFile {
    pub fd: FdIndex,
    /// The path the user gave, for error messages.
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConfig {
    /// The core's end of the serial channel to the chardev process.
    pub channel: FdIndex,
    /// The chardev `id=` it is connected to, for messages.
    pub chardev_id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugExitConfig {
    pub iobase: u16,
    pub iosize: u16,
}

// ---------------------------------------------------------------------------------------------------------------
// chardev

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChardevConfig {
    /// `id=`.
    pub id: String,
    pub backend: ChardevBackend,
    /// Front ends (serial channels to the core). More than one only with `mux=on`.
    pub frontends: Vec<FdIndex>,
    /// `mux=on` (implied by `-nographic` and `-serial mon:stdio`): the Ctrl-A escape keys are active.
    pub mux: bool,
    /// `signal=on` (`-chardev stdio` / `-serial stdio` default): Ctrl-C ends the VM instead of reaching the
    /// guest. QEMU turns it off for `-nographic` and `-serial mon:stdio`.
    pub signal: bool,
    /// `logfile=`: everything the guest prints is also appended here.
    pub logfile: Option<FdIndex>,
    pub log: LogConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChardevBackend {
    /// Discards output, never has input.
    Null,
    /// The launcher's terminal (or pipes). `raw` puts a terminal input into raw mode for the run.
    Stdio { input: FdIndex, output: FdIndex, raw: bool },
    /// `file:path` / `-chardev file,path=`: output appended/truncated by the launcher's open, input from
    /// `input-path=` when given.
    File { output: FdIndex, input: Option<FdIndex> },
    /// `-chardev socket,server=on`: a listening socket (unix or TCP) the launcher bound. `wait=on` means the
    /// launcher already waited for, and accepted, the first client: then `connected` carries it.
    SocketServer { listener: FdIndex, connected: Option<FdIndex>, telnet: bool },
    /// `-chardev socket,server=off`: a stream the launcher connected.
    SocketClient { stream: FdIndex },
    /// `-chardev pty`: the master side of a pty the launcher opened (it printed the slave's path, as QEMU does).
    Pty { master: FdIndex, path: String },
}

// ---------------------------------------------------------------------------------------------------------------
// serial channel (core ↔ chardev)

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoreToChardev {
    /// Bytes the guest wrote to the UART's transmit register, in order.
    ///
    /// An **empty** `Output` is the core's request for [`ChardevToCore::Written`] acknowledgements on this
    /// channel: a core that keeps a replay buffer (tessera-core does) sends it first on every new channel. A
    /// peer that never sends it (a test playing the core) gets no acknowledgements. It is an empty `Output`
    /// rather than a variant of its own so that every reader of this enum that takes only `Output` keeps
    /// working (it adds nothing to the output).
    Output(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChardevToCore {
    /// Bytes for the guest's receive FIFO.
    Input(Vec<u8>),
    /// A break condition (Ctrl-A b in mux mode).
    Break,
    /// Acknowledged output (only after the core asked, see [`CoreToChardev::Output`]): the running count of
    /// [`CoreToChardev::Output`] bytes received on this channel that the chardev is done with, i.e. has written
    /// to its host side, or dropped by policy (the host side cannot take output: `null`, a socket server with
    /// no client, a pty nobody opened, a host side stuck past its queue, as QEMU drops output then). Sent after
    /// the writes complete, batched (one per finished host write, not per byte). The count starts at 0 on
    /// every channel and never goes back. The core keeps what is sent but not yet acknowledged and, when a
    /// restarted chardev gets a new channel ([`LauncherToChild::SerialReconnect`]), sends it again first: so
    /// output is delivered at least once (bytes a killed chardev wrote but had not acknowledged are written
    /// twice).
    Written(u64),
}
