//! `tessera-net`: args -> validated config -> host side (libslirp or tap) -> serve forever.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};
use tessera_net::config::{Args, NetConfig};
use tessera_net::vhost_user::{serve, NetDevice};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match NetConfig::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    // Confined before the network thread starts (a namespace cannot be entered by a threaded process) and
    // before anything is read from the guest or the front end (docs/SECURITY.md).
    if let Err(code) = confine(&config) {
        return code;
    }
    #[cfg(feature = "misbehave")]
    tessera_policy::hostile::misbehave_from_env("net");
    let net = match tessera_net::netloop::start(config.host.clone()) {
        Ok(n) => n,
        Err(e) => return fail(&e),
    };
    let m = config.mac;
    info!(
        "serving virtio-net (mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}) on {}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        config.socket_path.display()
    );
    let dev =
        Arc::new(NetDevice { mac: config.mac, queue_pairs: config.queue_pairs, queue_size: config.queue_size, net });
    match serve(&config.socket_path, dev) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &tessera_net::Error) -> ExitCode {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    error!("{msg}");
    ExitCode::FAILURE
}

/// Confines this process when `TESSERA_SANDBOX` asks for it (the launcher always sets it; a tessera-net
/// started by hand is left as it was unless the user sets it, e.g. `TESSERA_SANDBOX=v1,on`): the `net-user`
/// profile for user-mode networking (host sockets, the host's network namespace), `net` for a tap (its
/// descriptor only, an empty network namespace). Every descriptor open now is kept: what the launcher passed
/// (the listening socket, the tap; its `pre_exec` hook closed the rest).
fn confine(config: &NetConfig) -> Result<(), ExitCode> {
    use tessera_net::config::HostSide;
    use tessera_policy::ProcessKind;
    if std::env::var_os(tessera_policy::SANDBOX_ENV).is_none() {
        return Ok(());
    }
    let refuse = |why: &str| {
        error!("the sandbox is on (TESSERA_SANDBOX): {why}");
        ExitCode::FAILURE
    };
    let kind = match &config.host {
        HostSide::User(u) => {
            if !u.guestfwd.is_empty() {
                return Err(refuse("guestfwd=...-cmd: starts a program, which a confined tessera-net cannot"));
            }
            ProcessKind::NetUser
        }
        HostSide::TapFd(_) => ProcessKind::Net,
        HostSide::Tap(name) => {
            return Err(refuse(&format!(
                "--tap {name} opens /dev/net/tun by path, which the sandbox hides: pass the open tap with --tap-fd"
            )))
        }
    };
    match tessera_policy::open_descriptors().and_then(|keep| tessera_policy::enter_from_env(kind, &keep)) {
        Ok(report) => {
            for w in &report.warnings {
                log::warn!("sandbox: {w}");
            }
            log::debug!("{report}");
            Ok(())
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            error!("{}", msg.strip_prefix("tessera-net: ").unwrap_or(&msg));
            Err(ExitCode::FAILURE)
        }
    }
}
