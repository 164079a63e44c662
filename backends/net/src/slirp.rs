//! A safe owner of one libslirp instance (QEMU's user-mode network stack).
//!
//! libslirp is single-threaded and callback driven: whoever holds a [`Slirp`] (`&mut`) feeds it
//! guest frames ([`Slirp::input`]), lets it fill a `poll(2)` set ([`Slirp::fill_pollfds`]),
//! reports the results ([`Slirp::handle_pollfds`]) and fires its timers ([`Slirp::run_timers`]).
//! Frames for the guest come out through the `send_packet` callback into [`Slirp::take_output`].
//! The FFI declarations come from the `libslirp-sys` crate; `SlirpConfig` version 3 is used
//! because that crate's `SlirpCb` ends before the fields libslirp reads from version 4 on.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::net::Ipv4Addr;
use std::time::Instant;

use libslirp_sys as sys;

use crate::config::UserConfig;
use crate::{Error, Result};

/// Frames waiting for the guest beyond this are dropped (TCP retransmits them); the network
/// loop stops polling host sockets well before (see `netloop`).
pub const MAX_OUTPUT_FRAMES: usize = 4096;

struct Timer {
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    /// Expiry in milliseconds of [`Ctx::clock_ms`], when armed.
    expire_ms: Option<i64>,
}

/// State the C callbacks reach through their `opaque` pointer. Only ever accessed from the
/// owning thread, with short `RefCell` borrows never held across a call into libslirp.
struct Ctx {
    start: Instant,
    output: RefCell<VecDeque<Vec<u8>>>,
    dropped: RefCell<u64>,
    pollfds: RefCell<Vec<libc::pollfd>>,
    // Boxed: the pointer handed to libslirp as the timer's handle must not move.
    #[allow(clippy::vec_box)]
    timers: RefCell<Vec<Box<Timer>>>,
}

impl Ctx {
    fn clock_ns(&self) -> i64 {
        i64::try_from(self.start.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }
}

/// One libslirp instance and the strings its configuration points to.
pub struct Slirp {
    raw: *mut sys::Slirp,
    ctx: Box<Ctx>,
    _strings: Vec<CString>,
    _dnssearch: Vec<*const c_char>,
}

// SAFETY: libslirp is not thread-safe but has no thread affinity: it keeps no thread-local state
// and calls back only into the `Ctx` we own, from within the call that was made into it. Every
// method here takes `&mut self`, so moving a `Slirp` to another thread, or sharing it behind a
// `Mutex` (as the network loop does), means one thread at a time uses the instance, its
// callbacks' `RefCell`s and the raw pointers it holds.
unsafe impl Send for Slirp {}

fn in_addr(a: Ipv4Addr) -> sys::in_addr {
    sys::in_addr::from(a)
}

fn cstring(option: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::UserOption { option: option.to_owned(), reason: "contains a NUL byte".into() })
}

// Callbacks. `opaque` is always the `Ctx` of the instance (set in `Slirp::new`).

unsafe extern "C" fn cb_send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    // SAFETY: libslirp passes back the opaque pointer we gave it: a live `Ctx` owned by the
    // `Slirp` whose method is on the stack.
    let ctx = unsafe { &*(opaque as *const Ctx) };
    // SAFETY: libslirp hands us `len` readable bytes at `buf` for the duration of the call.
    let frame = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
    let mut out = ctx.output.borrow_mut();
    if out.len() >= MAX_OUTPUT_FRAMES {
        *ctx.dropped.borrow_mut() += 1;
    } else {
        out.push_back(frame.to_vec());
    }
    len as isize
}

unsafe extern "C" fn cb_guest_error(msg: *const c_char, _opaque: *mut c_void) {
    // SAFETY: libslirp passes a NUL-terminated message.
    let msg = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    crate::ratelimit::guest_error(format_args!("slirp: {msg}"));
}

unsafe extern "C" fn cb_clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: see cb_send_packet.
    let ctx = unsafe { &*(opaque as *const Ctx) };
    ctx.clock_ns()
}

unsafe extern "C" fn cb_timer_new(cb: sys::SlirpTimerCb, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void {
    // SAFETY: see cb_send_packet.
    let ctx = unsafe { &*(opaque as *const Ctx) };
    let mut t = Box::new(Timer { cb, cb_opaque, expire_ms: None });
    let p: *mut Timer = &mut *t;
    ctx.timers.borrow_mut().push(t);
    p as *mut c_void
}

unsafe extern "C" fn cb_timer_free(timer: *mut c_void, opaque: *mut c_void) {
    // SAFETY: see cb_send_packet.
    let ctx = unsafe { &*(opaque as *const Ctx) };
    ctx.timers.borrow_mut().retain(|t| !std::ptr::eq(&**t, timer as *const Timer));
}

unsafe extern "C" fn cb_timer_mod(timer: *mut c_void, expire_ms: i64, opaque: *mut c_void) {
    // SAFETY: see cb_send_packet.
    let ctx = unsafe { &*(opaque as *const Ctx) };
    if let Some(t) = ctx.timers.borrow_mut().iter_mut().find(|t| std::ptr::eq(&***t, timer as *const Timer)) {
        t.expire_ms = Some(expire_ms);
    }
}

unsafe extern "C" fn cb_register_poll_fd(_fd: c_int, _opaque: *mut c_void) {
    // The poll set is rebuilt from slirp_pollfds_fill on every iteration.
}

unsafe extern "C" fn cb_unregister_poll_fd(_fd: c_int, _opaque: *mut c_void) {}

unsafe extern "C" fn cb_notify(_opaque: *mut c_void) {
    // libslirp asks to be polled again soon; our loop polls it on every iteration anyway.
}

unsafe extern "C" fn cb_add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: see cb_send_packet.
    let ctx = unsafe { &*(opaque as *const Ctx) };
    let mut ev: libc::c_short = 0;
    if events & sys::SLIRP_POLL_IN != 0 {
        ev |= libc::POLLIN;
    }
    if events & sys::SLIRP_POLL_OUT != 0 {
        ev |= libc::POLLOUT;
    }
    if events & sys::SLIRP_POLL_PRI != 0 {
        ev |= libc::POLLPRI;
    }
    let mut fds = ctx.pollfds.borrow_mut();
    fds.push(libc::pollfd { fd, events: ev, revents: 0 });
    (fds.len() - 1) as c_int
}

unsafe extern "C" fn cb_get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: see cb_send_packet.
    let ctx = unsafe { &*(opaque as *const Ctx) };
    let fds = ctx.pollfds.borrow();
    let Some(p) = usize::try_from(idx).ok().and_then(|i| fds.get(i)) else {
        return 0;
    };
    let mut r = 0;
    if p.revents & libc::POLLIN != 0 {
        r |= sys::SLIRP_POLL_IN;
    }
    if p.revents & libc::POLLOUT != 0 {
        r |= sys::SLIRP_POLL_OUT;
    }
    if p.revents & libc::POLLPRI != 0 {
        r |= sys::SLIRP_POLL_PRI;
    }
    if p.revents & libc::POLLERR != 0 {
        r |= sys::SLIRP_POLL_ERR;
    }
    if p.revents & libc::POLLHUP != 0 {
        r |= sys::SLIRP_POLL_HUP;
    }
    r
}

static CALLBACKS: sys::SlirpCb = sys::SlirpCb {
    send_packet: Some(cb_send_packet),
    guest_error: Some(cb_guest_error),
    clock_get_ns: Some(cb_clock_get_ns),
    timer_new: Some(cb_timer_new),
    timer_free: Some(cb_timer_free),
    timer_mod: Some(cb_timer_mod),
    register_poll_fd: Some(cb_register_poll_fd),
    unregister_poll_fd: Some(cb_unregister_poll_fd),
    notify: Some(cb_notify),
};

/// QEMU's IPv6 defaults for user networking: fec0::/64, host ::2, DNS ::3.
const IPV6_PREFIX: [u8; 16] = [0xfe, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

impl Slirp {
    /// Creates the stack and installs the forwarding rules of `c`.
    pub fn new(c: &UserConfig) -> Result<Self> {
        let ctx = Box::new(Ctx {
            start: Instant::now(),
            output: RefCell::new(VecDeque::new()),
            dropped: RefCell::new(0),
            pollfds: RefCell::new(Vec::new()),
            timers: RefCell::new(Vec::new()),
        });
        let mut strings = Vec::new();
        let mut opt_str = |name: &str, v: &Option<String>| -> Result<*const c_char> {
            Ok(match v {
                Some(s) => {
                    let cs = cstring(name, s)?;
                    let p = cs.as_ptr();
                    strings.push(cs);
                    p
                }
                None => std::ptr::null(),
            })
        };
        let vhostname = opt_str("hostname", &c.hostname)?;
        let vdomainname = opt_str("domainname", &c.domainname)?;
        let mut dnssearch: Vec<*const c_char> = Vec::new();
        for d in &c.dnssearch {
            let cs = cstring("dnssearch", d)?;
            dnssearch.push(cs.as_ptr());
            strings.push(cs);
        }
        if !dnssearch.is_empty() {
            dnssearch.push(std::ptr::null());
        }
        let mut host6 = IPV6_PREFIX;
        host6[15] = 2;
        let mut dns6 = IPV6_PREFIX;
        dns6[15] = 3;
        let cfg = sys::SlirpConfig {
            version: 3,
            restricted: c_int::from(c.restrict),
            in_enabled: c.ipv4,
            vnetwork: in_addr(c.net),
            vnetmask: in_addr(c.mask),
            vhost: in_addr(c.host),
            in6_enabled: c.ipv6,
            vprefix_addr6: sys::in6_addr { s6_addr: IPV6_PREFIX },
            vprefix_len: 64,
            vhost6: sys::in6_addr { s6_addr: host6 },
            vhostname,
            tftp_server_name: std::ptr::null(),
            tftp_path: std::ptr::null(),
            bootfile: std::ptr::null(),
            vdhcp_start: in_addr(c.dhcp_start),
            vnameserver: in_addr(c.dns),
            vnameserver6: sys::in6_addr { s6_addr: dns6 },
            vdnssearch: if dnssearch.is_empty() { std::ptr::null_mut() } else { dnssearch.as_mut_ptr() },
            vdomainname,
            // 0 selects libslirp's defaults (1500).
            if_mtu: 0,
            if_mru: 0,
            disable_host_loopback: false,
            enable_emu: false,
            outbound_addr: std::ptr::null(),
            outbound_addr6: std::ptr::null(),
            disable_dns: false,
            disable_dhcp: false,
        };
        let opaque = &*ctx as *const Ctx as *mut c_void;
        // SAFETY: `cfg` and the strings it points to outlive the call (libslirp copies what it
        // keeps: it strdup()s the strings); CALLBACKS is static; `opaque` points to the boxed
        // Ctx, which lives as long as the returned instance (dropped after slirp_cleanup).
        let raw = unsafe { sys::slirp_new(&cfg, &CALLBACKS, opaque) };
        if raw.is_null() {
            return Err(Error::SlirpInit("slirp_new returned NULL".into()));
        }
        let mut s = Slirp { raw, ctx, _strings: strings, _dnssearch: dnssearch };
        for f in &c.hostfwd {
            let guest = f.guest_addr.unwrap_or(c.dhcp_start);
            // SAFETY: `s.raw` is a live instance; the arguments are plain values.
            let rc = unsafe {
                sys::slirp_add_hostfwd(
                    s.raw,
                    c_int::from(f.udp),
                    in_addr(f.host_addr),
                    c_int::from(f.host_port),
                    in_addr(guest),
                    c_int::from(f.guest_port),
                )
            };
            if rc < 0 {
                return Err(Error::UserOption {
                    option: format!(
                        "hostfwd={}:{}:{}-{}:{}",
                        if f.udp { "udp" } else { "tcp" },
                        f.host_addr,
                        f.host_port,
                        guest,
                        f.guest_port
                    ),
                    reason: format!("could not set up host forwarding rule: {}", std::io::Error::last_os_error()),
                });
            }
        }
        for g in &c.guestfwd {
            let cmd = cstring("guestfwd", &g.command)?;
            let mut addr = in_addr(g.addr);
            // SAFETY: live instance; `cmd` is NUL-terminated and libslirp copies it; `addr` is a
            // valid in_addr for the duration of the call.
            let rc = unsafe { sys::slirp_add_exec(s.raw, cmd.as_ptr(), &mut addr, c_int::from(g.port)) };
            if rc < 0 {
                return Err(Error::UserOption {
                    option: format!("guestfwd=tcp:{}:{}-cmd:{}", g.addr, g.port, g.command),
                    reason: "conflicts with an existing forward".into(),
                });
            }
            s._strings.push(cmd);
        }
        Ok(s)
    }

    /// Hands one Ethernet frame from the guest to the stack.
    pub fn input(&mut self, frame: &[u8]) {
        let Ok(len) = c_int::try_from(frame.len()) else {
            return;
        };
        // SAFETY: live instance; `frame` is `len` readable bytes for the call.
        unsafe { sys::slirp_input(self.raw, frame.as_ptr(), len) };
    }

    /// Frames the stack produced for the guest since the last call, and how many were dropped
    /// because too many were waiting.
    pub fn take_output(&mut self) -> (VecDeque<Vec<u8>>, u64) {
        let out = std::mem::take(&mut *self.ctx.output.borrow_mut());
        let dropped = std::mem::take(&mut *self.ctx.dropped.borrow_mut());
        (out, dropped)
    }

    /// Number of frames waiting for the guest.
    pub fn output_len(&self) -> usize {
        self.ctx.output.borrow().len()
    }

    /// Appends the stack's descriptors to `fds` and lowers `timeout_ms` to when the stack (or
    /// one of its timers) next needs attention. Returns the index of the first one in `fds`.
    pub fn fill_pollfds(&mut self, fds: &mut Vec<libc::pollfd>, timeout_ms: &mut u32) -> usize {
        self.ctx.pollfds.borrow_mut().clear();
        let opaque = &*self.ctx as *const Ctx as *mut c_void;
        // SAFETY: live instance; the callback and opaque are ours.
        unsafe { sys::slirp_pollfds_fill(self.raw, timeout_ms, Some(cb_add_poll), opaque) };
        let now = self.clock_ms();
        for t in self.ctx.timers.borrow().iter() {
            if let Some(e) = t.expire_ms {
                *timeout_ms = (*timeout_ms).min(u32::try_from(e.saturating_sub(now).max(0)).unwrap_or(u32::MAX));
            }
        }
        let first = fds.len();
        fds.extend_from_slice(&self.ctx.pollfds.borrow());
        first
    }

    /// Reports the results of `poll(2)` for the descriptors [`Self::fill_pollfds`] added at
    /// `first`.
    pub fn handle_pollfds(&mut self, fds: &[libc::pollfd], first: usize, poll_failed: bool) {
        {
            let mut mine = self.ctx.pollfds.borrow_mut();
            for (m, f) in mine.iter_mut().zip(fds.iter().skip(first)) {
                m.revents = f.revents;
            }
        }
        let opaque = &*self.ctx as *const Ctx as *mut c_void;
        // SAFETY: live instance; the callback reads the Ctx's pollfds filled above.
        unsafe { sys::slirp_pollfds_poll(self.raw, c_int::from(poll_failed), Some(cb_get_revents), opaque) };
    }

    fn clock_ms(&self) -> i64 {
        self.ctx.clock_ns() / 1_000_000
    }

    /// Fires the expired timers, one at a time (a timer callback may create, re-arm or free
    /// timers, so the list is looked at afresh each time).
    pub fn run_timers(&mut self) {
        loop {
            let now = self.clock_ms();
            let fire = {
                let mut timers = self.ctx.timers.borrow_mut();
                timers.iter_mut().find(|t| t.expire_ms.is_some_and(|e| e <= now)).map(|t| {
                    t.expire_ms = None;
                    (t.cb, t.cb_opaque)
                })
            };
            match fire {
                // SAFETY: libslirp gave us this callback and its argument for this timer, which
                // is still registered (not freed) at this point.
                Some((Some(cb), arg)) => unsafe { cb(arg) },
                Some((None, _)) => {}
                None => break,
            }
        }
    }

    /// libslirp's version string, for the log.
    pub fn version() -> String {
        // SAFETY: returns a pointer to a static NUL-terminated string.
        unsafe { CStr::from_ptr(sys::slirp_version_string()) }.to_string_lossy().into_owned()
    }
}

impl Drop for Slirp {
    fn drop(&mut self) {
        // SAFETY: `raw` is live and not used after this; libslirp frees its timers through our
        // callbacks during cleanup, so the Ctx (dropped after this body) is still there.
        unsafe { sys::slirp_cleanup(self.raw) };
    }
}
