//! ACPI tables for the platform (ACPI 6.5): RSDP → XSDT and RSDT → FADT (→ FACS, DSDT) and
//! MADT, written into a caller-provided buffer that the core copies to guest memory.
//!
//! Built with rust-vmm's `acpi_tables` 0.2.1. Where it falls short the bytes are written here:
//! - its `Rsdp` has no setter for the 32-bit RSDT address (private field): patched in place and
//!   both checksums recomputed;
//! - it has no RSDT type: built on its generic `Sdt`;
//! - its `MADT` has no interrupt source override / LAPIC NMI structures and no setter for the
//!   header flags (PCAT_COMPAT): the MADT is built on `Sdt`, using the crate's
//!   `ProcessorLocalApic` and `IoApic` encoders for those entries.
//!
//! The DSDT's AML (`\_S5`, COM devices) uses the crate's `aml` module.
//!
//! The HPET table (not in `acpi_tables`) is written by hand, and only when asked for.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic as MadtIoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::acpi_pm::{PM1A_CNT, PM1A_EVT, PM_TMR, RESET_CONTROL, SLP_TYP_S5};
use crate::hpet::{GCAP_ID, HPET_BASE};
use crate::ioapic::IOAPIC_BASE;
use crate::lapic::APIC_DEFAULT_BASE;
use crate::platform::{IRQ_PIT, IRQ_SCI};
use crate::PlatformError;

const OEM_ID: [u8; 6] = *b"TESSRA";
const OEM_TABLE_ID: [u8; 8] = *b"TESSERA ";
const OEM_REVISION: u32 = 1;

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    /// Number of CPUs (LAPIC IDs 0..cpus).
    pub cpus: u8,
    /// IOAPIC ID ([`crate::Platform::ioapic_id`]).
    pub ioapic_id: u8,
    /// The PM timer is 32 bits ([`crate::PlatformConfig::pm_timer_32bit`]).
    pub pm_timer_32bit: bool,
    /// An i8042 is present (FADT IAPC_BOOT_ARCH bit 1); without it Linux skips the i8042.
    pub i8042: bool,
    /// Describe the HPET (ACPI HPET table). Linux then prefers it for calibration,
    /// clocksource and (legacy replacement) the boot clockevent, as on QEMU's default machine.
    pub hpet: bool,
    /// 16550 UARTs to describe as PNP0501 devices: (I/O base, ISA IRQ). May be empty: Linux
    /// finds COM1-4 at their legacy addresses without ACPI.
    pub serial_ports: Vec<(u16, u8)>,
}

/// Where the tables went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    /// Guest physical address of the RSDP (for `boot_params.acpi_rsdp_addr` or PVH
    /// `rsdp_paddr`).
    pub rsdp_addr: u64,
    /// Bytes of the buffer used.
    pub len: usize,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

fn io_gas(bits: u8, access: AccessSize, port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

/// ISO flags (ACPI 6.5 table "MPS INTI Flags"): polarity bits 1:0, trigger mode bits 3:2.
const MPS_INTI_CONFORMING: u16 = 0;
const MPS_INTI_ACTIVE_HIGH_LEVEL: u16 = 0b01 | (0b11 << 2);

fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, APIC_DEFAULT_BASE as u32);
    // PCAT_COMPAT: a dual 8259 is present (Linux masks it when it goes to APIC mode).
    madt.write_u32(40, 1);
    for cpu in 0..cfg.cpus {
        madt.append_slice(&bytes_of(&ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled)));
    }
    madt.append_slice(&bytes_of(&MadtIoApic::new(cfg.ioapic_id, IOAPIC_BASE as u32, 0)));
    // Interrupt source overrides (type 2, length 10): bus 0 (ISA), source IRQ, GSI, flags.
    let iso = |irq: u8, gsi: u32, flags: u16| {
        let mut v = vec![2u8, 10, 0, irq];
        v.extend_from_slice(&gsi.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    };
    // The PIT's IRQ0 arrives on IOAPIC pin 2 (crate::platform::isa_irq_to_gsi).
    madt.append_slice(&iso(IRQ_PIT, 2, MPS_INTI_CONFORMING));
    // The SCI is level-triggered, active high (ACPI 6.5 §5.2.12.5).
    madt.append_slice(&iso(IRQ_SCI, u32::from(IRQ_SCI), MPS_INTI_ACTIVE_HIGH_LEVEL));
    // Local APIC NMI (type 4, length 6): all processors (0xff), LINT1, conforming flags.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.as_slice().to_vec()
}

/// The HPET description table (IA-PC HPET Specification 1.0a §3.2.4).
fn build_hpet() -> Vec<u8> {
    let mut t = Sdt::new(*b"HPET", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // Event Timer Block ID: the low 32 bits of the capabilities register.
    t.append_slice(&(GCAP_ID as u32).to_le_bytes());
    // Base address: GAS in system memory, 64-bit registers.
    t.append_slice(&bytes_of(&GAS::new(AddressSpace::SystemMemory, 64, 0, AccessSize::Undefined, HPET_BASE)));
    t.append_slice(&[0]); // HPET number
    t.append_slice(&128u16.to_le_bytes()); // minimum clock tick in periodic mode
    t.append_slice(&[0]); // no page protection
    t.as_slice().to_vec()
}

/// PCI bus 0 for the DSDT: with ACPI tables, Linux scans only the PCI root bridges the DSDT declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciRootWindow {
    /// The 32-bit MMIO window BARs live in, `[start, end)`.
    pub mmio_start: u32,
    pub mmio_end: u32,
}

/// `Device (PCI0)`: a PCI host bridge (`PNP0A03`, segment 0, bus 0) whose `_CRS` hands out bus numbers 0-0xff,
/// the configuration ports 0xcf8-0xcff, the rest of the port space and the MMIO window (ACPI 6.5 §6.4.3.5).
/// No `_PRT`: the core's PCI functions interrupt with MSI-X only.
fn pci_root(w: &PciRootWindow) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0A03");
    let zero = aml::ZERO;
    let bus = aml::AddressSpace::new_bus_number(0u16, 0xffu16);
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mem = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        w.mmio_start,
        w.mmio_end.saturating_sub(1),
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mem]);
    let hid = aml::Name::new("_HID".into(), &hid);
    let seg = aml::Name::new("_SEG".into(), &zero);
    let bbn = aml::Name::new("_BBN".into(), &zero);
    let uid = aml::Name::new("_UID".into(), &zero);
    let crs = aml::Name::new("_CRS".into(), &crs);
    bytes_of(&aml::Device::new("PCI0".into(), vec![&hid, &seg, &bbn, &uid, &crs]))
}

fn build_dsdt(cfg: &AcpiConfig, pci: Option<&PciRootWindow>) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // \_S5: PM1a_CNT.SLP_TYP, PM1b_CNT.SLP_TYP, two reserved. Linux reads element 0 and writes
    // it into SLP_TYP with SLP_EN; acpi_pm turns exactly that into a power-off.
    let s5_typ = SLP_TYP_S5;
    let zero = 0u8;
    let pkg = aml::Package::new(vec![&s5_typ, &zero, &zero, &zero]);
    dsdt.append_slice(&bytes_of(&aml::Name::new("_S5_".into(), &pkg)));
    let mut devices = Vec::new();
    if let Some(w) = pci {
        devices.push(pci_root(w));
    }
    if !cfg.serial_ports.is_empty() || !devices.is_empty() {
        for (i, &(base, irq)) in cfg.serial_ports.iter().enumerate() {
            let hid = aml::EISAName::new("PNP0501");
            let uid = (i + 1) as u8;
            let io = aml::IO::new(base, base, 1, 8);
            let int = aml::Interrupt::new(true, true, false, false, u32::from(irq));
            let crs = aml::ResourceTemplate::new(vec![&io, &int]);
            let name = format!("COM{}", i + 1);
            let hid = aml::Name::new("_HID".into(), &hid);
            let uid = aml::Name::new("_UID".into(), &uid);
            let crs = aml::Name::new("_CRS".into(), &crs);
            let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
            devices.push(bytes_of(&dev));
        }
        // Scope(\_SB) { devices }, encoded with the crate's Scope over pre-built bytes.
        let raw: Vec<RawAml> = devices.into_iter().map(RawAml).collect();
        let children: Vec<&dyn Aml> = raw.iter().map(|r| r as &dyn Aml).collect();
        dsdt.append_slice(&bytes_of(&aml::Scope::new("\\_SB_".into(), children)));
    }
    dsdt.as_slice().to_vec()
}

/// Already-encoded AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn build_fadt(cfg: &AcpiConfig, facs: u32, dsdt: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_32(facs)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton) // no fixed sleep button
        .flag(Flags::RtcS4)
        .flag(Flags::ResetRegSup)
        .flag(Flags::UsePlatformClock);
    if cfg.pm_timer_32bit {
        b = b.flag(Flags::TmrValExt);
    }
    // Both DSDT pointers, equal (ACPICA prefers X_DSDT and warns if they differ).
    b.dsdt = (dsdt as u32).into();
    b.x_dsdt = dsdt.into();
    b.sci_int = u16::from(IRQ_SCI).into();
    // SMI_CMD = 0: no legacy mode, the platform is always in ACPI mode (ACPI 6.5 §4.8.2.5).
    b.pm1a_evt_blk = u32::from(PM1A_EVT).into();
    b.pm1a_cnt_blk = u32::from(PM1A_CNT).into();
    b.pm_tmr_blk = u32::from(PM_TMR).into();
    b.pm1_evt_len = 4;
    b.pm1_cnt_len = 2;
    b.pm_tmr_len = 4;
    b.x_pm1a_evt_blk = io_gas(32, AccessSize::Undefined, PM1A_EVT);
    b.x_pm1a_cnt_blk = io_gas(16, AccessSize::Undefined, PM1A_CNT);
    b.x_pm_tmr_blk = io_gas(32, AccessSize::Undefined, PM_TMR);
    // C2/C3 not supported (latencies above 100 / 1000 µs), as QEMU says.
    b.p_lvl2_lat = 0x0fff.into();
    b.p_lvl3_lat = 0x03e9.into();
    // CMOS index of the century register.
    b.century = 0x32;
    b.iapc_boot_arch = if cfg.i8042 { 1u16 << 1 } else { 0 }.into();
    b.reset_reg = io_gas(8, AccessSize::ByteAccess, RESET_CONTROL);
    b.reset_value = 0x06;
    bytes_of(&b.finalize())
}

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Writes RSDP, FACS, DSDT, FADT, MADT, XSDT and RSDT into `buf`, which the caller will copy to
/// guest physical address `guest_addr` (16-byte aligned, everything below 4 GiB for the RSDT's
/// 32-bit pointers). Put it at 0xe0000 and Linux also finds the RSDP by its BIOS-area scan.
pub fn write_tables(cfg: &AcpiConfig, buf: &mut [u8], guest_addr: u64) -> Result<AcpiLayout, PlatformError> {
    write_tables_with_pci(cfg, None, buf, guest_addr)
}

/// [`write_tables`] with a PCI host bridge in the DSDT (for a machine with the core's PCI bus 0).
pub fn write_tables_with_pci(
    cfg: &AcpiConfig,
    pci: Option<&PciRootWindow>,
    buf: &mut [u8],
    guest_addr: u64,
) -> Result<AcpiLayout, PlatformError> {
    if guest_addr & 0xf != 0 {
        return Err(PlatformError::InvalidConfig(format!(
            "ACPI tables at {guest_addr:#x}: the RSDP must be 16-byte aligned"
        )));
    }
    if cfg.serial_ports.len() > 4 {
        return Err(PlatformError::InvalidConfig(format!(
            "{} serial ports for the DSDT; COM1-COM4 at most",
            cfg.serial_ports.len()
        )));
    }
    if cfg.cpus == 0 {
        return Err(PlatformError::InvalidConfig("ACPI tables for zero CPUs".into()));
    }
    let rsdp_off = 0usize;
    let facs_off = align(rsdp_off + Rsdp::len(), 64); // FACS must be 64-byte aligned
    let dsdt_off = align(facs_off + FACS::len(), 8);
    let dsdt = build_dsdt(cfg, pci);
    let fadt_off = align(dsdt_off + dsdt.len(), 8);
    let addr = |off: usize| guest_addr + off as u64;
    let fadt = build_fadt(cfg, addr(facs_off) as u32, addr(dsdt_off));
    let madt_off = align(fadt_off + fadt.len(), 8);
    let madt = build_madt(cfg);
    let hpet_off = align(madt_off + madt.len(), 8);
    let hpet = if cfg.hpet { build_hpet() } else { Vec::new() };
    let xsdt_off = align(hpet_off + hpet.len(), 8);
    let mut entries = vec![addr(fadt_off), addr(madt_off)];
    if cfg.hpet {
        entries.push(addr(hpet_off));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &e in &entries {
        xsdt.add_entry(e);
    }
    let xsdt = bytes_of(&xsdt);
    let rsdt_off = align(xsdt_off + xsdt.len(), 8);
    let mut rsdt = Sdt::new(*b"RSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &e in &entries {
        rsdt.append_slice(&(e as u32).to_le_bytes());
    }
    let rsdt = rsdt.as_slice().to_vec();
    let len = rsdt_off + rsdt.len();

    if guest_addr + len as u64 > 1 << 32 {
        return Err(PlatformError::InvalidConfig(format!(
            "ACPI tables at {guest_addr:#x} would end above 4 GiB; the RSDT holds 32-bit pointers"
        )));
    }
    if buf.len() < len {
        return Err(PlatformError::AcpiBufferTooSmall { needed: len, available: buf.len() });
    }

    let mut rsdp = bytes_of(&Rsdp::new(OEM_ID, addr(xsdt_off)));
    // RsdtAddress at offset 16; checksum (offset 8) covers the first 20 bytes, the extended
    // checksum (offset 32) all 36 (ACPI 6.5 §5.2.5.3).
    rsdp[16..20].copy_from_slice(&(addr(rsdt_off) as u32).to_le_bytes());
    rsdp[8] = 0;
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = 0;
    rsdp[32] = checksum(&rsdp);

    buf[..len].fill(0);
    for (off, bytes) in [
        (rsdp_off, rsdp),
        (facs_off, bytes_of(&FACS::new())),
        (dsdt_off, dsdt),
        (fadt_off, fadt),
        (madt_off, madt),
        (hpet_off, hpet),
        (xsdt_off, xsdt),
        (rsdt_off, rsdt),
    ] {
        buf[off..off + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(AcpiLayout { rsdp_addr: guest_addr, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xe0000;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// Returns the table at guest address `addr` after checking signature and checksum.
    fn table<'a>(buf: &'a [u8], addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (addr - BASE) as usize;
        assert_eq!(&buf[off..off + 4], sig);
        let len = u32_at(buf, off + 4) as usize;
        let t = &buf[off..off + len];
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    fn config() -> AcpiConfig {
        AcpiConfig {
            cpus: 2,
            ioapic_id: 2,
            pm_timer_32bit: false,
            i8042: true,
            hpet: false,
            serial_ports: vec![(0x3f8, 4), (0x2f8, 3)],
        }
    }

    #[test]
    fn a_pci_root_bridge_is_declared_only_when_asked_for() {
        let dsdt_of = |pci: Option<&PciRootWindow>| {
            let mut buf = vec![0u8; 0x2000];
            write_tables_with_pci(&config(), pci, &mut buf, BASE).unwrap();
            // The FADT (found through the XSDT's first entry) points at the DSDT.
            let xsdt = u64_at(&buf, 24) - BASE;
            let fadt = (u64_at(&buf, xsdt as usize + 36) - BASE) as usize;
            let dsdt = (u64_at(&buf, fadt + 140) - BASE) as usize;
            let len = u32_at(&buf, dsdt + 4) as usize;
            assert_eq!(buf[dsdt..dsdt + len].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "DSDT checksum");
            buf[dsdt..dsdt + len].to_vec()
        };
        let has = |d: &[u8], n: &[u8]| d.windows(n.len()).any(|w| w == n);
        let w = PciRootWindow { mmio_start: 0xc000_0000, mmio_end: 0xfec0_0000 };
        let with = dsdt_of(Some(&w));
        assert!(has(&with, b"PCI0"));
        // PNP0A03 as a compressed EISA ID, and the window's last byte address in the DWord memory descriptor.
        assert!(has(&with, &[0x41, 0xd0, 0x0a, 0x03]));
        assert!(has(&with, &0xfebf_ffffu32.to_le_bytes()));
        assert!(has(&with, b"COM1"), "the serial ports stay");
        assert!(!has(&dsdt_of(None), b"PCI0"));
    }

    fn build(cfg: &AcpiConfig) -> (Vec<u8>, AcpiLayout) {
        let mut buf = vec![0xaau8; 0x2000];
        let l = write_tables(cfg, &mut buf, BASE).unwrap();
        (buf, l)
    }

    #[test]
    fn rsdp_points_to_xsdt_and_rsdt_with_the_same_tables() {
        let (buf, l) = build(&config());
        assert_eq!(l.rsdp_addr, BASE);
        let r = &buf[..36];
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(r), 0);
        assert_eq!(r[15], 2, "revision 2: XSDT present");
        let xsdt = table(&buf, u64_at(r, 24), b"XSDT");
        let rsdt = table(&buf, u64::from(u32_at(r, 16)), b"RSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!(rsdt.len(), 36 + 8);
        for i in 0..2 {
            assert_eq!(u64_at(xsdt, 36 + 8 * i), u64::from(u32_at(rsdt, 36 + 4 * i)));
        }
        table(&buf, u64_at(xsdt, 36), b"FACP");
        table(&buf, u64_at(xsdt, 44), b"APIC");
        // No HPET anywhere.
        assert!(!buf[..l.len].windows(4).any(|w| w == b"HPET"));
    }

    #[test]
    fn fadt_describes_the_pm_block_reset_and_dsdt() {
        let (buf, _) = build(&config());
        let xsdt = table(&buf, u64_at(&buf, 24), b"XSDT");
        let f = table(&buf, u64_at(xsdt, 36), b"FACP");
        assert_eq!(f.len(), 276, "ACPI 6.x FADT");
        assert_eq!(u16_at(f, 46), 9, "SCI_INT");
        assert_eq!(u32_at(f, 48), 0, "SMI_CMD: always in ACPI mode");
        assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(f, 76), 0x608, "PM_TMR_BLK");
        assert_eq!((f[88], f[89], f[91]), (4, 2, 4), "block lengths");
        assert_eq!(f[108], 0x32, "century");
        assert_eq!(u16_at(f, 109), 2, "IAPC_BOOT_ARCH: 8042");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(flags & (1 << 8), 0, "24-bit timer");
        assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
        // RESET_REG: system I/O, 8 bits, 0xcf9; RESET_VALUE 6.
        assert_eq!(f[116], 1);
        assert_eq!(f[117], 8);
        assert_eq!(u64_at(f, 120), 0xcf9);
        assert_eq!(f[128], 6);
        // X_PM_TMR_BLK: system I/O 32 bits at 0x608.
        assert_eq!((f[208], f[209]), (1, 32));
        assert_eq!(u64_at(f, 212), 0x608);
        let facs_addr = u64::from(u32_at(f, 36));
        assert_eq!(facs_addr % 64, 0);
        let fo = (facs_addr - BASE) as usize;
        assert_eq!(&buf[fo..fo + 4], b"FACS");
        let dsdt = u64::from(u32_at(f, 40));
        assert_eq!(u64_at(f, 140), dsdt, "X_DSDT equals DSDT");
        table(&buf, dsdt, b"DSDT");
        let mut cfg = config();
        cfg.pm_timer_32bit = true;
        cfg.i8042 = false;
        let (buf, _) = build(&cfg);
        let xsdt = table(&buf, u64_at(&buf, 24), b"XSDT");
        let f = table(&buf, u64_at(xsdt, 36), b"FACP");
        assert_ne!(u32_at(f, 112) & (1 << 8), 0, "TMR_VAL_EXT");
        assert_eq!(u16_at(f, 109), 0);
    }

    #[test]
    fn dsdt_has_s5_with_the_power_off_slp_typ() {
        let (buf, _) = build(&config());
        let xsdt = table(&buf, u64_at(&buf, 24), b"XSDT");
        let f = table(&buf, u64_at(xsdt, 36), b"FACP");
        let d = table(&buf, u64::from(u32_at(f, 40)), b"DSDT");
        // NameOp "_S5_" PackageOp PkgLength NumElements=4 then four ZeroOps (SLP_TYP_S5 = 0).
        let pos = d.windows(5).position(|w| w == b"\x08_S5_").unwrap();
        assert_eq!(&d[pos + 5..pos + 11], &[0x12, 0x06, 0x04, 0x00, 0x00, 0x00]);
        assert_eq!(d[pos + 11], 0x00);
        assert_eq!(SLP_TYP_S5, 0);
        // Two PNP0501 devices (EISA ID 0x0105d041 little-endian: 41 d0 05 01).
        let n = d.windows(4).filter(|w| *w == [0x41, 0xd0, 0x05, 0x01]).count();
        assert_eq!(n, 2);
        assert!(d.windows(4).any(|w| w == b"COM2"));
        // Without serial ports: just \_S5.
        let mut cfg = config();
        cfg.serial_ports.clear();
        let (buf, _) = build(&cfg);
        let xsdt = table(&buf, u64_at(&buf, 24), b"XSDT");
        let f = table(&buf, u64_at(xsdt, 36), b"FACP");
        let d = table(&buf, u64::from(u32_at(f, 40)), b"DSDT");
        assert_eq!(d.len(), 36 + 12);
    }

    #[test]
    fn madt_lists_cpus_ioapic_and_overrides() {
        let (buf, _) = build(&config());
        let xsdt = table(&buf, u64_at(&buf, 24), b"XSDT");
        let m = table(&buf, u64_at(xsdt, 44), b"APIC");
        assert_eq!(u32_at(m, 36), 0xfee0_0000);
        assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");
        let mut entries = Vec::new();
        let mut o = 44;
        while o < m.len() {
            let (t, l) = (m[o], m[o + 1] as usize);
            assert!(l >= 2 && o + l <= m.len(), "entry length");
            entries.push((t, m[o..o + l].to_vec()));
            o += l;
        }
        assert_eq!(o, m.len());
        let lapics: Vec<_> = entries.iter().filter(|e| e.0 == 0).collect();
        assert_eq!(lapics.len(), 2);
        assert_eq!((lapics[1].1[2], lapics[1].1[3], lapics[1].1[4]), (1, 1, 1));
        let io: Vec<_> = entries.iter().filter(|e| e.0 == 1).collect();
        assert_eq!(io.len(), 1);
        assert_eq!(io[0].1[2], 2, "IOAPIC id");
        assert_eq!(u32_at(&io[0].1, 4), 0xfec0_0000);
        assert_eq!(u32_at(&io[0].1, 8), 0, "GSI base");
        let isos: Vec<_> = entries.iter().filter(|e| e.0 == 2).map(|e| &e.1).collect();
        assert_eq!(isos.len(), 2);
        assert_eq!((isos[0][3], u32_at(isos[0], 4), u16_at(isos[0], 8)), (0, 2, 0));
        assert_eq!((isos[1][3], u32_at(isos[1], 4), u16_at(isos[1], 8)), (9, 9, 0x0d));
        assert!(entries.iter().any(|e| e.0 == 4 && e.1[5] == 1), "LINT1 NMI");
    }

    #[test]
    fn hpet_table_only_when_asked() {
        let mut cfg = config();
        cfg.hpet = true;
        let (buf, _) = build(&cfg);
        let xsdt = table(&buf, u64_at(&buf, 24), b"XSDT");
        let rsdt = table(&buf, u64::from(u32_at(&buf, 16)), b"RSDT");
        assert_eq!(xsdt.len(), 36 + 24);
        assert_eq!(rsdt.len(), 36 + 12);
        let h = table(&buf, u64_at(xsdt, 52), b"HPET");
        assert_eq!(u32_at(rsdt, 44), u64_at(xsdt, 52) as u32);
        assert_eq!(h.len(), 56);
        assert_eq!(u32_at(h, 36), 0x8086_a201, "event timer block id");
        assert_eq!(h[40], 0, "system memory");
        assert_eq!(u64_at(h, 44), 0xfed0_0000);
        assert_eq!(u16_at(h, 53), 128);
    }

    #[test]
    fn bad_placements_are_errors() {
        let cfg = config();
        let mut small = vec![0u8; 64];
        assert!(matches!(write_tables(&cfg, &mut small, BASE), Err(PlatformError::AcpiBufferTooSmall { .. })));
        let mut buf = vec![0u8; 0x2000];
        assert!(write_tables(&cfg, &mut buf, BASE + 4).is_err());
        assert!(write_tables(&cfg, &mut buf, 0xffff_ff00).is_err());
        let mut none = cfg.clone();
        none.cpus = 0;
        assert!(write_tables(&none, &mut buf, BASE).is_err());
        let mut many = cfg.clone();
        many.serial_ports = vec![(0x3f8, 4); 5];
        assert!(write_tables(&many, &mut buf, BASE).is_err());
    }
}

/// Cross-check with an independent parser: ACPICA's disassembler (`iasl`, Debian package
/// acpica-tools). Ignored by default because it needs the tool: `cargo test -p
/// tessera-platform -- --ignored iasl`.
#[cfg(test)]
mod iasl {
    use super::*;
    use std::process::Command;

    #[test]
    #[ignore = "needs iasl (acpica-tools)"]
    fn iasl_disassembles_every_table() {
        let cfg = AcpiConfig {
            cpus: 1,
            ioapic_id: 1,
            pm_timer_32bit: false,
            i8042: true,
            hpet: true,
            serial_ports: vec![(0x3f8, 4)],
        };
        let mut buf = vec![0u8; 0x2000];
        let base = 0xe0000u64;
        let pci = PciRootWindow { mmio_start: 0xc000_0000, mmio_end: 0xfec0_0000 };
        write_tables_with_pci(&cfg, Some(&pci), &mut buf, base).unwrap();
        let dir = std::env::temp_dir().join(format!("tessera-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let at = |addr: u64| &buf[(addr - base) as usize..];
        let xsdt_addr = u64::from_le_bytes(buf[24..32].try_into().unwrap());
        let xsdt = at(xsdt_addr);
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let hpet_addr = u64::from_le_bytes(xsdt[52..60].try_into().unwrap());
        let fadt = at(fadt_addr);
        let dsdt_addr = u64::from(u32::from_le_bytes(fadt[40..44].try_into().unwrap()));
        let mut outputs = String::new();
        for (name, addr) in [("facp", fadt_addr), ("apic", madt_addr), ("dsdt", dsdt_addr), ("hpet", hpet_addr)] {
            let t = at(addr);
            let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            let path = dir.join(format!("{name}.dat"));
            std::fs::write(&path, &t[..len]).unwrap();
            let out = Command::new("iasl").arg("-d").arg(&path).output().expect("iasl runs");
            let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{name}: {text}");
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            assert!(!dsl.contains("**** Unknown"), "{name}:\n{dsl}");
            outputs += &dsl;
        }
        if std::env::var_os("TESSERA_KEEP_ACPI").is_none() {
            std::fs::remove_dir_all(&dir).ok();
        }
        for want in [
            "Name (_S5, Package (0x04)",
            "EisaId (\"PNP0501\")",
            "Interrupt Source Override",
            "PM Timer Block Address : 00000608",
            "Reset Register",
            "Hardware Block ID : 8086A201",
        ] {
            assert!(outputs.contains(want), "missing {want:?} in\n{outputs}");
        }
    }
}
