//! How a device's interrupt eventfd (a vhost-user backend's call eventfd) becomes an MSI in the guest, and how
//! a doorbell address becomes a write to a kick eventfd, for each engine.
//!
//! * KVM ([`crate::kvm::msi`]): the eventfd is an irqfd on a GSI whose route is the MSI message
//!   (KVM_SET_GSI_ROUTING), and doorbells are ioeventfds, so neither path enters the core.
//! * An engine with a userspace interrupt controller (the software CPU) uses [`ThreadedMsiRouter`]: a thread
//!   waits on the eventfds and injects the message through a callback; doorbell writes reach the device as MMIO
//!   writes, and the device signals the kick eventfd itself.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::lock;
use crate::Error;

/// An MSI message: what the device writes, and where (PCI 3.0 §6.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// One eventfd's connection to the guest's interrupt controller.
pub trait MsiRoute: Send + Sync {
    /// `Some(msg)`: signals of the eventfd deliver `msg`. `None`: masked; signals stay pending in the eventfd
    /// and are delivered when a message is set again (MSI-X pending bit semantics, PCI 3.0 §6.8.3.4).
    fn set(&self, msg: Option<MsiMessage>) -> Result<(), Error>;
    /// True when the eventfd holds a signal not yet delivered (for the PBA).
    fn pending(&self) -> bool;
}

/// Per-engine interrupt and doorbell plumbing.
pub trait MsiRouter: Send + Sync {
    fn route(&self, evt: Arc<EventFd>) -> Result<Arc<dyn MsiRoute>, Error>;
    /// Make guest writes to `addr` signal `evt` without leaving the hypervisor, if the engine can. Returns
    /// false when it cannot (the write then reaches the device, which must signal `evt` itself).
    fn add_doorbell(&self, addr: u64, evt: Arc<EventFd>) -> Result<bool, Error>;
    fn remove_doorbell(&self, addr: u64, evt: &Arc<EventFd>) -> Result<(), Error>;
}

/// Delivers an MSI to the guest (the software CPU's platform: `Platform::deliver_msi` plus a vCPU kick).
pub type InjectMsi = Arc<dyn Fn(MsiMessage) + Send + Sync>;

struct ThreadedRoute {
    evt: Arc<EventFd>,
    msg: Mutex<Option<MsiMessage>>,
    /// Signals read from the eventfd while masked.
    pending: Mutex<bool>,
    inject: InjectMsi,
}

impl ThreadedRoute {
    fn fire(&self) {
        let msg = *lock(&self.msg);
        match msg {
            Some(m) => (self.inject)(m),
            None => *lock(&self.pending) = true,
        }
    }
}

impl MsiRoute for ThreadedRoute {
    fn set(&self, msg: Option<MsiMessage>) -> Result<(), Error> {
        *lock(&self.msg) = msg;
        if let Some(m) = msg {
            if std::mem::take(&mut *lock(&self.pending)) {
                (self.inject)(m);
            }
        }
        Ok(())
    }
    fn pending(&self) -> bool {
        *lock(&self.pending)
    }
}

/// MSI delivery by a thread that polls every route's eventfd (for engines without irqfd).
pub struct ThreadedMsiRouter {
    inject: InjectMsi,
    routes: Arc<Mutex<HashMap<i32, Arc<ThreadedRoute>>>>,
    /// Wakes the thread when the set of routes changes.
    wake: Arc<EventFd>,
}

impl ThreadedMsiRouter {
    pub fn new(inject: InjectMsi) -> Result<Arc<ThreadedMsiRouter>, Error> {
        let wake = Arc::new(EventFd::new(libc::EFD_CLOEXEC).map_err(|e| Error::Kvm { what: "eventfd", source: e })?);
        let r = Arc::new(ThreadedMsiRouter { inject, routes: Arc::new(Mutex::new(HashMap::new())), wake });
        let routes = r.routes.clone();
        let wake = r.wake.clone();
        std::thread::Builder::new()
            .name("msi".into())
            .spawn(move || poll_loop(&routes, &wake))
            .map_err(|e| Error::Thread { what: "the MSI thread", source: e })?;
        Ok(r)
    }
}

fn poll_loop(routes: &Mutex<HashMap<i32, Arc<ThreadedRoute>>>, wake: &EventFd) {
    loop {
        let mut fds: Vec<libc::pollfd> = vec![libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        fds.extend(lock(routes).keys().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }));
        // SAFETY: `fds` is a valid array of pollfd of the given length for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let _ = wake.read();
        }
        for p in &fds[1..] {
            if p.revents & libc::POLLIN != 0 {
                let r = lock(routes).get(&p.fd).cloned();
                if let Some(r) = r {
                    if r.evt.read().is_ok() {
                        r.fire();
                    }
                }
            }
        }
    }
}

impl MsiRouter for ThreadedMsiRouter {
    fn route(&self, evt: Arc<EventFd>) -> Result<Arc<dyn MsiRoute>, Error> {
        let r = Arc::new(ThreadedRoute {
            evt: evt.clone(),
            msg: Mutex::new(None),
            pending: Mutex::new(false),
            inject: self.inject.clone(),
        });
        lock(&self.routes).insert(evt.as_raw_fd(), r.clone());
        let _ = self.wake.write(1);
        Ok(r)
    }
    fn add_doorbell(&self, _: u64, _: Arc<EventFd>) -> Result<bool, Error> {
        Ok(false)
    }
    fn remove_doorbell(&self, _: u64, _: &Arc<EventFd>) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn threaded_routes_deliver_and_hold_signals_while_masked() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let router = ThreadedMsiRouter::new(Arc::new(move |m| g.lock().unwrap().push(m))).unwrap();
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let route = router.route(evt.clone()).unwrap();
        let wait_for = |n: usize| {
            let t = Instant::now();
            while got.lock().unwrap().len() < n && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        evt.write(1).unwrap();
        let t = Instant::now();
        while !route.pending() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(route.pending(), "masked: the signal is held");
        let m = MsiMessage { address: 0xfee0_0000, data: 0x41 };
        route.set(Some(m)).unwrap();
        assert_eq!(*got.lock().unwrap(), vec![m], "delivered on unmask");
        evt.write(1).unwrap();
        wait_for(2);
        assert_eq!(got.lock().unwrap().len(), 2);
    }
}
