//! The chardev process goes away and comes back while the guest prints (issue #8 item 2): Debian's Linux 6.1 on
//! the software CPU, driven through the real `tessera-core` by the fake launcher (core_harness.rs), prints the
//! numbers 1 to 20000 on ttyS0. Twice while it prints, the test (playing the chardev process) stops reading its
//! serial channel and closes it, waits, then (playing the launcher) hands the core a new channel with
//! `SerialReconnect`. Every number must arrive exactly once and in order: what the guest printed while no chardev
//! was there is kept by the core and sent first on the new channel.
//!
//! Playing the chardev, the test acknowledges (`ChardevToCore::Written`) every byte it reads, as if it wrote it
//! at once. Before "dying" it reads its old channel dry after shutting its reading side (from then on the core's
//! sends fail, as they do on a dead peer) and acknowledges that too: then the core has nothing to send again
//! but what it could not send, and every number must arrive exactly once. (What a real killed chardev had
//! received but not written is sent again by the core; tests/backend_restart.rs kills the real one.)
//!
//! Bounds: the boot takes 30-120 s of wall time here; every step is allowed 300 s.

#[path = "core_harness.rs"]
mod harness;

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use harness::{start, Core, Setup, TempDir};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tessera_ipc::messages::{Accel, ChardevToCore, ChildToLauncher, CoreToChardev, FdIndex, LauncherToChild};
use tessera_ipc::{Channel, IpcError};

const STEP: Duration = Duration::from_secs(300);
const COUNT: u32 = 20000;

const SCRIPT: &str = r#"
exec </dev/console >/dev/console 2>&1
echo NUMBERS-START
seq 1 20000
echo NUMBERS-END
"#;

/// Output bytes received on the current serial channel: what the test acknowledges.
#[derive(Default)]
struct Received(u64);

impl Received {
    /// Take `bytes` and acknowledge everything received on this channel so far.
    fn take(&mut self, core: &mut Core, bytes: Vec<u8>) {
        if bytes.is_empty() {
            // The core's request for acknowledgements.
            return;
        }
        self.0 += bytes.len() as u64;
        core.output.extend(bytes);
        // The core may be gone already: the guest powers off right after its last line.
        let _ = core.serials[0].send(&ChardevToCore::Written(self.0), &[]);
    }
}

/// Read serial output until `done(text)` holds; panics with the output after `STEP`.
fn read_until(core: &mut Core, received: &mut Received, done: &dyn Fn(&str) -> bool) {
    let deadline = Instant::now() + STEP;
    while !done(&core.text()) {
        assert!(Instant::now() < deadline, "timed out; serial output:\n{}", core.text());
        match core.serials[0].try_recv::<CoreToChardev>() {
            Ok((CoreToChardev::Output(b), _)) => received.take(core, b),
            Err(IpcError::WouldBlock) => {
                let mut fds = [PollFd::new(core.serials[0].as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
                if let Ok((m, _)) = core.control.try_recv::<ChildToLauncher>() {
                    // The guest powers off right after its last line.
                    core.drain_serial();
                    if !done(&core.text()) {
                        panic!("unexpected control message {m:?}; serial output:\n{}", core.text());
                    }
                }
            }
            Err(e) => panic!("serial channel failed: {e}; serial output:\n{}", core.text()),
        }
    }
}

/// The chardev process "dies": nothing it had received is lost (see the file comment), then its end closes.
fn chardev_dies(core: &mut Core, received: &mut Received) {
    let fd = core.serials[0].as_fd().as_raw_fd();
    // SAFETY: shutdown on a socket this test owns; it is closed below.
    assert_eq!(unsafe { libc::shutdown(fd, libc::SHUT_RD) }, 0);
    while let Ok((CoreToChardev::Output(b), _)) = core.serials[0].try_recv::<CoreToChardev>() {
        received.take(core, b);
    }
    *received = Received::default();
    let (dead, _) = Channel::pair().unwrap();
    drop(std::mem::replace(&mut core.serials[0], dead));
}

/// The launcher restarted the chardev process: a new channel, the core's end attached to `SerialReconnect`.
fn chardev_returns(core: &mut Core) {
    let (core_end, chardev_end) = Channel::pair().unwrap();
    let msg = LauncherToChild::SerialReconnect { chardev_id: "serial0".into(), channel: FdIndex(0) };
    core.control.send(&msg, &[core_end.as_fd()]).expect("send SerialReconnect");
    drop(core_end);
    chardev_end.set_nonblocking(true).unwrap();
    core.serials[0] = chardev_end;
}

#[test]
fn guest_output_is_kept_while_the_chardev_process_is_away() {
    let Ok(kernel) = tessera_tests::linux_guest::kernel() else {
        eprintln!("SKIPPED: no kernel in /boot (linux-image-amd64)");
        return;
    };
    let dir = TempDir::new("serial-reconnect");
    let initrd = tessera_tests::linux_guest::Initramfs::new(SCRIPT)
        .build(&dir.0.join("initrd.gz"))
        .expect("build the initramfs");
    let mut setup = Setup::new(&kernel);
    setup.initrd = Some(initrd);
    // loglevel=3: kernel notices ("random: crng init done") would land inside the numbers' lines.
    setup.cmdline = "console=ttyS0 loglevel=3".into();
    setup.ram = 256 << 20;
    setup.accel = Accel::Tcg;
    setup.debug_exit = None;
    let mut core = start(&setup);
    match core.control_message(STEP) {
        ChildToLauncher::Ready => {}
        other => panic!("expected Ready, got {other:?}"),
    }
    // Away twice: once early in the numbers, once later.
    let mut received = Received::default();
    for at in ["\n2000\r", "\n9000\r"] {
        read_until(&mut core, &mut received, &|t: &str| t.contains(at));
        chardev_dies(&mut core, &mut received);
        let away = Instant::now();
        std::thread::sleep(Duration::from_millis(700));
        chardev_returns(&mut core);
        eprintln!("chardev away for {} ms after {:?}", away.elapsed().as_millis(), at.trim());
    }
    read_until(&mut core, &mut received, &|t: &str| t.contains("NUMBERS-END"));
    let text = core.text();
    let start = text.find("NUMBERS-START").unwrap();
    let end = text.find("NUMBERS-END").unwrap();
    // A kernel message that still comes (an error) starts at its `[ time]` stamp, perhaps inside a number's line.
    let numbers: Vec<u32> =
        text[start..end].lines().filter_map(|l| l.split('[').next().and_then(|n| n.trim().parse().ok())).collect();
    let want: Vec<u32> = (1..=COUNT).collect();
    if numbers != want {
        let first_bad = numbers.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(numbers.len().min(want.len()));
        // The serial text around it: a kernel message printed into a number's line shows there.
        let missing = want.get(first_bad).map_or(String::new(), |n| n.to_string());
        let around = text[start..end]
            .find(&format!("\n{}", first_bad))
            .map_or(String::new(), |at| text[start + at..end].chars().take(300).collect());
        panic!(
            "{} numbers arrived, the first difference at position {first_bad}: got {:?}, want {:?}; the text \
             near the missing {missing}:\n{around:?}",
            numbers.len(),
            numbers.get(first_bad..first_bad + 3),
            want.get(first_bad..first_bad + 3)
        );
    }
    let _ = core.wait_exit();
    let log = core.stderr_text();
    assert!(log.contains("the chardev process is away"), "the core said it kept the output; its log:\n{log}");
    assert!(!log.contains("dropped"), "nothing was dropped at this size; the core's log:\n{log}");
}
