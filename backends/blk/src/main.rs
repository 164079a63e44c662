//! `tessera-blk`: args -> validated config -> open image -> serve the vhost-user socket forever.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};
use tessera_blk::config::{Args, BlkConfig, SocketSource};
use tessera_blk::image::open_image;
use tessera_blk::vhost_user::{serve_fd, serve_listener, BlkDevice};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match BlkConfig::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let disk = match open_image(&config.image) {
        Ok(d) => Arc::<dyn tessera_blk::image::BlockIo>::from(d),
        Err(e) => return fail(&e),
    };
    info!(
        "serving {} ({} bytes{}) with {} queue(s)",
        config.image.path.display(),
        disk.size(),
        if config.image.read_only { ", read-only" } else { "" },
        config.num_queues
    );
    // A socket path is bound before the sandbox hides every path (the launcher passes a bound one instead).
    let socket = match &config.socket {
        SocketSource::Path(p) => match vhost::vhost_user::Listener::new(p, true) {
            Ok(l) => Socket::Bound(l, p.clone()),
            Err(e) => return fail(&tessera_blk::Error::Listen { path: p.clone(), reason: e.to_string() }),
        },
        SocketSource::Fd(fd) => Socket::Inherited(*fd),
    };
    // Confined once the image and the socket are open and before any thread starts or anything is read from
    // the front end (docs/SECURITY.md).
    if let Err(code) = confine() {
        return code;
    }
    #[cfg(feature = "misbehave")]
    tessera_policy::hostile::misbehave_from_env("blk");
    tessera_blk::signals::flush_on_termination(disk.clone());
    let dev = Arc::new(BlkDevice {
        disk,
        props: config.props.clone(),
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        io_threads: config.io_threads,
        direct: config.image.direct,
        io_uring: config.aio == tessera_blk::config::Aio::IoUring,
    });
    let served = match socket {
        Socket::Bound(l, p) => serve_listener(l, &p, dev),
        Socket::Inherited(fd) => serve_fd(fd, dev),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// The vhost-user socket once the configuration is applied: bound here (`--socket-path`) or inherited.
enum Socket {
    Bound(vhost::vhost_user::Listener, std::path::PathBuf),
    Inherited(i32),
}

fn fail(e: &tessera_blk::Error) -> ExitCode {
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

/// Confines this process with the `blk` profile when `TESSERA_SANDBOX` asks for it: the launcher always sets
/// it (`-sandbox on|off`, `-runas`, `-chroot`); a tessera-blk started by hand (standalone under QEMU) is left
/// as it was unless the user sets it (`TESSERA_SANDBOX=v1,on`). Every descriptor open now is kept: what the
/// launcher passed (the listening socket, the image, its liveness link; its `pre_exec` hook closed the rest)
/// and what this process opened for its job (the image and its backing files, the bound socket).
fn confine() -> Result<(), ExitCode> {
    if std::env::var_os(tessera_policy::SANDBOX_ENV).is_none() {
        return Ok(());
    }
    let sandbox_error = |e: &tessera_policy::PolicyError| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        error!("{}", msg.strip_prefix("tessera-blk: ").unwrap_or(&msg));
        ExitCode::FAILURE
    };
    let entered = tessera_policy::open_descriptors()
        .and_then(|keep| tessera_policy::enter_from_env(tessera_policy::ProcessKind::Blk, &keep));
    match entered {
        Ok(report) => {
            for w in &report.warnings {
                log::warn!("sandbox: {w}");
            }
            log::debug!("{report}");
            Ok(())
        }
        Err(e) => Err(sandbox_error(&e)),
    }
}
