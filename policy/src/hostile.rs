//! Hostile operations, for proving a sandbox from outside: the sandbox probe runs them, and the backends'
//! test-only "misbehave" entries (built with their `misbehave` feature, never in release builds) call
//! [`attempt`] with the same names so the same checks apply to the real binaries.
//!
//! Each operation is one syscall (or two) a compromised process would try; [`attempt`] returns `Ok` if it
//! worked, `Err(errno name)` if the kernel refused, and does not return at all if the seccomp filter kills
//! the process.

/// The names [`attempt`] accepts. `allowed` is the control: work every process does.
pub const OPERATIONS: &[&str] = &[
    "allowed",
    "open-passwd",
    "read-resolv-conf",
    "read-urandom",
    "socket-inet",
    "connect-inet",
    "execve",
    "ptrace-parent",
    "mount",
    "kill-parent",
    "setuid-root",
    "mmap-exec",
    "spawn-thread",
];

/// The symbolic name of an errno value, as the probe prints it.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::ENOSYS => "ENOSYS",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EAGAIN => "EAGAIN",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ESRCH => "ESRCH",
        _ => return format!("errno{e}"),
    };
    name.to_string()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// -1 from a libc call becomes the errno's name.
fn check(rc: libc::c_long) -> Result<(), String> {
    if rc < 0 {
        Err(errno_name(last_errno()))
    } else {
        Ok(())
    }
}

/// Performs the operation `name` (one of [`OPERATIONS`]).
pub fn attempt(name: &str) -> Result<(), String> {
    match name {
        "open-passwd" => {
            // SAFETY: a NUL-terminated path; the descriptor, if any, is closed right away.
            let fd = unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            check(fd.into())?;
            // SAFETY: fd was just opened by this function.
            unsafe { libc::close(fd) };
            Ok(())
        }
        // Not hostile: what net-user's filesystem.read_only is for (libslirp's fopen of /etc/resolv.conf,
        // glib's of /dev/urandom). Reads a few bytes, so Landlock's read right is exercised, not only open.
        "read-resolv-conf" => read_some(c"/etc/resolv.conf", false),
        "read-urandom" => read_some(c"/dev/urandom", true),
        "socket-inet" => {
            // SAFETY: no pointer arguments.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            check(fd.into())
        }
        "connect-inet" => {
            // SAFETY: no pointer arguments.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            check(fd.into())?;
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 53u16.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_be_bytes([192, 0, 2, 1]).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: addr is a valid sockaddr_in of the length given.
            let rc = unsafe {
                libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            check(rc.into())
        }
        "execve" => {
            let argv = [c"true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and NULL-terminated argv/envp arrays that outlive the call.
            let rc = unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            check(rc.into())
        }
        "ptrace-parent" => {
            // SAFETY: PTRACE_ATTACH takes a pid; addr and data are unused.
            let rc =
                unsafe { libc::ptrace(libc::PTRACE_ATTACH, libc::getppid(), std::ptr::null_mut::<libc::c_void>(), 0) };
            check(rc)
        }
        "mount" => {
            // SAFETY: NUL-terminated strings, no data.
            let rc = unsafe { libc::mount(c"none".as_ptr(), c"/".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
            check(rc.into())
        }
        "kill-parent" => {
            // SAFETY: signal 0 only checks that the signal could be sent.
            let rc = unsafe { libc::kill(libc::getppid(), 0) };
            check(rc.into())
        }
        "setuid-root" => {
            // SAFETY: no pointer arguments.
            let rc = unsafe { libc::setuid(0) };
            check(rc.into())
        }
        "mmap-exec" => {
            // SAFETY: an anonymous mapping, unmapped right away if it succeeds.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(errno_name(last_errno()));
            }
            // SAFETY: p is the mapping made above.
            unsafe { libc::munmap(p, 4096) };
            Ok(())
        }
        "spawn-thread" => std::thread::Builder::new()
            .name("probe-worker".to_string())
            .spawn(|| 7)
            .map_err(|e| errno_name(e.raw_os_error().unwrap_or(0)))?
            .join()
            .map_err(|_| "thread panicked".to_string())
            .map(|_| ()),
        "allowed" => allowed_work(),
        _ => Err(format!("unknown-op:{name}")),
    }
}

/// Opens `path` read-only as fopen does (openat) and reads up to 16 bytes; `full` insists on all 16.
fn read_some(path: &std::ffi::CStr, full: bool) -> Result<(), String> {
    // SAFETY: a NUL-terminated path; the descriptor, if any, is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    check(fd.into())?;
    let mut buf = [0u8; 16];
    // SAFETY: reads at most 16 bytes into a live buffer of 16.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: fd was opened above.
    unsafe { libc::close(fd) };
    check(n as libc::c_long)?;
    if full && n != 16 {
        return Err(format!("short read ({n} bytes)"));
    }
    Ok(())
}

/// What every process does all the time: allocate, eventfd, poll, write, read, random seeds.
fn allowed_work() -> Result<(), String> {
    let v: Vec<u8> = vec![0x5a; 1 << 20];
    let mut map = std::collections::HashMap::new();
    map.insert(1, v.len());
    // SAFETY: no pointer arguments.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    check(efd.into())?;
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    check(unsafe { libc::write(efd, (&one as *const u64).cast(), 8) } as libc::c_long)?;
    let mut pfd = libc::pollfd { fd: efd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    check(unsafe { libc::poll(&mut pfd, 1, 1000) }.into())?;
    let mut got: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64.
    check(unsafe { libc::read(efd, (&mut got as *mut u64).cast(), 8) } as libc::c_long)?;
    // SAFETY: efd was opened above.
    unsafe { libc::close(efd) };
    if got != 1 || map[&1] != 1 << 20 {
        return Err("eventfd round trip lost data".to_string());
    }
    Ok(())
}

/// The environment variable a test sets (on the launcher, whose children inherit it) to make one process of a
/// misbehave build try hostile operations: `PROCESS:OP[,OP...]`, PROCESS being `core`, `chardev`, `blk` or
/// `net` and each OP one of [`OPERATIONS`].
#[cfg(feature = "misbehave")]
pub const MISBEHAVE_ENV: &str = "TESSERA_MISBEHAVE";

/// The hidden test-only entry of a misbehave build (feature `misbehave`, never in a release build): if
/// [`MISBEHAVE_ENV`] names `process`, performs each operation in order right away and writes one line per
/// operation to stderr, `tessera-PROCESS: misbehave: OP: denied ERRNO` or `tessera-PROCESS: misbehave: OP:
/// ALLOWED`, before the next one. An operation the seccomp filter kills ends the process there (SIGSYS): the
/// line before it says it is about to try it (`misbehave: OP: trying`), so a test knows which call killed it.
/// Called by each process right after it confined itself.
#[cfg(feature = "misbehave")]
pub fn misbehave_from_env(process: &str) {
    use std::io::Write;
    let Ok(value) = std::env::var(MISBEHAVE_ENV) else { return };
    let Some(ops) = value.strip_prefix(process).and_then(|r| r.strip_prefix(':')) else { return };
    let mut err = std::io::stderr().lock();
    for op in ops.split(',').filter(|o| !o.is_empty()) {
        let _ = writeln!(err, "tessera-{process}: misbehave: {op}: trying");
        let _ = err.flush();
        let line = match attempt(op) {
            Ok(()) => format!("tessera-{process}: misbehave: {op}: ALLOWED"),
            Err(e) => format!("tessera-{process}: misbehave: {op}: denied {e}"),
        };
        let _ = writeln!(err, "{line}");
        let _ = err.flush();
    }
}
