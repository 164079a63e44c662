//! Networking on the command line: `-nic`, `-netdev user|tap|vhost-user` and `-device virtio-net-pci`, checked
//! as QEMU 8.2 checks them (wording compared with QEMU 7.2, the one installed here), into [`Nic`]s; and their
//! part of the plan: one `tessera-net` per `user`/`tap` netdev (given a listening vhost-user socket, and for tap
//! the tap descriptor the launcher opened), or a connection to an external backend for `vhost-user`.
//!
//! Tessera's only NIC model is `virtio-net-pci`. QEMU's pc machine gives `-nic` without `model=` an e1000;
//! Tessera gives it a virtio-net-pci (docs/net.md), and refuses other models by name. There is no default NIC
//! either: QEMU adds `-nic user` (e1000) when no network option is given, Tessera adds nothing.

use crate::config::{CharBackend, ChardevSpec, SocketAddr, SocketSpec};
use crate::error::{os_error, Error, Result};
use crate::opts::{is_help, KeyVals};
use crate::plan::{BackendPlan, Resource};
use tessera_ipc::messages::{FdIndex, Role, VhostUserNetConfig, VhostUserSocket};

pub const NET_BINARY: &str = "tessera-net";
/// The NIC model Tessera has.
pub const NIC_MODEL: &str = "virtio-net-pci";

/// NIC models QEMU 8.2 has for x86 that Tessera does not (`-nic model=help` in QEMU).
const QEMU_NIC_MODELS: &[&str] = &[
    "e1000",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "i82550",
    "i82551",
    "i82557a",
    "i82557b",
    "i82557c",
    "i82558a",
    "i82558b",
    "i82559a",
    "i82559b",
    "i82559c",
    "i82559er",
    "i82562",
    "i82801",
    "igb",
    "ne2k_pci",
    "pcnet",
    "rocker",
    "rtl8139",
    "tulip",
    "usb-net",
    "vmxnet3",
];

/// Netdev types QEMU 8.2 has that Tessera does not.
const QEMU_NETDEV_TYPES: &[&str] =
    &["af-xdp", "bridge", "dgram", "hubport", "l2tpv3", "netmap", "socket", "stream", "vde", "vhost-vdpa"];

/// `-netdev user` keys (QEMU's NetdevUserOptions), and those of them tessera-net does not serve.
const USER_KEYS: &[&str] = &[
    "hostname",
    "restrict",
    "ipv4",
    "ipv6",
    "net",
    "host",
    "tftp",
    "bootfile",
    "dhcpstart",
    "dns",
    "dnssearch",
    "domainname",
    "ipv6-prefix",
    "ipv6-prefixlen",
    "ipv6-host",
    "ipv6-dns",
    "smb",
    "smbserver",
    "hostfwd",
    "guestfwd",
    "tftp-server-name",
];
const USER_UNSUPPORTED: &[&str] = &[
    "tftp",
    "bootfile",
    "smb",
    "smbserver",
    "tftp-server-name",
    "ipv6-prefix",
    "ipv6-prefixlen",
    "ipv6-host",
    "ipv6-dns",
];
/// `-netdev tap` keys (NetdevTapOptions).
const TAP_KEYS: &[&str] = &[
    "ifname",
    "fd",
    "fds",
    "script",
    "downscript",
    "br",
    "helper",
    "sndbuf",
    "vnet_hdr",
    "vhost",
    "vhostfd",
    "vhostfds",
    "vhostforce",
    "queues",
    "poll-us",
];
const VHOST_USER_KEYS: &[&str] = &["chardev", "vhostforce", "queues"];
/// `-device virtio-net-pci` properties Tessera serves, and the other ones QEMU has (refused as not supported).
const DEVICE_KEYS: &[&str] = &["driver", "id", "netdev", "mac", "addr", "bus", "mq"];
const DEVICE_QEMU_KEYS: &[&str] = &[
    "vectors",
    "csum",
    "guest_csum",
    "gso",
    "guest_tso4",
    "guest_tso6",
    "guest_ecn",
    "guest_ufo",
    "guest_announce",
    "host_tso4",
    "host_tso6",
    "host_ecn",
    "host_ufo",
    "mrg_rxbuf",
    "status",
    "ctrl_vq",
    "ctrl_rx",
    "ctrl_vlan",
    "ctrl_rx_extra",
    "ctrl_mac_addr",
    "ctrl_guest_offloads",
    "rss",
    "hash",
    "host_mtu",
    "speed",
    "duplex",
    "failover",
    "rx_queue_size",
    "tx_queue_size",
    "tx",
    "x-txtimer",
    "x-txburst",
    "romfile",
    "rombar",
    "multifunction",
    "disable-legacy",
    "disable-modern",
    "ioeventfd",
    "event_idx",
    "indirect_desc",
    "packed",
    "iommu_platform",
    "use-disabled-flag",
    "page-per-vq",
    "bootindex",
];

/// What serves a netdev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// A tessera-net with user-mode networking; `options` are the `-netdev user` sub-options as given (QEMU's
    /// names, checked here for syntax; tessera-net checks the values again and applies them).
    User { options: Vec<(String, String)> },
    /// A tessera-net on a tap device the launcher opens (`ifname=`, or a new one the kernel names).
    Tap { ifname: Option<String> },
    /// An external vhost-user-net backend listening on this unix socket (`-chardev socket,path=`).
    VhostUser { path: String, chardev_location: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netdev {
    pub id: String,
    pub backend: NetBackend,
    /// `queues=` (tap): queue pairs the backend serves. A device exposes them with `mq=on`.
    pub queues: u16,
    /// The option that defined it, for messages.
    pub location: String,
}

/// A virtio-net-pci device and the netdev behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    pub id: String,
    pub netdev: Netdev,
    pub mac: [u8; 6],
    /// Queue pairs the guest sees: the netdev's `queues=` with `mq=on`, else 1 (QEMU's `mq` defaults to off).
    pub queue_pairs: u16,
    pub slot: Option<u8>,
    /// The option that made the device (`-nic ...` or `-device virtio-net-pci,...`).
    pub location: String,
}

/// Network options as read, resolved by [`resolve`] once every option is known.
#[derive(Clone, Debug, Default)]
pub struct NetOptions {
    /// `-netdev`s, checked as read, with the vhost-user chardev still a name.
    netdevs: Vec<(Netdev, Option<String>)>,
    /// `-nic`s.
    nics: Vec<NicOption>,
    /// `-device virtio-net-pci` options with their locations.
    devices: Vec<(KeyVals, String)>,
}

/// A `-nic` as read: the netdev it makes (id `__org.qemu.nicN`, as QEMU names it), the vhost-user chardev name,
/// `mac=` and `model=` (checked when the machine is built, as QEMU does).
#[derive(Clone, Debug)]
struct NicOption {
    netdev: Netdev,
    chardev: Option<String>,
    mac: Option<[u8; 6]>,
    model: Option<String>,
}

/// `-netdev` (an error names the option through the caller's location).
pub fn read_netdev(net: &mut NetOptions, kv: &KeyVals, location: String) -> Result<Option<String>> {
    let ty = kv.get("type").unwrap_or_default();
    if is_help(ty) {
        return Ok(Some("Available netdev backend types:\nuser\ntap\nvhost-user\n".into()));
    }
    let id = kv.get("id").ok_or_else(|| Error::MissingParameter("id".into()))?.to_string();
    let (backend, chardev) = netdev_backend(kv, ty, &["type", "id"])?;
    let queues = if ty == "tap" { queues(kv, None)? } else { 1 };
    if net.netdevs.iter().any(|(n, _)| n.id == id) {
        return Err(Error::DuplicateId { id, kind: "netdev" });
    }
    net.netdevs.push((Netdev { id, backend, queues, location }, chardev));
    Ok(None)
}

/// `-nic TYPE[,model=][,mac=][,id=][,netdev options]`.
pub fn read_nic(net: &mut NetOptions, kv: &KeyVals, location: String) -> Result<Option<String>> {
    // QEMU's -nic without a type is user networking.
    let ty = kv.get("type").unwrap_or("user");
    if is_help(ty) {
        return Ok(Some("Available netdev backend types:\nuser\ntap\nvhost-user\n".into()));
    }
    if ty == "none" {
        return Ok(None);
    }
    if kv.get("model").is_some_and(is_help) {
        return Ok(Some(format!("Supported NIC models:\n{NIC_MODEL}\n")));
    }
    let (backend, chardev) = netdev_backend(kv, ty, &["type", "id", "model", "mac"])?;
    let queues = if ty == "tap" { queues(kv, None)? } else { 1 };
    let mac = kv.get("mac").map(|m| parse_mac(m).map_err(Error::Message)).transpose()?;
    // QEMU names the netdev after `id=`, else `__org.qemu.nicN`.
    let id = kv.get("id").map(String::from).unwrap_or_else(|| format!("__org.qemu.nic{}", net.nics.len()));
    let model = kv.get("model").map(String::from);
    net.nics.push(NicOption { netdev: Netdev { id, backend, queues, location }, chardev, mac, model });
    Ok(None)
}

/// `-device virtio-net-pci` (and QEMU's alias `virtio-net`): properties checked now, the netdev found later.
pub fn read_device(net: &mut NetOptions, kv: &KeyVals, location: String) -> Result<()> {
    if let Some(k) = kv.unknown_keys(DEVICE_KEYS).next() {
        if DEVICE_QEMU_KEYS.contains(&k) {
            return Err(Error::NotSupportedYet(format!("the virtio-net-pci property '{k}'")));
        }
        return Err(Error::PropertyNotFound { owner: NIC_MODEL.into(), property: k.into() });
    }
    kv.get_bool("mq")?;
    net.devices.push((kv.clone(), location));
    Ok(())
}

/// Whether `driver` is a `-device` this module reads.
pub fn is_nic_driver(driver: &str) -> bool {
    driver == NIC_MODEL || driver == "virtio-net"
}

fn check_model(m: &str) -> Result<()> {
    match m {
        "virtio-net-pci" | "virtio" => Ok(()),
        m if QEMU_NIC_MODELS.contains(&m) => {
            Err(Error::NotSupportedYet(format!("the NIC model '{m}' (use model={NIC_MODEL})")))
        }
        // QEMU 7.2's wording (hw/pci/pci.c pci_nic_init_nofail).
        m => Err(Error::Message(format!("Unsupported NIC model: {m}"))),
    }
}

/// The backend of a `-netdev`/`-nic` of type `ty`; `own` are the option's keys besides the type's. Returns the
/// vhost-user chardev name to resolve later.
fn netdev_backend(kv: &KeyVals, ty: &str, own: &[&str]) -> Result<(NetBackend, Option<String>)> {
    let keys = |type_keys: &[&str]| -> Result<()> {
        let mut all: Vec<&str> = own.to_vec();
        all.extend_from_slice(type_keys);
        let unknown = kv.unknown_keys(&all).next().map(String::from);
        match unknown {
            Some(k) => Err(Error::InvalidParameter(k)),
            None => Ok(()),
        }
    };
    match ty {
        "user" => {
            keys(USER_KEYS)?;
            Ok((user_backend(kv, own)?, None))
        }
        "tap" => {
            keys(TAP_KEYS)?;
            Ok((tap_backend(kv)?, None))
        }
        "vhost-user" => {
            keys(VHOST_USER_KEYS)?;
            let chardev = kv.get("chardev").ok_or_else(|| Error::MissingParameter("chardev".into()))?;
            kv.get_bool("vhostforce")?;
            // The core could not keep an external backend from receiving on rings beyond the pairs the driver
            // sets (it would have to disable them); tessera-net receives on the first ring only.
            queues(kv, Some("a vhost-user netdev"))?;
            Ok((NetBackend::VhostUser { path: String::new(), chardev_location: String::new() }, Some(chardev.into())))
        }
        t if QEMU_NETDEV_TYPES.contains(&t) => Err(Error::NotSupportedYet(format!("-netdev {t}"))),
        t => Err(Error::DoesNotAccept { key: "type".into(), value: t.into() }),
    }
}

/// Most queue pairs tessera-net serves.
pub const MAX_QUEUES: u16 = 16;

/// `queues=`: queue pairs for tessera-net (`multi` false: only 1, with the reason).
fn queues(kv: &KeyVals, multi: Option<&str>) -> Result<u16> {
    match kv.get_number("queues")? {
        None | Some(1) => Ok(1),
        Some(0) => Err(Error::Message("queues property must be larger than 0".into())),
        Some(n) => match multi {
            Some(why) => Err(Error::NotSupportedYet(format!("more than one queue pair on {why} (queues=)"))),
            None if n <= u64::from(MAX_QUEUES) => Ok(n as u16),
            None => Err(Error::NotSupportedYet(format!("more than {MAX_QUEUES} queue pairs (queues=)"))),
        },
    }
}

fn user_backend(kv: &KeyVals, own: &[&str]) -> Result<NetBackend> {
    if let Some(k) = USER_UNSUPPORTED.iter().find(|k| kv.has(k)) {
        return Err(Error::NotSupportedYet(format!("the -netdev user option '{k}'")));
    }
    for k in ["restrict", "ipv4", "ipv6"] {
        kv.get_bool(k)?;
    }
    if kv.get_bool("ipv4")? == Some(false) && kv.get_bool("ipv6")? == Some(false) {
        return Err(Error::Message("IPv4 and IPv6 disabled".into()));
    }
    for (k, v) in &kv.pairs {
        match k.as_str() {
            "hostfwd" => check_hostfwd(v)?,
            "guestfwd" => check_guestfwd(v)?,
            _ => {}
        }
    }
    let options = kv.pairs.iter().filter(|(k, _)| !own.contains(&k.as_str())).cloned().collect();
    Ok(NetBackend::User { options })
}

/// QEMU's hostfwd syntax check and messages (net/slirp.c `slirp_hostfwd`):
/// `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`.
pub fn check_hostfwd(rule: &str) -> Result<()> {
    let fail = |reason: &str| Err(Error::Message(format!("Invalid host forwarding rule '{rule}' ({reason})")));
    let Some((proto, rest)) = rule.split_once(':') else { return fail("No : separators") };
    if !matches!(proto, "" | "tcp" | "udp") {
        return fail("Bad protocol name");
    }
    let Some((host_addr, rest)) = rest.split_once(':') else { return fail("Missing : separator") };
    if !host_addr.is_empty() && host_addr.parse::<std::net::Ipv4Addr>().is_err() {
        return fail("Bad host address");
    }
    let Some((host_port, guest)) = rest.split_once('-') else { return fail("Bad host port separator") };
    if host_port.parse::<u16>().is_err() {
        return fail("Bad host port");
    }
    let Some((guest_addr, guest_port)) = guest.split_once(':') else { return fail("Missing guest address") };
    if !guest_addr.is_empty() && guest_addr.parse::<std::net::Ipv4Addr>().is_err() {
        return fail("Bad guest address");
    }
    if !guest_port.parse::<u16>().is_ok_and(|p| p > 0) {
        return fail("Bad guest port");
    }
    Ok(())
}

/// `[tcp]:server:port-cmd:command`: the chardev form needs chardevs in tessera-net, which it does not have.
fn check_guestfwd(rule: &str) -> Result<()> {
    let fail = || Err(Error::Message(format!("Invalid guest forwarding rule '{rule}'")));
    let body = rule.strip_prefix("tcp:").unwrap_or(rule);
    let Some((target, dest)) = body.split_once('-') else { return fail() };
    let Some((addr, port)) = target.split_once(':') else { return fail() };
    if addr.parse::<std::net::Ipv4Addr>().is_err() || port.parse::<u16>().is_err() {
        return fail();
    }
    if !dest.starts_with("cmd:") {
        return Err(Error::NotSupportedYet("guestfwd to a chardev (only the cmd: form is)".into()));
    }
    Ok(())
}

fn tap_backend(kv: &KeyVals) -> Result<NetBackend> {
    for (k, what) in [
        ("fd", "passing a tap by descriptor (fd=)"),
        ("fds", "passing taps by descriptor (fds=)"),
        ("br", "tap on a bridge (br=)"),
        ("helper", "the tap helper (helper=)"),
        ("sndbuf", "tap sndbuf="),
        ("vhostfd", "vhost-net (vhostfd=)"),
        ("vhostfds", "vhost-net (vhostfds=)"),
        ("poll-us", "tap poll-us="),
    ] {
        if kv.has(k) {
            return Err(Error::NotSupportedYet(what.into()));
        }
    }
    for k in ["vnet_hdr", "vhost", "vhostforce"] {
        if kv.get_bool(k)? == Some(true) {
            return Err(Error::NotSupportedYet(format!("tap {k}=on")));
        }
    }
    // QEMU runs /etc/qemu-ifup and /etc/qemu-ifdown unless told `no`; Tessera runs no scripts yet.
    for (k, default) in [("script", "/etc/qemu-ifup"), ("downscript", "/etc/qemu-ifdown")] {
        match kv.get(k) {
            Some("no") | Some("") => {}
            Some(s) => return Err(Error::NotSupportedYet(format!("running the tap {k} '{s}' (use {k}=no)"))),
            None => {
                return Err(Error::NotSupportedYet(format!(
                    "running the tap {k} (QEMU's default is {default}; use {k}=no)"
                )))
            }
        }
    }
    let ifname = kv.get("ifname").filter(|n| !n.is_empty()).map(String::from);
    if let Some(n) = &ifname {
        if n.len() >= libc::IFNAMSIZ {
            return Err(Error::Message(format!("Interface name '{n}' is too long (at most 15 bytes)")));
        }
    }
    Ok(NetBackend::Tap { ifname })
}

/// A MAC address as QEMU's `net_parse_macaddr` takes it; QEMU's messages.
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let mut mac = [0u8; 6];
    let ok = parts.len() == 6
        && parts
            .iter()
            .zip(mac.iter_mut())
            .all(|(p, b)| (1..=2).contains(&p.len()) && u8::from_str_radix(p, 16).map(|v| *b = v).is_ok());
    if !ok {
        return Err("invalid syntax for ethernet address".into());
    }
    if mac[0] & 1 != 0 {
        return Err("NIC cannot have multicast MAC address".into());
    }
    Ok(mac)
}

/// QEMU's default MACs: 52:54:00:12:34:56, then ...:57 and so on, one per NIC without `mac=` in creation order.
fn default_mac(index: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index as u8)]
}

/// Resolve the network options against the chardevs: the NICs in QEMU's creation order (`-nic`s with the
/// machine, then `-device`s), and warnings for netdevs no device uses (QEMU: "netdev n0 has no peer").
pub fn resolve(net: &NetOptions, chardevs: &[ChardevSpec], warnings: &mut Vec<String>) -> Result<Vec<Nic>> {
    let vhost_user = |mut nd: Netdev, chardev: &Option<String>| -> Result<Netdev> {
        if let Some(name) = chardev {
            let at = |e: Error| e.at(nd.location.clone());
            let Some(spec) = chardevs.iter().find(|c| &c.id == name) else {
                return Err(at(Error::Message(format!("chardev \"{name}\" not found"))));
            };
            let path = match &spec.backend {
                CharBackend::Socket(SocketSpec { addr: SocketAddr::Unix(p), server: false, .. }) => p.clone(),
                _ => {
                    return Err(at(Error::NotSupportedYet(format!(
                        "vhost-user over chardev '{name}': only a unix socket client (-chardev socket,path=...) is \
                         supported"
                    ))))
                }
            };
            nd.backend = NetBackend::VhostUser { path, chardev_location: spec.location.clone() };
        }
        Ok(nd)
    };
    let mut nics = Vec::new();
    let mut auto_macs = 0;
    let mut next_mac = |given: Option<[u8; 6]>| {
        given.unwrap_or_else(|| {
            auto_macs += 1;
            default_mac(auto_macs - 1)
        })
    };
    for nic in &net.nics {
        let nd = vhost_user(nic.netdev.clone(), &nic.chardev)?;
        let mac = nic.mac;
        // -nic has no `mq`: one pair, as in QEMU.
        nics.push(Nic {
            id: nd.id.clone(),
            location: nd.location.clone(),
            mac: next_mac(mac),
            queue_pairs: 1,
            slot: None,
            netdev: nd,
        });
    }
    // Models are checked when the machine creates the NICs, after every -netdev (no location, as in QEMU).
    for nic in &net.nics {
        if let Some(m) = &nic.model {
            check_model(m)?;
        }
    }
    let mut used: Vec<&str> = Vec::new();
    for (kv, loc) in &net.devices {
        let at = |e: Error| e.at(loc.clone());
        let netdev = match kv.get("netdev") {
            Some(id) => id,
            None => return Err(at(Error::NotSupportedYet("a virtio-net-pci without netdev= (no peer)".into()))),
        };
        let Some((nd, chardev)) = net.netdevs.iter().find(|(n, _)| n.id == netdev) else {
            return Err(at(Error::Message(format!("Property 'virtio-net-device.netdev' can't find value '{netdev}'"))));
        };
        if used.contains(&netdev) {
            return Err(at(Error::Message(format!(
                "Property 'virtio-net-device.netdev' can't take value '{netdev}', it's in use"
            ))));
        }
        used.push(netdev);
        let mac = match kv.get("mac") {
            None => None,
            Some(m) => Some(parse_mac(m).map_err(|_| {
                at(Error::Message(format!("Property 'virtio-net-device.mac' doesn't take value '{m}'")))
            })?),
        };
        let (_, slot) = crate::config::pci_props(kv, NIC_MODEL).map_err(at)?;
        let nd = vhost_user(nd.clone(), chardev)?;
        let mq = kv.get_bool("mq").map_err(at)?.unwrap_or(false);
        nics.push(Nic {
            id: kv.get("id").unwrap_or(netdev).to_string(),
            queue_pairs: if mq { nd.queues } else { 1 },
            netdev: nd,
            mac: next_mac(mac),
            slot,
            location: loc.clone(),
        });
    }
    for (nd, chardev) in &net.netdevs {
        if !used.contains(&nd.id.as_str()) {
            // A vhost-user netdev's chardev must exist even without a device (QEMU connects it at -netdev).
            vhost_user(nd.clone(), chardev)?;
            warnings.push(format!("warning: netdev {} has no peer", nd.id));
        }
    }
    Ok(nics)
}

/// The NICs' part of the plan: a tessera-net per user/tap netdev (listening socket at fd 3, the tap at fd 4)
/// and the core's connection to it, or the core's connection to an external backend. `add` appends a resource
/// to the plan and returns its number; `core_fds` is the core's descriptor list.
pub fn plan(
    nics: &[Nic],
    add: &mut dyn FnMut(Resource) -> usize,
    core_fds: &mut Vec<usize>,
    backends: &mut Vec<BackendPlan>,
) -> Vec<VhostUserNetConfig> {
    let mut attach = |res: usize| {
        core_fds.push(res);
        FdIndex((core_fds.len() - 1) as u32)
    };
    let mut out = Vec::new();
    for (n, nic) in nics.iter().enumerate() {
        let mac = nic.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        let (socket, external) = match &nic.netdev.backend {
            NetBackend::VhostUser { path, chardev_location } => {
                let r =
                    add(Resource::Connect { addr: SocketAddr::Unix(path.clone()), location: chardev_location.clone() });
                (attach(r), true)
            }
            backend => {
                let listener = add(Resource::NetListener(n));
                let mut fds = vec![listener];
                let mut args: Vec<String> = vec!["--socket-fd".into(), "3".into(), "--mac".into(), mac.clone()];
                if nic.queue_pairs > 1 {
                    args.extend(["--num-queues".into(), nic.queue_pairs.to_string()]);
                }
                match backend {
                    NetBackend::User { options } => {
                        args.push("--user".into());
                        args.push(join_options(options));
                    }
                    NetBackend::Tap { ifname } => {
                        fds.push(add(Resource::Tap { ifname: ifname.clone(), location: nic.netdev.location.clone() }));
                        args.extend(["--tap-fd".into(), "4".into()]);
                    }
                    NetBackend::VhostUser { .. } => {}
                }
                let conn = add(Resource::NetConnect(n));
                backends.push(BackendPlan {
                    role: Role::Net,
                    binary: NET_BINARY,
                    // The label names the device as the core knows it, which is how restarts and QMP find it.
                    label: format!("{NET_BINARY} ({})", nic.id),
                    fds,
                    args,
                });
                (attach(conn), false)
            }
        };
        out.push(VhostUserNetConfig {
            id: nic.id.clone(),
            socket: VhostUserSocket::Connected(socket),
            mac: nic.mac,
            queue_pairs: nic.queue_pairs,
            slot: nic.slot,
            external,
            origin: nic.location.clone(),
        });
    }
    out
}

/// Sub-options back in QEMU's syntax for tessera-net's `--user` (commas in values doubled).
fn join_options(options: &[(String, String)]) -> String {
    options.iter().map(|(k, v)| format!("{k}={}", v.replace(',', ",,"))).collect::<Vec<_>>().join(",")
}

/// The abstract unix address of the vhost-user socket of tessera-net number `n`: private to this launcher.
pub fn socket_addr(n: usize) -> Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("tessera-{}-net{n}", std::process::id());
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| Error::host("naming the vhost-user socket of tessera-net", os_error(e)))
}

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);

/// Open the tap `ifname` (or a new one the kernel names) as QEMU's `tap_open` does: `/dev/net/tun`,
/// `TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (the virtio-net header carries checksum and segmentation
/// offloads between guest and host; tessera-net sets its size and the offloads). QEMU's messages.
pub fn open_tap(ifname: Option<&str>) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|e| Error::Message(format!("could not open /dev/net/tun: {}", crate::error::strerror(&e))))?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.unwrap_or("");
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back the name into) the ifreq we own, on the tun device we opened.
    if let Err(e) = unsafe { tun_set_iff(file.as_raw_fd(), &req) } {
        return Err(Error::Message(format!(
            "could not configure /dev/net/tun ({name}): {}",
            crate::error::strerror(&os_error(e))
        )));
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfwd_rules_as_qemu_checks_them() {
        for ok in ["tcp::2222-:22", "udp:127.0.0.1:5555-10.0.2.15:5555", "::80-:8080", "tcp:0.0.0.0:0-:1"] {
            assert!(check_hostfwd(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("bad", "No : separators"),
            ("foo::22-:22", "Bad protocol name"),
            ("tcp:22", "Missing : separator"),
            ("tcp:x:22-:22", "Bad host address"),
            ("tcp::22", "Bad host port separator"),
            ("tcp::70000-:22", "Bad host port"),
            ("tcp::22-1.2.3.4", "Missing guest address"),
            ("tcp::22-x:1", "Bad guest address"),
            ("tcp::22-:0", "Bad guest port"),
        ] {
            let e = check_hostfwd(bad).unwrap_err().to_string();
            assert_eq!(e, format!("Invalid host forwarding rule '{bad}' ({why})"));
        }
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("52:54:00:ab:cd:ef"), Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(parse_mac("zz").unwrap_err(), "invalid syntax for ethernet address");
        assert_eq!(parse_mac("01:00:00:00:00:01").unwrap_err(), "NIC cannot have multicast MAC address");
        assert_eq!(default_mac(1), [0x52, 0x54, 0, 0x12, 0x34, 0x57]);
    }

    #[test]
    fn user_options_keep_commas() {
        let options = vec![("guestfwd".to_string(), "tcp:10.0.2.100:1-cmd:printf a,b".to_string())];
        assert_eq!(join_options(&options), "guestfwd=tcp:10.0.2.100:1-cmd:printf a,,b");
    }
}
