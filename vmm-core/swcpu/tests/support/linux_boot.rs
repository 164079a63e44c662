//! Loader shared by the `linux-boot` example and the ignored `linux_boot` test: boots Debian's Linux 6.1 on
//! the software CPU as far as it gets, collecting the serial console.
//!
//! With `SWCPU_PVH=1` the kernel is entered instead at its PVH entry (ELF note XEN_ELFNOTE_PHYS32_ENTRY) in
//! 32-bit protected mode with paging off and EBX = `hvm_start_info` (arch/x86/platform/pvh/head.S).
//!
//! (`examples/make-busybox-initrd.sh` builds a busybox initramfs whose /init prints through /dev/kmsg.)
//!
//! Like Tessera's core loader will: decompress the bzImage payload on the host (`xz -dc`), load the ELF
//! vmlinux segments at their physical addresses, build a zero page (setup header copied from the bzImage,
//! e820, command line), and enter the ELF entry in 64-bit mode with identity-mapped page tables and
//! RSI = zero page (Documentation/x86/boot.rst "64-bit Boot Protocol"). Port 0x3f8 writes go to stdout,
//! LSR (0x3fd) reads 0x60; everything else reads as all ones. No interrupt controller or timer yet.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use tessera_swcpu::{GuestRam, SoftVcpu, Stats};
use tessera_vcpu::{DescriptorTable, IoHandler, Regs, Segment, SpecialRegs, Vcpu, VcpuExit};

const RAM_SIZE: usize = 512 << 20;
const ZERO_PAGE: u64 = 0x7000;
const CMDLINE: u64 = 0x20000;
const GDT: u64 = 0x500;
const PML4: u64 = 0x9000;

#[derive(Default)]
struct Serial {
    echo: bool,
    reset: std::sync::atomic::AtomicBool,
    all: Mutex<Vec<u8>>,
    line: Mutex<Vec<u8>>,
    last: Mutex<String>,
}

impl IoHandler for Serial {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(if port == 0x3fd { 0x60 } else { 0xff });
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        // Keyboard-controller reset (0xfe to port 0x64) and the 0xcf9 reset register end the run.
        if (port == 0x64 && data[0] == 0xfe) || (port == 0xcf9 && data[0] & 4 != 0) {
            eprintln!("[linux-boot] guest requested reset through port {port:#x}");
            self.reset.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if port == 0x3f8 {
            if self.echo {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&data[..1]);
                let _ = out.flush();
            }
            self.all.lock().unwrap().push(data[0]);
            let mut l = self.line.lock().unwrap();
            if data[0] == b'\n' {
                let s = String::from_utf8_lossy(&l).trim_end().to_string();
                if !s.is_empty() {
                    *self.last.lock().unwrap() = s;
                }
                l.clear();
            } else {
                l.push(data[0]);
            }
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        log::debug!("MMIO read {addr:#x} size {}", data.len());
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        log::debug!("MMIO write {addr:#x} {data:02x?}");
    }
}

/// The PVH entry point from the ELF notes (Xen note type 18, XEN_ELFNOTE_PHYS32_ENTRY).
fn pvh_entry(elf: &[u8]) -> Option<u64> {
    let phoff = u64_at(elf, 0x20) as usize;
    let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]) as usize;
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
    for k in 0..phnum {
        let ph = elf.get(phoff + k * phentsize..)?;
        if u32_at(ph, 0) != 4 {
            continue;
        }
        let (off, size) = (u64_at(ph, 8) as usize, u64_at(ph, 32) as usize);
        let notes = elf.get(off..off + size)?;
        let mut p = 0;
        while p + 12 <= notes.len() {
            let (namesz, descsz, ty) = (u32_at(notes, p) as usize, u32_at(notes, p + 4) as usize, u32_at(notes, p + 8));
            let name = notes.get(p + 12..p + 12 + namesz)?;
            let desc_at = p + 12 + namesz.div_ceil(4) * 4;
            if name.starts_with(b"Xen") && ty == 18 {
                let d = notes.get(desc_at..desc_at + descsz)?;
                return Some(if descsz >= 8 { u64_at(d, 0) } else { u32_at(d, 0) as u64 });
            }
            p = desc_at + descsz.div_ceil(4) * 4;
        }
    }
    None
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// What to boot and how long to try.
pub struct BootConfig {
    pub image: String,
    pub seconds: f64,
    pub cmdline: String,
    pub initrd: Option<Vec<u8>>,
    /// Enter at the PVH entry (32-bit, paging off) instead of the 64-bit entry.
    pub pvh: bool,
    /// Copy serial output to stdout as it arrives.
    pub echo: bool,
    /// Stop as soon as the serial output contains this.
    pub stop_on: Option<String>,
}

/// How the boot ended.
pub struct BootReport {
    pub exit: VcpuExit,
    pub serial: String,
    pub last_line: String,
    pub stats: Stats,
    pub seconds: f64,
    /// Registers and control registers at the end, for diagnosis.
    pub state: String,
}

pub fn boot(cfg: &BootConfig) -> Result<BootReport, Box<dyn std::error::Error>> {
    let (image, seconds, cmdline, initrd) = (&cfg.image, cfg.seconds, &cfg.cmdline, &cfg.initrd);
    let bz = std::fs::read(image).map_err(|e| format!("{image}: {e}"))?;
    if bz.len() < 0x1000 || &bz[0x202..0x206] != b"HdrS" {
        return Err(format!("{image}: not a bzImage (no HdrS magic)").into());
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let payload_off = (setup_sects + 1) * 512 + u32_at(&bz, 0x248) as usize;
    let payload_len = u32_at(&bz, 0x24c) as usize;
    let payload = bz.get(payload_off..payload_off + payload_len).ok_or("payload outside the file")?;
    let t0 = Instant::now();
    let mut xz =
        Command::new("xz").args(["-dc", "--single-stream"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut stdin = xz.stdin.take().ok_or("xz stdin")?;
    let data = payload.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = xz.wait_with_output()?;
    let _ = feeder.join();
    let elf = out.stdout;
    eprintln!("[linux-boot] decompressed {} -> {} bytes in {:?}", payload_len, elf.len(), t0.elapsed());
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("payload is not an ELF vmlinux".into());
    }

    // SAFETY: anonymous private mapping of RAM_SIZE bytes, owned by main for the whole run.
    let ram_ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ram_ptr == libc::MAP_FAILED {
        return Err("mmap of guest RAM failed".into());
    }
    let ram_ptr = ram_ptr as *mut u8;
    // SAFETY: the mapping lives until the process exits, past the CPU.
    let ram = unsafe { GuestRam::new(&[(0, ram_ptr, RAM_SIZE)]) }?;
    let w = |gpa: u64, b: &[u8]| {
        assert!(ram.write(gpa, b), "write outside RAM at {gpa:#x}");
    };

    // ELF program headers: load PT_LOAD segments at p_paddr.
    let entry = u64_at(&elf, 0x18);
    let phoff = u64_at(&elf, 0x20) as usize;
    let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]) as usize;
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
    for k in 0..phnum {
        let ph = &elf[phoff + k * phentsize..];
        if u32_at(ph, 0) != 1 {
            continue;
        }
        let (off, paddr, filesz, memsz) =
            (u64_at(ph, 8) as usize, u64_at(ph, 24), u64_at(ph, 32) as usize, u64_at(ph, 40) as usize);
        w(paddr, &elf[off..off + filesz]);
        w(paddr + filesz as u64, &vec![0u8; memsz - filesz]);
        eprintln!("[linux-boot] PT_LOAD paddr {paddr:#x} filesz {filesz:#x} memsz {memsz:#x}");
    }
    let entry_phys = entry & 0x7fff_ffff;
    eprintln!("[linux-boot] ELF entry {entry:#x} (physical {entry_phys:#x})");

    // Zero page: setup header from the bzImage, loader type, command line, e820.
    let mut zp = vec![0u8; 4096];
    let hdr_end = 0x202 + bz[0x201] as usize;
    zp[0x1f1..hdr_end].copy_from_slice(&bz[0x1f1..hdr_end]);
    zp[0x210] = 0xff;
    zp[0x211] |= 1; // LOADED_HIGH
    zp[0x228..0x22c].copy_from_slice(&(CMDLINE as u32).to_le_bytes());
    let e820: [(u64, u64, u32); 2] = [(0, 0x9fc00, 1), (0x10_0000, RAM_SIZE as u64 - 0x10_0000, 1)];
    for (k, (a, l, t)) in e820.iter().enumerate() {
        let o = 0x2d0 + k * 20;
        zp[o..o + 8].copy_from_slice(&a.to_le_bytes());
        zp[o + 8..o + 16].copy_from_slice(&l.to_le_bytes());
        zp[o + 16..o + 20].copy_from_slice(&t.to_le_bytes());
    }
    zp[0x1e8] = e820.len() as u8;
    if let Some(rd) = &initrd {
        // Top of RAM below 256 MiB, page aligned, clear of the kernel's init_size window.
        let at = (0x1000_0000 - rd.len() as u64) & !0xfff;
        w(at, rd);
        zp[0x218..0x21c].copy_from_slice(&(at as u32).to_le_bytes());
        zp[0x21c..0x220].copy_from_slice(&(rd.len() as u32).to_le_bytes());
        eprintln!("[linux-boot] initrd {} bytes at {at:#x}", rd.len());
    }
    w(ZERO_PAGE, &zp);
    let mut cl = cmdline.as_bytes().to_vec();
    cl.push(0);
    w(CMDLINE, &cl);

    // GDT (null, 0x08 unused, 0x10 code, 0x18 data) and identity page tables for the first 4 GiB.
    w(GDT + 0x10, &0x00af_9b00_0000_ffffu64.to_le_bytes());
    w(GDT + 0x18, &0x00cf_9300_0000_ffffu64.to_le_bytes());
    w(PML4, &((PML4 + 0x1000) | 3).to_le_bytes());
    for g in 0..4u64 {
        w(PML4 + 0x1000 + g * 8, &((PML4 + 0x2000 + g * 0x1000) | 3).to_le_bytes());
        for e in 0..512u64 {
            w(PML4 + 0x2000 + g * 0x1000 + e * 8, &((g << 30) | (e << 21) | 0x83).to_le_bytes());
        }
    }

    let mut cpu = SoftVcpu::new(ram.clone());
    if cfg.pvh {
        let pvh = pvh_entry(&elf).ok_or("no XEN_ELFNOTE_PHYS32_ENTRY note in the vmlinux")?;
        // hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h), version 1 with a memory map.
        const START_INFO: u64 = 0x6000;
        const MEMMAP: u64 = 0x6100;
        const MODLIST: u64 = 0x6200;
        let mut si = vec![0u8; 56];
        si[0..4].copy_from_slice(&0x336e_c578u32.to_le_bytes());
        si[4..8].copy_from_slice(&1u32.to_le_bytes());
        si[24..32].copy_from_slice(&CMDLINE.to_le_bytes());
        si[40..48].copy_from_slice(&MEMMAP.to_le_bytes());
        si[48..52].copy_from_slice(&(e820.len() as u32).to_le_bytes());
        if zp[0x218..0x21c] != [0; 4] {
            si[12..16].copy_from_slice(&1u32.to_le_bytes());
            si[16..24].copy_from_slice(&MODLIST.to_le_bytes());
            let mut m = [0u8; 32];
            m[0..4].copy_from_slice(&zp[0x218..0x21c]);
            m[8..12].copy_from_slice(&zp[0x21c..0x220]);
            w(MODLIST, &m);
        }
        w(START_INFO, &si);
        for (k, (a, l, t)) in e820.iter().enumerate() {
            let mut e = [0u8; 24];
            e[0..8].copy_from_slice(&a.to_le_bytes());
            e[8..16].copy_from_slice(&l.to_le_bytes());
            e[16..20].copy_from_slice(&t.to_le_bytes());
            w(MEMMAP + k as u64 * 24, &e);
        }
        let code32 = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: true,
            s: true,
            l: false,
            g: true,
            avl: false,
            unusable: false,
        };
        let data32 = Segment { selector: 0x18, type_: 3, ..code32 };
        cpu.set_sregs(&SpecialRegs {
            cs: code32,
            ds: data32,
            es: data32,
            fs: data32,
            gs: data32,
            ss: data32,
            tr: Segment { base: 0, limit: 0x67, selector: 0, type_: 0xb, present: true, ..Default::default() },
            ldt: Segment { unusable: true, ..Default::default() },
            gdt: DescriptorTable { base: GDT, limit: 0x1f },
            idt: DescriptorTable { base: 0, limit: 0 },
            cr0: 0x11,
            efer: 0,
            apic_base: 0xfee0_0900,
            ..Default::default()
        })?;
        cpu.set_regs(&Regs { rip: pvh, rbx: START_INFO, rflags: 2, ..Default::default() })?;
        eprintln!("[linux-boot] PVH entry {pvh:#x}, start_info at {START_INFO:#x}");
    } else {
        let code = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        let data = Segment { selector: 0x18, type_: 3, db: true, l: false, ..code };
        cpu.set_sregs(&SpecialRegs {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: Segment { base: 0, limit: 0x67, selector: 0, type_: 0xb, present: true, ..Default::default() },
            ldt: Segment { unusable: true, ..Default::default() },
            gdt: DescriptorTable { base: GDT, limit: 0x1f },
            idt: DescriptorTable { base: 0, limit: 0 },
            cr0: 0x8000_0011,
            cr2: 0,
            cr3: PML4,
            cr4: 0x20,
            cr8: 0,
            efer: 0x500,
            apic_base: 0xfee0_0900,
        })?;
        cpu.set_regs(&Regs {
            rip: entry_phys,
            rsi: ZERO_PAGE,
            rsp: 0x8ff0,
            rbp: 0x8ff0,
            rflags: 2,
            ..Default::default()
        })?;
    }

    let serial = Serial { echo: cfg.echo, ..Default::default() };
    let start = Instant::now();
    let slice = 50_000_000u64;
    let exit = loop {
        cpu.set_instruction_budget(Some(slice));
        let exit = cpu.run(&serial)?;
        let el = start.elapsed().as_secs_f64();
        if exit != VcpuExit::Interrupted {
            break exit;
        }
        if serial.reset.load(std::sync::atomic::Ordering::SeqCst) {
            break VcpuExit::Reset;
        }
        if el > seconds {
            break VcpuExit::Interrupted;
        }
        if let Some(stop) = &cfg.stop_on {
            if String::from_utf8_lossy(&serial.all.lock().unwrap()).contains(stop.as_str()) {
                break VcpuExit::Interrupted;
            }
        }
    };
    let el = start.elapsed().as_secs_f64();
    let s = cpu.sregs()?;
    let state = format!(
        "{:?}\nCR0={:#x} CR2={:#x} CR3={:#x} CR4={:#x} EFER={:#x} CS={:#x}",
        cpu.regs()?,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.cs.selector
    );
    let stats = cpu.stats();
    drop(cpu);
    drop(ram);
    // SAFETY: the CPU and every GuestRam clone over this mapping are gone; nothing refers to it any more.
    unsafe { libc::munmap(ram_ptr as *mut libc::c_void, RAM_SIZE) };
    let last_line = serial.last.lock().unwrap().clone();
    let serial_text = String::from_utf8_lossy(&serial.all.lock().unwrap()).into_owned();
    Ok(BootReport { exit, serial: serial_text, last_line, stats, seconds: el, state })
}
