//! Tessera's character-device backend process: the host side of one `-chardev` / `-serial`.
//!
//! Started by the launcher as `tessera-chardev --ipc-fd 3`. It receives a [`ChardevConfig`] with its
//! descriptors, answers `Ready`, and then moves bytes: guest output from each front end (a serial channel to
//! tessera-core) to the host side, host input to the focused front end. See docs/ARCHITECTURE.md.
//!
//! # Contract with the launcher
//!
//! * **Descriptors.** Everything comes attached to `Configure`: one serial channel per front end, the host
//!   side (for stdio the launcher's own fd 0 and fd 1, as two indexes or one index for both; never set them
//!   non-blocking, the chardev does not need it), the log file. Raw mode is applied only if the input is a
//!   terminal, so `raw: true` is safe for pipes. A pty master is served once someone opens the slave: the
//!   launcher must close its own copy of the slave.
//! * **Process group and signals.** The chardev reads and configures the user's terminal, so it must stay in
//!   the terminal's foreground process group: start it in the launcher's group (no `setsid`/`setpgid`).
//!   With `signal=on` Ctrl-C and Ctrl-\ reach the whole group as signals; the chardev ignores SIGINT and
//!   SIGQUIT and the launcher drives the shutdown (QEMU 7.2 prints `qemu-system-x86_64: terminating on signal 2`
//!   and exits 0). Which lines have `signal=on`, as observed on QEMU 7.2: `-serial stdio` and `-chardev stdio`
//!   (its default); **not** `-nographic` nor `-serial mon:stdio`, where QEMU turns it off so Ctrl-C reaches the
//!   guest (an explicit `-chardev stdio,mux=on,signal=on` keeps it). SIGTERM and SIGHUP restore the terminal and end the process by the same signal. The chardev
//!   changes its parent-death signal to SIGTERM (from the launcher's SIGKILL) so that the launcher's death
//!   also restores the terminal.
//! * **Exit.** `Shutdown`: front ends are drained until EOF or one second, output flushed (two seconds at
//!   most), terminal restored, exit 0. All front ends closed (the core is gone): the same, without waiting for
//!   `Shutdown`. The control channel closing without `Shutdown`: exit 1. A configuration it cannot use:
//!   `Fatal` on the control channel, exit 1. `C-a x` sends `Exit { code: 0 }` and keeps serving until
//!   `Shutdown`.
//!
//! # Modules
//!
//! * [`server`]: the event loop.
//! * [`mux`]: Ctrl-A escape keys and timestamps (`mux=on`).
//! * [`telnet`]: `telnet=on` negotiation and input filtering.
//! * [`terminal`]: raw mode, restored on every way out.
//! * [`writer`]: bounded output queues drained by writer threads.
//!
//! [`ChardevConfig`]: tessera_ipc::messages::ChardevConfig

pub mod error;
pub mod host;
pub mod mux;
pub mod server;
pub mod telnet;
pub mod terminal;
pub mod writer;

pub use error::ChardevError;
pub use server::Chardev;
