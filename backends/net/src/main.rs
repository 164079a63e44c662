//! `tessera-net`: args -> validated config -> host side (libslirp or tap) -> serve forever.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};
use tessera_net::config::{Args, NetConfig, SocketSource};
use tessera_net::vhost_user::{serve, serve_fd, NetDevice};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match NetConfig::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let net = match tessera_net::netloop::start(config.host.clone()) {
        Ok(n) => n,
        Err(e) => return fail(&e),
    };
    let m = config.mac;
    info!(
        "serving virtio-net (mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}) on {}",
        m[0], m[1], m[2], m[3], m[4], m[5], config.socket
    );
    let dev =
        Arc::new(NetDevice { mac: config.mac, queue_pairs: config.queue_pairs, queue_size: config.queue_size, net });
    let served = match &config.socket {
        SocketSource::Path(p) => serve(p, dev),
        SocketSource::Fd(fd) => serve_fd(*fd, dev),
    };
    match served {
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
