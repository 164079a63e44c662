//! The virtio 1.x modern PCI transport (virtio 1.2 §4.1): vendor 0x1af4, device 0x1040 + type, one 32-bit
//! memory BAR holding the common, ISR, device and notify structures and the MSI-X table and PBA. Layout of BAR 0
//! (docs/virtio-pci.md):
//!
//! | offset | structure |
//! |---|---|
//! | 0x0000 | common configuration (§4.1.4.3) |
//! | 0x1000 | ISR status (§4.1.4.5) |
//! | 0x2000 | device configuration (§4.1.4.6) |
//! | 0x3000 | notifications, queue n at 0x3000 + 4n (§4.1.4.4, notify_off_multiplier 4) |
//! | 0x4000 | MSI-X table |
//! | 0x5000 | MSI-X pending bit array |

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use vmm_sys_util::eventfd::EventFd;

use super::{QueueConfig, VirtioDevice};
use crate::guestlog::GuestLog;
use crate::pci::config::ConfigSpace;
use crate::pci::msi::{MsiRoute, MsiRouter};
use crate::pci::msix::{Msix, NO_VECTOR};
use crate::pci::{lock, PciFunction};
use crate::Error;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
pub const NOTIFY: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const VIRTIO_VENDOR: u16 = 0x1af4;
// virtio_pci_cap cfg_type values (virtio 1.2 §4.1.4; virtio-bindings 0.2 has no virtio_pci module).
const VIRTIO_PCI_CAP_COMMON_CFG: u32 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u32 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u32 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u32 = 4;
/// Vendor-specific capability (PCI 3.0 appendix H) carrying virtio_pci_cap.
const CAP_VNDR: u8 = 0x09;

#[derive(Clone, Copy, Debug)]
struct Queue {
    max: u16,
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl Queue {
    fn new(max: u16) -> Queue {
        Queue { max, size: max, vector: NO_VECTOR, enabled: false, desc: 0, driver: 0, device: 0 }
    }
}

struct Inner {
    cfg: ConfigSpace,
    msix: Msix,
    dev: Box<dyn VirtioDevice>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<Queue>,
    /// BAR 0 base the doorbells are registered at.
    doorbells_at: Option<u64>,
}

pub struct VirtioPci {
    name: String,
    inner: Mutex<Inner>,
    router: Arc<dyn MsiRouter>,
    kicks: Vec<Arc<EventFd>>,
    calls: Vec<Arc<EventFd>>,
    routes: Vec<Arc<dyn MsiRoute>>,
    /// The configuration-change interrupt (the device signals it through its [`super::ConfigNotifier`]) and its
    /// route, which follows `config_msix_vector`.
    config_route: Arc<dyn MsiRoute>,
    /// `config_generation` (§4.1.4.3): moves on with each configuration change.
    config_generation: Arc<AtomicU8>,
    log: Arc<GuestLog>,
}

fn virtio_cap(cfg_type: u32, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type, bar, id, padding[2], offset, length.
    let mut b = vec![(16 + extra.len()) as u8, cfg_type as u8, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPci {
    /// A virtio-pci function for `dev`, with BAR 0 at `bar_addr` (memory decoding on, as firmware would leave
    /// it). Doorbells and interrupt routes go through `router`.
    pub fn new(
        name: String,
        dev: Box<dyn VirtioDevice>,
        bar_addr: u64,
        router: Arc<dyn MsiRouter>,
        log: Arc<GuestLog>,
    ) -> Result<Arc<VirtioPci>, Error> {
        let sizes = dev.queue_max_sizes();
        let nq = sizes.len();
        if nq == 0 || nq > 64 {
            return Err(Error::Config(format!("{name}: {nq} virtqueues is not supported (1-64)")));
        }
        let dtype = dev.device_type();
        // Modern-only device IDs: 0x1040 + device type (§4.1.2); subsystem IDs are free, QEMU uses these.
        let mut cfg = ConfigSpace::new(VIRTIO_VENDOR, 0x1040 + dtype, 1, class_of(dtype), VIRTIO_VENDOR, 0x1100);
        cfg.add_mem_bar(0, BAR_SIZE, bar_addr);
        // One vector per queue plus one for configuration changes, as QEMU sizes it.
        let vectors = nq as u16 + 1;
        let msix = Msix::new(&mut cfg, vectors, 0, MSIX_TABLE as u32, MSIX_PBA as u32);
        cfg.add_cap(CAP_VNDR, &virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON, COMMON_LEN, &[]), &[]);
        cfg.add_cap(CAP_VNDR, &virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR, 4, &[]), &[]);
        cfg.add_cap(CAP_VNDR, &virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE, DEVICE_LEN, &[]), &[]);
        cfg.add_cap(
            CAP_VNDR,
            &virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY,
                nq as u64 * u64::from(NOTIFY_MULTIPLIER),
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        cfg.enable_memory_at_boot();
        let evt = || {
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map(Arc::new)
                .map_err(|e| Error::Kvm { what: "eventfd", source: e })
        };
        let kicks = (0..nq).map(|_| evt()).collect::<Result<Vec<_>, _>>()?;
        let calls = (0..nq).map(|_| evt()).collect::<Result<Vec<_>, _>>()?;
        let routes = calls.iter().map(|c| router.route(c.clone())).collect::<Result<Vec<_>, _>>()?;
        let config_call = evt()?;
        let config_route = router.route(config_call.clone())?;
        let config_generation = Arc::new(AtomicU8::new(0));
        let mut dev = dev;
        {
            let generation = config_generation.clone();
            dev.set_config_notifier(Arc::new(move || {
                generation.fetch_add(1, Ordering::SeqCst);
                let _ = config_call.write(1);
            }));
        }
        let inner = Inner {
            cfg,
            msix,
            dev,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues: sizes.into_iter().map(Queue::new).collect(),
            doorbells_at: None,
        };
        let v = Arc::new(VirtioPci {
            name,
            inner: Mutex::new(inner),
            router,
            kicks,
            calls,
            routes,
            config_route,
            config_generation,
            log,
        });
        {
            let mut i = lock(&v.inner);
            v.sync_doorbells(&mut i)?;
        }
        Ok(v)
    }

    /// Keep the hypervisor's doorbells at the current BAR address.
    fn sync_doorbells(&self, i: &mut Inner) -> Result<(), Error> {
        let now = i.cfg.bar_addr(0);
        if now == i.doorbells_at {
            return Ok(());
        }
        if let Some(old) = i.doorbells_at.take() {
            for (q, k) in self.kicks.iter().enumerate() {
                self.router.remove_doorbell(old + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER), k)?;
            }
        }
        if let Some(base) = now {
            for (q, k) in self.kicks.iter().enumerate() {
                self.router.add_doorbell(base + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER), k.clone())?;
            }
            i.doorbells_at = Some(base);
        }
        Ok(())
    }

    /// Point each queue's interrupt route at the message its MSI-X vector sends now.
    fn sync_routes(&self, i: &Inner) {
        for (q, r) in self.routes.iter().enumerate() {
            let msg = match i.queues[q].vector {
                NO_VECTOR => None,
                v => i.msix.message(&i.cfg, v),
            };
            if let Err(e) = r.set(msg) {
                self.log.error(&format!("{}: cannot route the interrupt of queue {q}: {e}", self.name));
            }
        }
        let msg = match i.config_vector {
            NO_VECTOR => None,
            v => i.msix.message(&i.cfg, v),
        };
        if let Err(e) = self.config_route.set(msg) {
            self.log.error(&format!("{}: cannot route the configuration interrupt: {e}", self.name));
        }
    }

    fn reset_locked(&self, i: &mut Inner) {
        i.dev.reset();
        i.status = 0;
        i.driver_features = 0;
        i.device_feature_select = 0;
        i.driver_feature_select = 0;
        i.config_vector = NO_VECTOR;
        i.queue_select = 0;
        for q in &mut i.queues {
            *q = Queue::new(q.max);
        }
        // Stale signals of the previous driver must not reach the next one.
        for c in &self.calls {
            let _ = c.read();
        }
        self.sync_routes(i);
    }

    fn common_read(&self, i: &Inner, off: u64, data: &mut [u8]) {
        let q = i.queues.get(usize::from(i.queue_select));
        let features = i.dev.features();
        let v: u64 = match off {
            0x00 => u64::from(i.device_feature_select),
            0x04 => match i.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => u64::from(i.driver_feature_select),
            0x0c => match i.driver_feature_select {
                0 => i.driver_features & 0xffff_ffff,
                1 => i.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(i.config_vector),
            0x12 => i.queues.len() as u64,
            0x14 => u64::from(i.status),
            0x15 => u64::from(self.config_generation.load(Ordering::SeqCst)),
            0x16 => u64::from(i.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.enabled)),
            // queue_notify_off: queue n's doorbell is at n * multiplier.
            0x1e => u64::from(i.queue_select),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.driver),
            0x2c => q.map_or(0, |q| q.driver >> 32),
            0x30 => q.map_or(0, |q| q.device),
            0x34 => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn common_write(&self, i: &mut Inner, off: u64, data: &[u8]) {
        // 64-bit fields may be written as one qword or two dwords (§4.1.3.1).
        if data.len() == 8 {
            self.common_write(i, off, &data[..4]);
            self.common_write(i, off + 4, &data[4..]);
            return;
        }
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let live = i.status & VIRTIO_CONFIG_S_DRIVER_OK as u8 != 0;
        let sel = usize::from(i.queue_select);
        let set_half = |x: &mut u64, high: bool| {
            *x = if high { (*x & 0xffff_ffff) | (v << 32) } else { (*x & !0xffff_ffff) | (v & 0xffff_ffff) }
        };
        match off {
            0x00 => i.device_feature_select = v as u32,
            0x08 => i.driver_feature_select = v as u32,
            0x0c if i.status & VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0 => match i.driver_feature_select {
                0 => set_half(&mut i.driver_features, false),
                1 => set_half(&mut i.driver_features, true),
                _ => {}
            },
            0x10 => {
                i.config_vector = if v as u16 >= i.msix.vectors() { NO_VECTOR } else { v as u16 };
                self.sync_routes(i);
            }
            0x14 => self.status_write(i, v as u8),
            0x16 => i.queue_select = v as u16,
            // Queue fields are the driver's to set before DRIVER_OK (§4.1.4.3.2); later writes are ignored.
            0x18 if !live => {
                if let Some(q) = i.queues.get_mut(sel) {
                    // Split rings: any size up to the maximum, a power of two (§2.7).
                    let s = v as u16;
                    if s.is_power_of_two() && s <= q.max {
                        q.size = s;
                    } else {
                        guest_error(&self.log, &format!("{}: queue {sel}: bad queue size {s}", self.name));
                    }
                }
            }
            0x1a => {
                let n = i.msix.vectors();
                if let Some(q) = i.queues.get_mut(sel) {
                    q.vector = if v as u16 >= n { NO_VECTOR } else { v as u16 };
                }
                self.sync_routes(i);
            }
            0x1c if !live => {
                if let Some(q) = i.queues.get_mut(sel) {
                    q.enabled = v & 1 != 0;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if !live => {
                if let Some(q) = i.queues.get_mut(sel) {
                    let high = off & 4 != 0;
                    match off & !4 {
                        0x20 => set_half(&mut q.desc, high),
                        0x28 => set_half(&mut q.driver, high),
                        _ => set_half(&mut q.device, high),
                    }
                }
            }
            _ => {}
        }
    }

    fn status_write(&self, i: &mut Inner, v: u8) {
        if v == 0 {
            self.reset_locked(i);
            return;
        }
        let old = i.status;
        let mut new = v;
        let features_ok = VIRTIO_CONFIG_S_FEATURES_OK as u8;
        if new & features_ok != 0 && old & features_ok == 0 {
            let offered = i.dev.features();
            // The driver may accept only what was offered, and a modern device needs VERSION_1 (§6.1).
            if i.driver_features & !offered != 0 || i.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                guest_error(
                    &self.log,
                    &format!(
                        "{}: driver features {:#x} not acceptable (offered {offered:#x})",
                        self.name, i.driver_features
                    ),
                );
                new &= !features_ok;
            }
        }
        let driver_ok = VIRTIO_CONFIG_S_DRIVER_OK as u8;
        if new & driver_ok != 0 && old & driver_ok == 0 {
            let queues = i
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.enabled)
                .map(|(n, q)| QueueConfig {
                    index: n,
                    size: q.size,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    kick: self.kicks[n].clone(),
                    call: self.calls[n].clone(),
                })
                .collect();
            if let Err(e) = i.dev.activate(i.driver_features, queues) {
                self.log.error(&format!("{}: cannot start the device: {e}", self.name));
                new |= VIRTIO_CONFIG_S_NEEDS_RESET as u8;
            }
        }
        i.status = new;
    }

    fn bar_access(&self, off: u64, read: Option<&mut [u8]>, write: Option<&[u8]>) {
        let mut guard = lock(&self.inner);
        let i = &mut *guard;
        match (off, read, write) {
            (o, Some(d), _) if o < COMMON + COMMON_LEN => self.common_read(i, o, d),
            (o, _, Some(d)) if o < COMMON + COMMON_LEN => self.common_write(i, o, d),
            // ISR: no interrupt is ever signalled through it with MSI-X in use; reading clears it (§4.1.4.5).
            (o, Some(d), _) if (ISR..ISR + 4).contains(&o) => d.fill(0),
            (o, Some(d), _) if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => i.dev.read_config(o - DEVICE, d),
            (o, _, Some(d)) if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => i.dev.write_config(o - DEVICE, d),
            (o, _, Some(_)) if (NOTIFY..NOTIFY + self.kicks.len() as u64 * 4).contains(&o) => {
                // Reached only where the engine has no doorbell in the hypervisor (the software CPU).
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                let _ = self.kicks[q].write(1);
            }
            (o, Some(d), _) if (MSIX_TABLE..MSIX_TABLE + i.msix.table_len()).contains(&o) => {
                i.msix.table_read(o - MSIX_TABLE, d)
            }
            (o, _, Some(d)) if (MSIX_TABLE..MSIX_TABLE + i.msix.table_len()).contains(&o) => {
                let changed = i.msix.table_write(o - MSIX_TABLE, d);
                if changed {
                    self.sync_routes(i);
                }
            }
            (o, Some(d), _) if (MSIX_PBA..MSIX_PBA + 16).contains(&o) => {
                // Up to 65 vectors (64 queues + config): two qwords of pending bits.
                let mut bits = 0u128;
                for (q, r) in self.routes.iter().enumerate() {
                    let v = i.queues[q].vector;
                    if v != NO_VECTOR && r.pending() {
                        bits |= 1 << v;
                    }
                }
                if i.config_vector != NO_VECTOR && self.config_route.pending() {
                    bits |= 1 << i.config_vector;
                }
                let b = bits.to_le_bytes();
                let s = (o - MSIX_PBA) as usize;
                let n = d.len().min(16 - s);
                d[..n].copy_from_slice(&b[s..s + n]);
            }
            (_, Some(d), _) => d.fill(0),
            _ => {}
        }
    }
}

fn class_of(device_type: u16) -> u32 {
    match device_type {
        // Mass storage, SCSI (QEMU's class for virtio-blk).
        2 => 0x01_00_00,
        // Network, Ethernet.
        1 => 0x02_00_00,
        _ => 0xff_00_00,
    }
}

impl PciFunction for VirtioPci {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        lock(&self.inner).cfg.read(offset, data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let mut guard = lock(&self.inner);
        guard.cfg.write(offset, data);
        if let Err(e) = self.sync_doorbells(&mut guard) {
            self.log.error(&format!("{}: cannot move the doorbells: {e}", self.name));
        }
        // MSI-X enable and function mask live in configuration space.
        self.sync_routes(&guard);
    }

    fn bar_lookup(&self, addr: u64) -> Option<(usize, u64)> {
        let base = lock(&self.inner).cfg.bar_addr(0)?;
        (addr >= base && addr - base < BAR_SIZE).then(|| (0, addr - base))
    }

    fn bar_read(&self, _bar: usize, offset: u64, data: &mut [u8]) {
        self.bar_access(offset, Some(data), None);
    }

    fn bar_write(&self, _bar: usize, offset: u64, data: &[u8]) {
        self.bar_access(offset, None, Some(data));
    }

    fn reset(&self) {
        let mut guard = lock(&self.inner);
        self.reset_locked(&mut guard);
        guard.cfg.reset();
        guard.msix.reset();
        if let Err(e) = self.sync_doorbells(&mut guard) {
            self.log.error(&format!("{}: cannot move the doorbells: {e}", self.name));
        }
        self.sync_routes(&guard);
    }
}

/// `-d guest_errors`: the driver did something the spec forbids.
fn guest_error(log: &GuestLog, msg: &str) {
    if log.enabled("guest_errors") {
        log.line_for("guest_errors", msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msi::{MsiMessage, ThreadedMsiRouter};
    use std::time::{Duration, Instant};

    /// (features, queue index, size, descriptor table) per activated queue.
    type Activated = Arc<Mutex<Vec<(u64, usize, u16, u64)>>>;

    struct FakeDev {
        activated: Activated,
        notify: Arc<Mutex<Option<super::super::ConfigNotifier>>>,
    }

    impl VirtioDevice for FakeDev {
        fn device_type(&self) -> u16 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![128, 128]
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1 | 1 << 9
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            data.fill((offset as u8).wrapping_add(0x10));
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, features: u64, queues: Vec<QueueConfig>) -> Result<(), String> {
            let mut a = self.activated.lock().unwrap();
            for q in queues {
                a.push((features, q.index, q.size, q.desc));
            }
            Ok(())
        }
        fn reset(&mut self) {}
        fn set_config_notifier(&mut self, n: super::super::ConfigNotifier) {
            *self.notify.lock().unwrap() = Some(n);
        }
    }

    fn w(d: &VirtioPci, off: u64, v: u64, len: usize) {
        d.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(d: &VirtioPci, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn a_configuration_change_moves_the_generation_and_fires_the_config_vector() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let router = ThreadedMsiRouter::new(Arc::new(move |m| g.lock().unwrap().push(m))).unwrap();
        let notify = Arc::new(Mutex::new(None));
        let dev = FakeDev { activated: Default::default(), notify: notify.clone() };
        let d = VirtioPci::new("t".into(), Box::new(dev), 0xc000_0000, router, GuestLog::stderr(vec![])).unwrap();
        // Vector 2 (after the two queues' candidates) for configuration changes, MSI-X on.
        w(&d, 0x4000 + 32, 0xfee0_0000, 4);
        w(&d, 0x4000 + 40, 0x44, 4);
        w(&d, 0x4000 + 44, 0, 4);
        d.config_write(0x40 + 3, &[0x80]);
        w(&d, 0x10, 2, 2);
        assert_eq!(r(&d, 0x10, 2), 2);
        let before = r(&d, 0x15, 1);
        let n = notify.lock().unwrap().clone().expect("the transport gave the device a notifier");
        n();
        assert_eq!(r(&d, 0x15, 1), (before + 1) & 0xff, "config_generation moved on");
        let t = Instant::now();
        while got.lock().unwrap().is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*got.lock().unwrap(), vec![MsiMessage { address: 0xfee0_0000, data: 0x44 }]);
    }

    #[test]
    fn random_guest_accesses_never_panic() {
        let router = ThreadedMsiRouter::new(Arc::new(|_| {})).unwrap();
        let activated = Arc::new(Mutex::new(Vec::new()));
        let d = VirtioPci::new(
            "t".into(),
            Box::new(FakeDev { activated, notify: Default::default() }),
            0xc000_0000,
            router,
            GuestLog::stderr(vec![]),
        )
        .unwrap();
        // xorshift: deterministic, no extra crate.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let r = next();
            let len = [1usize, 2, 4, 8][(r & 3) as usize];
            let v = next().to_le_bytes();
            let write = r & 4 != 0;
            if r & 8 != 0 {
                // Configuration space: dword-aligned registers, any lane that fits.
                let off = ((r >> 8) & 0xff) as u16;
                let len = len.min(4 - usize::from(off & 3));
                if write {
                    d.config_write(off, &v[..len]);
                } else {
                    let mut b = [0u8; 8];
                    d.config_read(off, &mut b[..len]);
                }
            } else {
                // Mostly the interesting low part of the BAR, sometimes anywhere in it.
                let off = if r & 16 != 0 {
                    (r >> 8) % BAR_SIZE
                } else {
                    (r >> 8) % 0x40 + [0, 0x4000, 0x5000][((r >> 40) % 3) as usize]
                };
                if write {
                    d.bar_write(0, off, &v[..len]);
                } else {
                    let mut b = [0u8; 8];
                    d.bar_read(0, off, &mut b[..len]);
                }
            }
        }
    }

    #[test]
    fn a_driver_negotiates_sets_up_a_queue_and_gets_msix_interrupts() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let router = ThreadedMsiRouter::new(Arc::new(move |m| g.lock().unwrap().push(m))).unwrap();
        let activated = Arc::new(Mutex::new(Vec::new()));
        let log = GuestLog::stderr(vec![]);
        let d = VirtioPci::new(
            "t".into(),
            Box::new(FakeDev { activated: activated.clone(), notify: Default::default() }),
            0xc000_0000,
            router,
            log,
        )
        .unwrap();
        assert_eq!(d.bar_lookup(0xc000_3004), Some((0, 0x3004)));
        assert_eq!(d.bar_lookup(0xc000_8000), None);
        let mut id = [0u8; 4];
        d.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        assert_eq!(r(&d, 0x12, 2), 2, "num_queues");
        w(&d, 0x00, 1, 4);
        assert_eq!(r(&d, 0x04, 4), 1, "VERSION_1 in the high half");
        // A feature that was not offered makes FEATURES_OK fail.
        w(&d, 0x08, 0, 4);
        w(&d, 0x0c, 1 << 5, 4);
        w(&d, 0x14, 0xb, 1);
        assert_eq!(r(&d, 0x14, 1), 3);
        w(&d, 0x14, 0, 1);
        w(&d, 0x08, 1, 4);
        w(&d, 0x0c, 1, 4);
        w(&d, 0x14, 0xb, 1);
        assert_eq!(r(&d, 0x14, 1), 0xb);
        w(&d, 0x16, 1, 2);
        w(&d, 0x18, 100, 2);
        assert_eq!(r(&d, 0x18, 2), 128, "not a power of two: refused");
        w(&d, 0x18, 64, 2);
        w(&d, 0x20, 0x12_3456_7000, 8);
        w(&d, 0x1a, 1, 2);
        assert_eq!(r(&d, 0x1a, 2), 1);
        w(&d, 0x1c, 1, 2);
        w(&d, 0x14, 0xf, 1);
        assert_eq!(*activated.lock().unwrap(), vec![(1 << 32, 1, 64, 0x12_3456_7000)]);
        assert_eq!(r(&d, 0x2000 + 4, 1), 0x14, "device configuration");
        // Doorbell of queue 1 (no hypervisor doorbell with this router): the kick eventfd is signalled.
        w(&d, 0x3004, 1, 2);
        assert_eq!(d.kicks[1].read().unwrap(), 1);
        // The backend signals queue 1 while MSI-X is off: held, visible in the PBA once a vector is set.
        d.calls[1].write(1).unwrap();
        let t = Instant::now();
        while r(&d, 0x5000, 8) != 2 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(r(&d, 0x5000, 8), 2, "PBA bit of vector 1");
        // Program vector 1, enable MSI-X: the held interrupt is delivered.
        w(&d, 0x4000 + 16, 0xfee0_0000, 4);
        w(&d, 0x4000 + 24, 0x33, 4);
        w(&d, 0x4000 + 28, 0, 4);
        d.config_write(0x40 + 3, &[0x80]);
        assert_eq!(*got.lock().unwrap(), vec![MsiMessage { address: 0xfee0_0000, data: 0x33 }]);
        // Moving the BAR moves the structures.
        d.config_write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(d.bar_lookup(0xd000_0012), Some((0, 0x12)));
        d.reset();
        assert_eq!(d.bar_lookup(0xc000_0000), Some((0, 0)));
        assert_eq!(r(&d, 0x14, 1), 0);
    }
}
