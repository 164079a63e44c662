//! `tessera-blk`: args -> validated config -> open image -> serve the vhost-user socket forever.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};
use tessera_blk::config::{Args, BlkConfig, SocketSource};
use tessera_blk::image::open_image;
use tessera_blk::vhost_user::{serve, serve_fd, BlkDevice};

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
    let served = match &config.socket {
        SocketSource::Path(p) => serve(p, dev),
        SocketSource::Fd(fd) => serve_fd(*fd, dev),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
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
