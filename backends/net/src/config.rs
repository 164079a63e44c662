//! Command-line flags of `tessera-net` and their validation, including QEMU's `-netdev user`
//! sub-options (QEMU manual, "-netdev user"), with QEMU's defaults.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{ArgGroup, Parser};

use crate::error::{Error, Result};

/// Most queue pairs for tap (each pair is one tap queue and one worker).
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// Serve a virtio-net device to a vhost-user front end (QEMU's `-netdev vhost-user`, tessera-core).
#[derive(Debug, Parser)]
#[command(name = "tessera-net", version)]
#[command(group(ArgGroup::new("socket").required(true).args(["socket_path", "socket_fd"])))]
pub struct Args {
    /// Path of the vhost-user UNIX socket to listen on (replaced if it exists).
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// An inherited, already listening UNIX socket to serve instead (the launcher binds it before
    /// starting tessera-net, so the process needs no file system access for it).
    #[arg(long, value_name = "N")]
    pub socket_fd: Option<RawFd>,
    /// User-mode networking (the default), with QEMU's `-netdev user` sub-options, comma
    /// separated: net=, host=, dhcpstart=, dns=, hostfwd= (repeatable), guestfwd=cmd:,
    /// restrict=, hostname=, domainname=, dnssearch=, ipv4=, ipv6=.
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    pub user: Option<String>,
    /// Open the tap interface IFNAME (needs CAP_NET_ADMIN, or a tap owned by this user).
    #[arg(long, value_name = "IFNAME")]
    pub tap: Option<String>,
    /// Use the tap device already open on descriptor N (opened by a privileged parent).
    #[arg(long, value_name = "N")]
    pub tap_fd: Option<RawFd>,
    /// MAC address reported in the virtio-net config space (front ends that take it from the
    /// backend); QEMU's virtio-net-pci uses its own `mac=` property.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    pub mac: String,
    /// Queue pairs. All pairs share the one host side (one network thread; multiqueue tap with a
    /// tap queue per pair is not implemented yet): more pairs let an SMP guest transmit from
    /// each vCPU without contention, not more throughput.
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,
    /// Largest virtqueue size the front end may configure (power of two).
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,
}

/// A `hostfwd=` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFwd {
    pub udp: bool,
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    /// `None`: the first DHCP address (as QEMU does for an empty guest address).
    pub guest_addr: Option<Ipv4Addr>,
    pub guest_port: u16,
}

/// A `guestfwd=` rule: connections from the guest to `addr:port` run `command` with the
/// connection on its standard input and output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestFwd {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub command: String,
}

/// User-mode network configuration, defaults as in QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserConfig {
    pub net: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub host: Ipv4Addr,
    pub dhcp_start: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub restrict: bool,
    pub ipv4: bool,
    pub ipv6: bool,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub dnssearch: Vec<String>,
    pub hostfwd: Vec<HostFwd>,
    pub guestfwd: Vec<GuestFwd>,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig {
            net: Ipv4Addr::new(10, 0, 2, 0),
            mask: Ipv4Addr::new(255, 255, 255, 0),
            host: Ipv4Addr::new(10, 0, 2, 2),
            dhcp_start: Ipv4Addr::new(10, 0, 2, 15),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            restrict: false,
            ipv4: true,
            ipv6: true,
            hostname: None,
            domainname: None,
            dnssearch: Vec::new(),
            hostfwd: Vec::new(),
            guestfwd: Vec::new(),
        }
    }
}

/// Where frames go on the host side.
#[derive(Clone, Debug)]
pub enum HostSide {
    User(Box<UserConfig>),
    /// A tap interface to open by name.
    Tap(String),
    /// An already open tap descriptor.
    TapFd(RawFd),
}

/// Where the vhost-user socket comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// Bind this path (replacing a file there).
    Path(PathBuf),
    /// Serve this inherited listening socket.
    Fd(RawFd),
}

impl std::fmt::Display for SocketSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketSource::Path(p) => write!(f, "{}", p.display()),
            SocketSource::Fd(fd) => write!(f, "socket fd {fd}"),
        }
    }
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub socket: SocketSource,
    pub host: HostSide,
    pub mac: [u8; 6],
    pub queue_pairs: u16,
    pub queue_size: u16,
}

impl TryFrom<Args> for NetConfig {
    type Error = Error;

    fn try_from(a: Args) -> Result<Self> {
        let chosen = usize::from(a.user.is_some()) + usize::from(a.tap.is_some()) + usize::from(a.tap_fd.is_some());
        if chosen > 1 {
            return Err(Error::BackendChoice);
        }
        let host = if let Some(name) = a.tap {
            HostSide::Tap(name)
        } else if let Some(fd) = a.tap_fd {
            // SAFETY: F_GETFD only queries the descriptor's flags; any integer is fine to pass.
            if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(Error::TapFd(fd));
            }
            HostSide::TapFd(fd)
        } else {
            HostSide::User(Box::new(parse_user_options(a.user.as_deref().unwrap_or(""))?))
        };
        if a.num_queues == 0 || a.num_queues > MAX_QUEUE_PAIRS {
            return Err(Error::NumQueues { got: a.num_queues, max: MAX_QUEUE_PAIRS });
        }
        if a.queue_size < 2 || !a.queue_size.is_power_of_two() {
            return Err(Error::QueueSize(a.queue_size));
        }
        let socket = match (a.socket_path, a.socket_fd) {
            (Some(p), _) => SocketSource::Path(p),
            (None, Some(fd)) => SocketSource::Fd(fd),
            // clap's "socket" group requires one of them.
            (None, None) => return Err(Error::NoSocket),
        };
        Ok(NetConfig { socket, host, mac: parse_mac(&a.mac)?, queue_pairs: a.num_queues, queue_size: a.queue_size })
    }
}

/// `52:54:00:12:34:56` (or with `-`); a multicast address cannot be a station's.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(Error::Mac(s.to_owned()));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(Error::Mac(s.to_owned()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| Error::Mac(s.to_owned()))?;
    }
    if mac[0] & 1 != 0 {
        return Err(Error::Mac(s.to_owned()));
    }
    Ok(mac)
}

/// Splits a QEMU option string at commas, `,,` standing for a literal comma (QEMU's escaping).
fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out.into_iter().filter(|o| !o.is_empty()).collect()
}

fn bad(option: &str, reason: impl Into<String>) -> Error {
    Error::UserOption { option: option.to_owned(), reason: reason.into() }
}

fn on_off(option: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(bad(option, "expected on or off")),
    }
}

fn ipv4(option: &str, v: &str) -> Result<Ipv4Addr> {
    v.parse().map_err(|_| bad(option, format!("'{v}' is not an IPv4 address")))
}

/// Parses `--user` options. Addresses not given follow `net=` as in QEMU: host .2, DNS .3,
/// first DHCP address .15.
pub fn parse_user_options(s: &str) -> Result<UserConfig> {
    let mut c = UserConfig::default();
    let (mut host, mut dhcp, mut dns) = (None, None, None);
    for opt in split_options(s) {
        let (key, value) = opt.split_once('=').unwrap_or((opt.as_str(), ""));
        match key {
            // QEMU's netdev id: meaningless for a standalone backend, accepted for copy-paste.
            "id" => {}
            "net" => {
                let (addr, mask) = match value.split_once('/') {
                    Some((a, m)) => {
                        let mask = if let Ok(bits) = m.parse::<u32>() {
                            if bits > 32 {
                                return Err(bad(&opt, "prefix length above 32"));
                            }
                            Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
                        } else {
                            ipv4(&opt, m)?
                        };
                        (ipv4(&opt, a)?, mask)
                    }
                    // QEMU without a mask: /24.
                    None => (ipv4(&opt, value)?, Ipv4Addr::new(255, 255, 255, 0)),
                };
                let m = u32::from(mask);
                if m.leading_ones() + m.trailing_zeros() != 32 {
                    return Err(bad(&opt, "the mask is not contiguous"));
                }
                if m.trailing_zeros() < 2 {
                    return Err(bad(&opt, "the network is too small (at most /30)"));
                }
                c.net = Ipv4Addr::from(u32::from(addr) & m);
                c.mask = mask;
            }
            "host" => host = Some(ipv4(&opt, value)?),
            "dhcpstart" => dhcp = Some(ipv4(&opt, value)?),
            "dns" => dns = Some(ipv4(&opt, value)?),
            "restrict" => c.restrict = on_off(&opt, value)?,
            "ipv4" => c.ipv4 = on_off(&opt, value)?,
            "ipv6" => c.ipv6 = on_off(&opt, value)?,
            "hostname" => c.hostname = Some(value.to_owned()),
            "domainname" => c.domainname = Some(value.to_owned()),
            "dnssearch" => c.dnssearch.push(value.to_owned()),
            "hostfwd" => c.hostfwd.push(parse_hostfwd(&opt, value)?),
            "guestfwd" => c.guestfwd.push(parse_guestfwd(&opt, value)?),
            "tftp" | "bootfile" | "smb" | "smbserver" | "tftp-server-name" | "ipv6-net" | "ipv6-host" | "ipv6-dns"
            | "ipv6-prefix" | "ipv6-prefixlen" | "dhcpend" => return Err(Error::UserOptionUnsupported(key.to_owned())),
            _ => return Err(bad(&opt, "unknown option")),
        }
    }
    let net = u32::from(c.net);
    let mask = u32::from(c.mask);
    let inside = |a: Ipv4Addr| u32::from(a) & mask == net;
    c.host = host.unwrap_or(Ipv4Addr::from(net | 2));
    c.dns = dns.unwrap_or(Ipv4Addr::from(net | 3));
    c.dhcp_start = dhcp.unwrap_or(Ipv4Addr::from(net | 15));
    for (name, a) in [("host", c.host), ("dns", c.dns), ("dhcpstart", c.dhcp_start)] {
        if !inside(a) {
            return Err(bad(&format!("{name}={a}"), format!("not inside the network {}/{}", c.net, c.mask)));
        }
    }
    if !c.ipv4 && !c.ipv6 {
        return Err(bad("ipv4=off,ipv6=off", "at least one of IPv4 and IPv6 must be on"));
    }
    Ok(c)
}

fn parse_port(option: &str, p: &str) -> Result<u16> {
    p.parse().map_err(|_| bad(option, format!("'{p}' is not a port number")))
}

/// `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport` (QEMU manual, hostfwd).
fn parse_hostfwd(option: &str, v: &str) -> Result<HostFwd> {
    let (host, guest) =
        v.split_once('-').ok_or_else(|| bad(option, "expected [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport"))?;
    let mut h: Vec<&str> = host.split(':').collect();
    let udp = match h.first().copied() {
        Some("tcp") if h.len() == 3 => {
            h.remove(0);
            false
        }
        Some("udp") if h.len() == 3 => {
            h.remove(0);
            true
        }
        Some("") if h.len() == 3 => {
            h.remove(0);
            false
        }
        _ if h.len() == 2 => false,
        _ => return Err(bad(option, "expected [tcp|udp]:[hostaddr]:hostport before '-'")),
    };
    let host_addr = if h[0].is_empty() { Ipv4Addr::UNSPECIFIED } else { ipv4(option, h[0])? };
    let host_port = parse_port(option, h[1])?;
    let (ga, gp) = guest.split_once(':').ok_or_else(|| bad(option, "expected [guestaddr]:guestport after '-'"))?;
    let guest_addr = if ga.is_empty() { None } else { Some(ipv4(option, ga)?) };
    let guest_port = parse_port(option, gp)?;
    if guest_port == 0 {
        return Err(bad(option, "the guest port cannot be 0"));
    }
    Ok(HostFwd { udp, host_addr, host_port, guest_addr, guest_port })
}

/// `[tcp]:server:port-cmd:command`. QEMU's other form, `-dev` (a chardev), needs chardevs,
/// which a standalone backend does not have.
fn parse_guestfwd(option: &str, v: &str) -> Result<GuestFwd> {
    let v = v.strip_prefix("tcp:").unwrap_or(v);
    let (target, rest) = v.split_once('-').ok_or_else(|| bad(option, "expected [tcp]:server:port-cmd:command"))?;
    let (addr, port) = target.split_once(':').ok_or_else(|| bad(option, "expected server:port before '-'"))?;
    let Some(command) = rest.strip_prefix("cmd:") else {
        return Err(bad(option, "only the cmd:COMMAND form is supported by tessera-net (chardev targets are not)"));
    };
    if command.is_empty() {
        return Err(bad(option, "empty command"));
    }
    Ok(GuestFwd { addr: ipv4(option, addr)?, port: parse_port(option, port)?, command: command.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_qemu() {
        let c = parse_user_options("").unwrap();
        assert_eq!(c, UserConfig::default());
        let c = parse_user_options("net=192.168.76.0/24").unwrap();
        assert_eq!(c.host, Ipv4Addr::new(192, 168, 76, 2));
        assert_eq!(c.dns, Ipv4Addr::new(192, 168, 76, 3));
        assert_eq!(c.dhcp_start, Ipv4Addr::new(192, 168, 76, 15));
        let c = parse_user_options("net=10.9.0.0/255.255.0.0,host=10.9.0.1").unwrap();
        assert_eq!(c.mask, Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(c.host, Ipv4Addr::new(10, 9, 0, 1));
    }

    #[test]
    fn hostfwd_forms() {
        let c = parse_user_options("hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5555-10.0.2.15:5555,hostfwd=:8080-:80")
            .unwrap();
        assert_eq!(
            c.hostfwd[0],
            HostFwd { udp: false, host_addr: Ipv4Addr::LOCALHOST, host_port: 2222, guest_addr: None, guest_port: 22 }
        );
        assert!(c.hostfwd[1].udp);
        assert_eq!(c.hostfwd[1].guest_addr, Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(c.hostfwd[2].host_port, 8080);
        for bad in ["hostfwd=tcp:1.2.3.4:22", "hostfwd=sctp::1-:2", "hostfwd=tcp::x-:22", "hostfwd=tcp::1-:0"] {
            assert!(matches!(parse_user_options(bad), Err(Error::UserOption { .. })), "{bad}");
        }
    }

    #[test]
    fn guestfwd_and_escaping() {
        let c = parse_user_options("guestfwd=tcp:10.0.2.100:1234-cmd:printf a,,b").unwrap();
        assert_eq!(c.guestfwd[0].command, "printf a,b");
        assert!(parse_user_options("guestfwd=tcp:10.0.2.100:1234-chardev0").is_err());
    }

    #[test]
    fn bad_input_is_named() {
        let e = parse_user_options("host=10.0.3.2").unwrap_err().to_string();
        assert!(e.contains("host=10.0.3.2"), "{e}");
        assert!(parse_user_options("restrict=maybe").is_err());
        assert!(parse_user_options("net=10.0.2.0/31").is_err());
        assert!(parse_user_options("net=10.0.2.0/255.0.255.0").is_err());
        assert!(matches!(parse_user_options("tftp=/srv"), Err(Error::UserOptionUnsupported(_))));
        assert!(parse_user_options("frobnicate=1").is_err());
        assert!(parse_mac("01:00:00:00:00:01").is_err());
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert_eq!(parse_mac("52-54-00-12-34-56").unwrap(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    }
}
