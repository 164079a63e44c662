//! MSI-X and doorbells on KVM: a backend's call eventfd is an irqfd on a GSI routed to the vector's MSI message
//! (KVM_SET_GSI_ROUTING with KVM_IRQ_ROUTING_MSI), and a virtqueue doorbell is an ioeventfd (KVM_IOEVENTFD), so
//! the data path never enters the core (KVM API, 4.75 KVM_IRQFD, 4.59 KVM_IOEVENTFD, 4.52 KVM_SET_GSI_ROUTING).
//!
//! The VM is created anew on every boot; what is registered here is replayed on the new VM ([`KvmIrqState::
//! apply`]).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::lock;
use crate::pci::msi::{MsiMessage, MsiRoute, MsiRouter};
use crate::Error;

/// GSIs 0-23 are the PIC/IOAPIC pins; MSI routes use the GSIs after them.
const FIRST_MSI_GSI: u32 = 24;

struct MsiSlot {
    gsi: u32,
    evt: Arc<EventFd>,
    msg: Option<MsiMessage>,
    /// The irqfd is registered on the current VM.
    registered: bool,
}

#[derive(Default)]
pub struct KvmIrqState {
    vm: Option<Arc<VmFd>>,
    doorbells: Vec<(u64, Arc<EventFd>)>,
    msi: Vec<MsiSlot>,
}

fn kerr(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm { what, source: std::io::Error::from_raw_os_error(e.errno()) }
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl KvmIrqState {
    /// The whole routing table: KVM_SET_GSI_ROUTING replaces KVM's default one, so the PIC and IOAPIC routes
    /// of GSI 0-23 are repeated as KVM sets them up (arch/x86/kvm/irq_comm.c, default_routing).
    fn routing(&self) -> Result<KvmIrqRouting, Error> {
        let mut entries = Vec::new();
        for gsi in 0..24u32 {
            if gsi < 8 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for s in &self.msi {
            if let Some(m) = s.msg {
                let mut e = kvm_irq_routing_entry { gsi: s.gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
                e.u.msi.address_lo = m.address as u32;
                e.u.msi.address_hi = (m.address >> 32) as u32;
                e.u.msi.data = m.data;
                entries.push(e);
            }
        }
        KvmIrqRouting::from_entries(&entries).map_err(|e| Error::Config(format!("GSI routing table: {e:?}")))
    }

    fn sync(&mut self) -> Result<(), Error> {
        let Some(vm) = self.vm.clone() else { return Ok(()) };
        vm.set_gsi_routing(&self.routing()?).map_err(kerr("KVM_SET_GSI_ROUTING"))?;
        for s in &mut self.msi {
            match (s.msg.is_some(), s.registered) {
                (true, false) => {
                    // KVM delivers at once if the eventfd was signalled while unregistered (masked).
                    vm.register_irqfd(&s.evt, s.gsi).map_err(kerr("KVM_IRQFD"))?;
                    s.registered = true;
                }
                (false, true) => {
                    vm.unregister_irqfd(&s.evt, s.gsi).map_err(kerr("KVM_IRQFD (deassign)"))?;
                    s.registered = false;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A new VM (boot or reboot): register every doorbell and route on it.
    pub fn apply(&mut self, vm: Arc<VmFd>) -> Result<(), Error> {
        for (addr, evt) in &self.doorbells {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(*addr), NoDatamatch).map_err(kerr("KVM_IOEVENTFD"))?;
        }
        for s in &mut self.msi {
            s.registered = false;
        }
        self.vm = Some(vm);
        self.sync()
    }

    pub fn clear_vm(&mut self) {
        self.vm = None;
    }
}

/// [`MsiRouter`] for KVM, shared with the engine.
pub struct KvmMsiRouter(pub Arc<Mutex<KvmIrqState>>);

struct KvmRoute {
    state: Arc<Mutex<KvmIrqState>>,
    index: usize,
}

impl MsiRoute for KvmRoute {
    fn set(&self, msg: Option<MsiMessage>) -> Result<(), Error> {
        let mut st = lock(&self.state);
        if st.msi[self.index].msg == msg {
            return Ok(());
        }
        st.msi[self.index].msg = msg;
        st.sync()
    }

    fn pending(&self) -> bool {
        let st = lock(&self.state);
        let s = &st.msi[self.index];
        if s.registered {
            return false;
        }
        let mut p = libc::pollfd { fd: s.evt.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }
}

impl MsiRouter for KvmMsiRouter {
    fn route(&self, evt: Arc<EventFd>) -> Result<Arc<dyn MsiRoute>, Error> {
        let mut st = lock(&self.0);
        let index = st.msi.len();
        st.msi.push(MsiSlot { gsi: FIRST_MSI_GSI + index as u32, evt, msg: None, registered: false });
        Ok(Arc::new(KvmRoute { state: self.0.clone(), index }))
    }

    fn add_doorbell(&self, addr: u64, evt: Arc<EventFd>) -> Result<bool, Error> {
        let mut st = lock(&self.0);
        if let Some(vm) = &st.vm {
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(kerr("KVM_IOEVENTFD"))?;
        }
        st.doorbells.push((addr, evt));
        Ok(true)
    }

    fn remove_doorbell(&self, addr: u64, evt: &Arc<EventFd>) -> Result<(), Error> {
        let mut st = lock(&self.0);
        let before = st.doorbells.len();
        st.doorbells.retain(|(a, e)| !(*a == addr && Arc::ptr_eq(e, evt)));
        if st.doorbells.len() != before {
            if let Some(vm) = &st.vm {
                vm.unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
                    .map_err(kerr("KVM_IOEVENTFD (deassign)"))?;
            }
        }
        Ok(())
    }
}
