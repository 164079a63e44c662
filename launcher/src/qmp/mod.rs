//! The QMP monitor (QEMU Machine Protocol, QEMU docs/interop/qmp-spec.rst), served by the launcher:
//! * [`json`]: the byte stream to JSON values, with QEMU's relaxed syntax and error recovery;
//! * [`commands`]: the command table and QEMU's input checks;
//! * [`server`]: listening sockets, one client at a time per monitor, negotiation, replies and events.
//!
//! Options: `-qmp unix:PATH,server=on[,wait=off]`, `-qmp tcp:HOST:PORT,server=on[,wait=off]`, and
//! `-chardev socket,id=ID,path=...|host=..,port=..,server=on[,wait=off] -mon chardev=ID,mode=control[,pretty=on]`.
//! Guest-facing commands go to the core as `LauncherToChild::Monitor`; see docs/qmp.md.

pub mod commands;
pub mod json;
pub mod server;

use crate::config::{CharBackend, ChardevSpec, SocketSpec};
use crate::error::{Error, Result};
use crate::opts::KeyVals;

/// One QMP monitor: a listening socket the launcher serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorSpec {
    pub socket: SocketSpec,
    /// `pretty=on` (`-mon`): replies and events indented.
    pub pretty: bool,
    /// The option that asked for it, for messages.
    pub location: String,
}

/// A monitor option as read, resolved against the chardevs once all options are known.
#[derive(Clone, Debug)]
pub enum RawMonitor {
    Qmp { spec: String, location: String },
    Mon { chardev: String, pretty: bool, location: String },
}

/// `-mon`'s keys (QEMU 8.2 qemu_mon_opts).
const MON_KEYS: &[&str] = &["mode", "chardev", "pretty"];

/// `-mon chardev=ID[,mode=control][,pretty=on]`, checked as QEMU checks it.
pub fn mon_option(kv: &KeyVals, location: String) -> Result<RawMonitor> {
    kv.check_keys(MON_KEYS)?;
    let pretty = kv.get_bool("pretty")?.unwrap_or(false);
    match kv.get("mode").unwrap_or("readline") {
        "control" => {}
        "readline" => {
            return Err(Error::NotSupportedYet(
                "the human monitor (HMP, -mon mode=readline); use mode=control for QMP".into(),
            ))
        }
        other => return Err(Error::DoesNotAccept { key: "mode".into(), value: other.into() }),
    }
    let Some(chardev) = kv.get("chardev") else { return Err(Error::MissingParameter("chardev".into())) };
    Ok(RawMonitor::Mon { chardev: chardev.to_string(), pretty, location })
}

/// Resolve the monitor options: `-qmp` specs are parsed like `-serial` ones, `-mon` names a `-chardev`. Only
/// listening sockets are served; the chardevs a monitor uses are not started as tessera-chardev processes
/// (the launcher itself is the monitor's front end).
pub fn resolve(raws: &[RawMonitor], chardevs: &[ChardevSpec], serial_ids: &[String]) -> Result<Vec<MonitorSpec>> {
    let mut out = Vec::new();
    for raw in raws {
        let (backend, pretty, location, what) = match raw {
            RawMonitor::Qmp { spec, location } => {
                let backend = match crate::config::serial_spec(spec).map_err(|e| e.at(location.clone()))? {
                    crate::config::SerialSpec::New(backend, false) => backend,
                    _ => {
                        return Err(Error::NotSupportedYet(format!(
                            "a QMP monitor on '{spec}' (use unix:PATH,server=on or tcp:HOST:PORT,server=on)"
                        ))
                        .at(location.clone()))
                    }
                };
                (backend, false, location, spec.clone())
            }
            RawMonitor::Mon { chardev, pretty, location } => {
                let Some(c) = chardevs.iter().find(|c| &c.id == chardev) else {
                    return Err(Error::Message(format!("chardev \"{chardev}\" not found")).at(location.clone()));
                };
                if serial_ids.contains(chardev) || out.iter().any(|m: &(MonitorSpec, String)| &m.1 == chardev) {
                    return Err(Error::Message(format!("Device '{chardev}' is in use")).at(location.clone()));
                }
                (c.backend.clone(), *pretty, location, chardev.clone())
            }
        };
        let socket = match backend {
            CharBackend::Socket(s) if s.server && !s.telnet => s,
            _ => {
                return Err(Error::NotSupportedYet(format!(
                    "a QMP monitor on '{what}': Tessera serves QMP on listening unix or tcp sockets \
                     (server=on) only"
                ))
                .at(location.clone()))
            }
        };
        out.push((MonitorSpec { socket, pretty, location: location.clone() }, what));
    }
    Ok(out.into_iter().map(|(m, _)| m).collect())
}
