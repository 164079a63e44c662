//! Clean shutdown: on SIGTERM/SIGINT/SIGHUP flush the image (imago keeps qcow2 metadata in
//! write-back caches) and exit, instead of dying with dirty metadata in memory.

use std::sync::Arc;

use crate::image::BlockIo;

/// Blocks the termination signals in this thread (call it before any other thread is started,
/// so every thread inherits the mask) and starts a thread that waits for them.
pub fn flush_on_termination(disk: Arc<dyn BlockIo>) {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use, and
    // pthread_sigmask only changes this thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        log::info!("signal {sig} received: flushing the image and exiting");
        let code = match disk.flush() {
            Ok(()) => 0,
            Err(e) => {
                log::error!("flushing the image failed: {e}");
                1
            }
        };
        std::process::exit(code);
    });
    if let Err(e) = spawned {
        log::error!("cannot start the signal thread, termination will not flush: {e}");
    }
}
