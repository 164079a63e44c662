//! The KVM VM: created anew for each boot (a guest reboot gets fresh vCPUs, LAPICs, IOAPIC, PIC and PIT, all in
//! power-on state), with the same guest RAM and the same interrupt lines.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::cpuid::{self, CpuModel};
use super::msi::{KvmIrqState, KvmMsiRouter};
use super::vcpu::{install_kick_handler, KvmVcpu};
use crate::devices::serial::IrqLine;
use crate::memory::GuestRam;
use crate::runloop::{Engine, VcpuHandle};
use crate::Error;

/// Three pages just below the BIOS area at the top of 4 GiB, outside guest RAM: KVM needs them for the
/// real-mode TSS and the EPT identity map on Intel hosts (KVM API, KVM_SET_TSS_ADDR / KVM_SET_IDENTITY_MAP_ADDR).
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// An ISA interrupt line through an irqfd: a write to the eventfd pulses the GSI in the in-kernel PIC and
/// IOAPIC (KVM's default routing maps GSI 0–15 to both).
struct IrqFd(Arc<EventFd>);

impl IrqLine for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct KvmEngine {
    kvm: Kvm,
    ram: Arc<GuestRam>,
    smp: u32,
    model: CpuModel,
    supported: CpuId,
    irqs: Vec<(Arc<EventFd>, u32)>,
    vm: Option<Arc<VmFd>>,
    /// MSI routes and doorbells of PCI devices, replayed on each new VM.
    msi: Arc<Mutex<KvmIrqState>>,
}

/// The `/dev/kvm` descriptor the launcher passed in `CoreConfig::kvm`: a sandboxed core cannot open the device
/// by path (its root is empty and the filter answers path lookups ENOENT). A process-wide slot, filled by main
/// before the VM is built, so that engine construction stays the same for KVM and the software CPU.
static PROVIDED_DEVICE: std::sync::Mutex<Option<std::os::fd::OwnedFd>> = std::sync::Mutex::new(None);

/// Hand the engine the `/dev/kvm` descriptor the launcher opened; the next [`KvmEngine::open`] uses it.
pub fn provide_device(fd: std::os::fd::OwnedFd) {
    *PROVIDED_DEVICE.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
}

fn take_provided_device() -> Option<std::os::fd::OwnedFd> {
    PROVIDED_DEVICE.lock().unwrap_or_else(|p| p.into_inner()).take()
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm { what, source: std::io::Error::from_raw_os_error(e.errno()) }
}

impl KvmEngine {
    /// Take the `/dev/kvm` the launcher passed ([`provide_device`]), or open it by path when none was (a core
    /// started without a launcher, unsandboxed), and check that it offers what the core needs.
    pub fn open(ram: Arc<GuestRam>, smp: u32, model: CpuModel) -> Result<KvmEngine, Error> {
        let kvm = match take_provided_device() {
            // SAFETY: the descriptor is an open /dev/kvm the launcher passed, owned by this process; into_raw_fd
            // gives its ownership to the Kvm object, which closes it.
            Some(fd) => unsafe {
                <Kvm as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
            },
            None => Kvm::new().map_err(|e| Error::KvmInit(std::io::Error::from_raw_os_error(e.errno())))?,
        };
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmMissing(name));
            }
        }
        let max = kvm.get_max_vcpus();
        if smp == 0 || smp as usize > max {
            // QEMU accel/kvm/kvm-all.c wording.
            return Err(Error::Config(format!(
                "Number of SMP cpus requested ({smp}) exceeds the maximum cpus supported by KVM ({max})"
            )));
        }
        let supported =
            kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        install_kick_handler()
            .map_err(|e| Error::Kvm { what: "installing the vCPU kick signal handler", source: e })?;
        Ok(KvmEngine { kvm, ram, smp, model, supported, irqs: Vec::new(), vm: None, msi: Default::default() })
    }

    fn create_vm(&self) -> Result<VmFd, Error> {
        let vm = self.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDR).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(IDENTITY_MAP_ADDR).map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        // The dummy speaker gives port 0x61 to the in-kernel PIT too (Linux reads it while calibrating).
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        for (slot, (region, host)) in self.ram.host_regions().into_iter().enumerate() {
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.guest_addr,
                memory_size: region.size,
                userspace_addr: host,
            };
            // SAFETY: `host` is the start of a mapping of `region.size` bytes owned by `self.ram`, which this
            // engine keeps alive (Arc) for as long as the VM exists; the slot is new in a new VM.
            unsafe { vm.set_user_memory_region(mr) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        for (evt, gsi) in &self.irqs {
            vm.register_irqfd(evt, *gsi).map_err(kvm_err("KVM_IRQFD"))?;
        }
        Ok(vm)
    }
}

impl Engine for KvmEngine {
    fn create_vcpus(&mut self) -> Result<Vec<VcpuHandle>, Error> {
        // The previous VM (if any) goes first: its vCPU threads have ended.
        self.vm = None;
        crate::pci::lock(&self.msi).clear_vm();
        let vm = Arc::new(self.create_vm()?);
        crate::pci::lock(&self.msi).apply(vm.clone())?;
        let mut out = Vec::new();
        for index in 0..self.smp {
            let fd = vm.create_vcpu(u64::from(index)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let entries = cpuid::for_vcpu(self.supported.as_slice(), self.model, index, self.smp);
            let table = CpuId::from_entries(&entries)
                .map_err(|e| Error::Config(format!("CPUID table for vCPU {index}: {e:?}")))?;
            fd.set_cpuid2(&table).map_err(kvm_err("KVM_SET_CPUID2"))?;
            // The application processors stay in wait-for-SIPI in the in-kernel LAPIC until the guest starts
            // them (INIT-SIPI-SIPI), as on real hardware; only vCPU 0 gets the boot entry state.
            let vcpu = KvmVcpu::new(fd, index);
            let kick = vcpu.kicker();
            out.push(VcpuHandle { vcpu: Box::new(vcpu), kick });
        }
        self.vm = Some(vm);
        Ok(out)
    }

    fn irq_line(&mut self, irq: u32) -> Result<Arc<dyn IrqLine>, Error> {
        if irq > 15 {
            return Err(Error::Config(format!("ISA IRQ {irq} does not exist")));
        }
        let evt = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(|e| Error::Kvm { what: "eventfd", source: e })?,
        );
        if let Some(vm) = &self.vm {
            vm.register_irqfd(&evt, irq).map_err(kvm_err("KVM_IRQFD"))?;
        }
        self.irqs.push((evt.clone(), irq));
        Ok(Arc::new(IrqFd(evt)))
    }

    fn msi_router(&mut self) -> Result<Arc<dyn crate::pci::msi::MsiRouter>, Error> {
        if !self.kvm.check_extension(Cap::IrqRouting) || !self.kvm.check_extension(Cap::Ioeventfd) {
            return Err(Error::KvmMissing("KVM_CAP_IRQ_ROUTING and KVM_CAP_IOEVENTFD (needed for PCI devices)"));
        }
        Ok(Arc::new(KvmMsiRouter(self.msi.clone())))
    }
}
