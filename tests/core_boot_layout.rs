//! What the bzImage loaders put in guest memory, checked against Debian's kernel image: the zero page (setup
//! header copied from the image, loader type, sentinel, command line, initrd, e820), the protected-mode kernel
//! at 1 MiB, the identity page tables and the 64-bit entry state; and for the software CPU's path the vmlinux
//! unpacked on the host, compared with what `xz -dc` makes of the same payload. Booting Linux itself is not
//! possible here (KVM emulates at ~2 MIPS on this host), so the loader is tested by content.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use tessera_core::boot::{self, BootSource, LinuxEntry, CMDLINE_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};
use tessera_core::memory::GuestRam;
use tessera_core::Error;
use vm_memory::{Bytes, GuestAddress};

/// The installed Debian kernel (`linux-image-amd64`; the newest `/boot/vmlinuz-*`).
static KERNEL_PATH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    tessera_tests::linux_guest::kernel()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/boot/vmlinuz-(none installed)".into())
});
const CMDLINE: &str = "console=ttyS0 nokaslr panic=-1";

fn kernel_bytes() -> Option<Vec<u8>> {
    match std::fs::read(KERNEL_PATH.as_str()) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("SKIPPED: {} cannot be read ({e}); install linux-image-amd64", KERNEL_PATH.as_str());
            None
        }
    }
}

fn temp_file(name: &str, contents: &[u8], len: Option<u64>) -> (std::path::PathBuf, File) {
    let p = std::env::temp_dir().join(format!("tessera-layout-{}-{name}", std::process::id()));
    std::fs::write(&p, contents).unwrap();
    if let Some(len) = len {
        File::options().write(true).open(&p).unwrap().set_len(len).unwrap();
    }
    let f = File::open(&p).unwrap();
    (p, f)
}

fn source(initrd: Option<(File, String)>) -> BootSource {
    BootSource {
        kernel: File::open(KERNEL_PATH.as_str()).unwrap(),
        kernel_path: KERNEL_PATH.as_str().into(),
        initrd,
        cmdline: CMDLINE.into(),
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn read(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ram.memory().read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// Walk the 4-level page tables at CR3 for a 2 MiB-page mapping of `va`.
fn translate(ram: &GuestRam, cr3: u64, va: u64) -> Option<u64> {
    let entry = |table: u64, index: u64| u64_at(&read(ram, table + index * 8, 8), 0);
    let pml4e = entry(cr3, (va >> 39) & 511);
    if pml4e & 1 == 0 {
        return None;
    }
    let pdpte = entry(pml4e & !0xfff, (va >> 30) & 511);
    if pdpte & 1 == 0 {
        return None;
    }
    let pde = entry(pdpte & !0xfff, (va >> 21) & 511);
    if pde & 1 == 0 || pde & 0x80 == 0 {
        return None;
    }
    Some((pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (va & 0x1f_ffff))
}

/// Checks common to both Linux entry paths: the zero page, command line, initrd and e820.
fn check_zero_page(ram: &GuestRam, image: &[u8], initrd: &[u8], ram_size: u64) {
    let zp = read(ram, ZERO_PAGE_ADDR, 4096);
    // The setup header is the image's, byte for byte, except what the loader fills in (boot.rst, "Details of
    // header fields": type_of_loader 0x210, code32_start 0x214, ramdisk 0x218/0x21c, cmd_line_ptr 0x228).
    let hdr_end = 0x1f1 + 0x7b;
    for off in 0x1f1..hdr_end {
        let loader_field =
            (0x210..0x211).contains(&off) || (0x214..0x220).contains(&off) || (0x228..0x22c).contains(&off);
        if !loader_field {
            assert_eq!(zp[off], image[off], "zero page byte {off:#x} differs from the image's setup header");
        }
    }
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(zp[0x210], 0xff, "type_of_loader");
    assert_eq!(zp[0x1ef], 0, "sentinel");
    assert_eq!(u32_at(&zp, 0x214), 0x10_0000, "code32_start");

    let cmd_ptr = u32_at(&zp, 0x228) as u64;
    assert_eq!(cmd_ptr, CMDLINE_ADDR);
    let cmd = read(ram, cmd_ptr, CMDLINE.len() + 1);
    assert_eq!(&cmd[..CMDLINE.len()], CMDLINE.as_bytes());
    assert_eq!(cmd[CMDLINE.len()], 0);

    let rd_addr = u64::from(u32_at(&zp, 0x218));
    let rd_size = u64::from(u32_at(&zp, 0x21c));
    assert_eq!(rd_size, initrd.len() as u64);
    assert_eq!(rd_addr % 4096, 0, "initrd page-aligned");
    let initrd_addr_max = u64::from(u32_at(image, 0x22c));
    let pref = u64_at(image, 0x258);
    let init_size = u64::from(u32_at(image, 0x260));
    assert!(rd_addr + rd_size <= ram_size.min(initrd_addr_max + 1), "initrd below the top of RAM and initrd_addr_max");
    assert!(
        rd_addr >= pref + init_size,
        "initrd {rd_addr:#x} clear of the kernel's init_size area ending {:#x}",
        pref + init_size
    );
    assert!(rd_addr + rd_size > ram_size - 2 * 4096, "initrd at the top of RAM ({rd_addr:#x})");
    assert_eq!(read(ram, rd_addr, initrd.len()), initrd, "initrd contents");

    let n = zp[0x1e8] as usize;
    let e820: Vec<(u64, u64, u32)> = (0..n)
        .map(|i| {
            let off = 0x2d0 + 20 * i;
            (u64_at(&zp, off), u64_at(&zp, off + 8), u32_at(&zp, off + 16))
        })
        .collect();
    let usable: Vec<(u64, u64)> = e820.iter().filter(|e| e.2 == 1).map(|e| (e.0, e.1)).collect();
    assert_eq!(usable, vec![(0, 0x9fc00), (0x10_0000, ram_size - 0x10_0000)], "e820 {e820:x?}");
    assert!(e820.iter().any(|e| e.2 == 2 && e.0 == 0x9fc00), "EBDA reserved: {e820:x?}");
}

#[test]
fn bzimage_64bit_boot_protocol_layout() {
    let Some(image) = kernel_bytes() else { return };
    let ram_size = 512u64 << 20;
    let ram = GuestRam::new(ram_size).unwrap();
    let initrd: Vec<u8> = (0..3 * 1024 * 1024 + 123).map(|i: u32| (i * 7 + 3) as u8).collect();
    let (ipath, ifile) = temp_file("initrd", &initrd, None);
    let mut src = source(Some((ifile, ipath.display().to_string())));
    let entry = boot::load(&ram, &mut src, LinuxEntry::BootProtocol64).unwrap();
    std::fs::remove_file(&ipath).ok();

    check_zero_page(&ram, &image, &initrd, ram_size);

    // The protected-mode kernel (everything after the setup sectors) is at 1 MiB.
    let setup = (usize::from(image[0x1f1]).max(4) + 1) * 512;
    let pm = &image[setup..];
    assert_eq!(read(&ram, 0x10_0000, 4096), &pm[..4096]);
    assert_eq!(read(&ram, 0x10_0000 + (pm.len() - 4096) as u64, 4096), &pm[pm.len() - 4096..]);

    // 64-bit entry: load address + 0x200, RSI = zero page, long mode with paging.
    assert_eq!(entry.regs.rip, 0x10_0200);
    assert_eq!(entry.regs.rsi, ZERO_PAGE_ADDR);
    assert_eq!(entry.regs.rflags & 0x200, 0, "interrupts off");
    assert!(entry.sregs.cs.l && !entry.sregs.cs.db, "64-bit code segment");
    assert_eq!(entry.sregs.cs.selector, 0x10, "__BOOT_CS");
    assert_eq!(entry.sregs.ds.selector, 0x18, "__BOOT_DS");
    assert_eq!(entry.sregs.efer & 0x500, 0x500, "EFER.LME|LMA");
    assert_eq!(entry.sregs.cr0 & 0x8000_0001, 0x8000_0001, "CR0.PG|PE");
    assert_ne!(entry.sregs.cr4 & 0x20, 0, "CR4.PAE");
    assert_eq!(entry.sregs.cr3, PML4_ADDR);
    // Identity mapping of everything the kernel touches first: itself, the zero page, the cmdline, the initrd.
    for va in [0x10_0200u64, ZERO_PAGE_ADDR, CMDLINE_ADDR, 0x100_0000, ram_size - 1, 0xffff_ffff] {
        assert_eq!(translate(&ram, entry.sregs.cr3, va), Some(va), "identity map of {va:#x}");
    }
    // The GDT the selectors point to is in guest memory: descriptor 0x10 is a present 64-bit code segment.
    let gdt = read(&ram, entry.sregs.gdt.base, usize::from(entry.sregs.gdt.limit) + 1);
    let cs_desc = u64_at(&gdt, 0x10);
    assert_eq!((cs_desc >> 40) & 0xff, 0x9b, "present code, execute/read");
    assert_ne!(cs_desc & (1 << 53), 0, "L bit");
}

/// The payload decompressed by the xz tool, as an independent reference.
fn vmlinux_by_xz_tool(image: &[u8]) -> Option<Vec<u8>> {
    let setup = (usize::from(image[0x1f1]).max(4) + 1) * 512;
    let off = setup + u32_at(image, 0x248) as usize;
    let len = u32_at(image, 0x24c) as usize;
    let mut child = match Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED: cannot run xz ({e}); install xz-utils");
            return None;
        }
    };
    let mut stdin = child.stdin.take().unwrap();
    let payload = image[off..off + len].to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&payload);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "xz -dc failed on the payload");
    Some(out.stdout)
}

#[test]
fn decompressed_vmlinux_for_the_software_cpu() {
    let Some(image) = kernel_bytes() else { return };
    let Some(vmlinux) = vmlinux_by_xz_tool(&image) else { return };
    let ram_size = 256u64 << 20;
    let ram = GuestRam::new(ram_size).unwrap();
    let initrd = vec![0x5au8; 100_000];
    let (ipath, ifile) = temp_file("initrd2", &initrd, None);
    let mut src = source(Some((ifile, ipath.display().to_string())));
    let entry = boot::load(&ram, &mut src, LinuxEntry::Decompressed).unwrap();
    std::fs::remove_file(&ipath).ok();

    check_zero_page(&ram, &image, &initrd, ram_size);

    // Every PT_LOAD segment of the reference vmlinux is in guest memory at its physical address.
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    let e_entry = u64_at(&vmlinux, 0x18);
    let phoff = u64_at(&vmlinux, 0x20) as usize;
    let phnum = usize::from(u16_at(&vmlinux, 0x38));
    let mut loads = 0;
    for i in 0..phnum {
        let ph = &vmlinux[phoff + 56 * i..phoff + 56 * (i + 1)];
        if u32_at(ph, 0) != 1 {
            continue;
        }
        loads += 1;
        let (offset, paddr, filesz) = (u64_at(ph, 8) as usize, u64_at(ph, 24), u64_at(ph, 32) as usize);
        let want = &vmlinux[offset..offset + filesz];
        assert!(read(&ram, paddr, filesz) == want, "segment {i} at {paddr:#x} ({filesz} bytes) differs");
    }
    assert!(loads >= 3, "vmlinux has its text, data and per-CPU segments");

    // Entered at the vmlinux's own startup_64, in long mode, with the zero page in RSI.
    assert_eq!(entry.regs.rip, e_entry);
    assert_eq!(e_entry, 0x100_0000, "this kernel's startup_64 is at 16 MiB (shared notes §0)");
    assert_eq!(entry.regs.rsi, ZERO_PAGE_ADDR);
    assert!(entry.sregs.cs.l);
    assert_eq!(translate(&ram, entry.sregs.cr3, e_entry), Some(e_entry));
}

#[test]
fn too_little_ram_for_the_kernel_is_refused() {
    if kernel_bytes().is_none() {
        return;
    }
    // init_size of this kernel is ~64 MiB from 16 MiB: 64 MiB of RAM is not enough.
    let ram = GuestRam::new(64 << 20).unwrap();
    let err = boot::load(&ram, &mut source(None), LinuxEntry::BootProtocol64).unwrap_err();
    assert!(matches!(err, Error::KernelNeedsRam { .. }), "{err}");
    assert!(err.to_string().contains("-m"), "{err}");
}

#[test]
fn an_initrd_that_does_not_fit_above_the_kernel_is_refused() {
    if kernel_bytes().is_none() {
        return;
    }
    let ram = GuestRam::new(128 << 20).unwrap();
    let (ipath, ifile) = temp_file("bigrd", b"", Some(60 << 20));
    let err = boot::load(&ram, &mut source(Some((ifile, ipath.display().to_string()))), LinuxEntry::BootProtocol64)
        .unwrap_err();
    std::fs::remove_file(&ipath).ok();
    assert!(err.to_string().starts_with("initrd is too large, cannot support"), "{err}");
}

#[test]
fn a_command_line_longer_than_the_kernel_accepts_is_refused() {
    if kernel_bytes().is_none() {
        return;
    }
    let ram = GuestRam::new(256 << 20).unwrap();
    let mut src = source(None);
    src.cmdline = "x".repeat(4000);
    let err = boot::load(&ram, &mut src, LinuxEntry::BootProtocol64).unwrap_err();
    assert!(err.to_string().starts_with("-append:"), "{err}");
    let _ = Path::new(KERNEL_PATH.as_str());
}

// ---------------------------------------------------------------------------------------------------------------
// PVH

fn pvh_kernel(dir: &Path, name: &str, load_addr: u64, note: bool) -> std::path::PathBuf {
    let code = tessera_tests::tiny_guest::asm::debug_exit(0x501, 1);
    tessera_tests::tiny_guest::guest_elf(dir, name, &code, "", load_addr, note).unwrap()
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("tessera-layout-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn pvh_start_info_memmap_modules_and_entry_state() {
    let dir = scratch("pvh");
    let kernel = pvh_kernel(&dir, "pvh", 0x10_0000, true);
    let ram_size = 64u64 << 20;
    let ram = GuestRam::new(ram_size).unwrap();
    let initrd: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let (ipath, ifile) = temp_file("pvh-initrd", &initrd, None);
    let mut src = BootSource {
        kernel: File::open(&kernel).unwrap(),
        kernel_path: kernel.display().to_string(),
        initrd: Some((ifile, ipath.display().to_string())),
        cmdline: "console=ttyS0 root=/dev/ram0".into(),
    };
    let entry = boot::load(&ram, &mut src, LinuxEntry::BootProtocol64).unwrap();
    std::fs::remove_file(&ipath).ok();
    std::fs::remove_dir_all(&dir).ok();

    // Entry: 32-bit protected mode, paging off, EBX = hvm_start_info (Linux arch/x86/platform/pvh/head.S).
    assert_eq!(entry.regs.rip, 0x10_0000);
    let info_addr = entry.regs.rbx;
    assert!(entry.sregs.cs.db && !entry.sregs.cs.l && entry.sregs.cs.present);
    assert_eq!(entry.sregs.cr0 & 0x8000_0001, 1, "CR0.PE without PG");
    assert_eq!(entry.sregs.efer, 0);
    assert_eq!(entry.regs.rflags & 0x200, 0, "interrupts off");
    assert_eq!((entry.sregs.tr.type_, entry.sregs.tr.limit), (0xb, 0x67), "32-bit TSS");

    let info = read(&ram, info_addr, 56);
    assert_eq!(u32_at(&info, 0), 0x336e_c578, "magic");
    assert_eq!(u32_at(&info, 4), 1, "version 1: with a memory map");
    assert_eq!(u32_at(&info, 12), 1, "one module: the initrd");
    let modlist = u64_at(&info, 16);
    let cmdline = u64_at(&info, 24);
    let memmap = u64_at(&info, 40);
    let entries = u32_at(&info, 48) as usize;

    let c = read(&ram, cmdline, 29);
    assert_eq!(&c[..28], b"console=ttyS0 root=/dev/ram0");
    assert_eq!(c[28], 0);

    let m = read(&ram, memmap, 24 * entries);
    let map: Vec<(u64, u64, u32)> =
        (0..entries).map(|i| (u64_at(&m, 24 * i), u64_at(&m, 24 * i + 8), u32_at(&m, 24 * i + 16))).collect();
    let usable: Vec<(u64, u64)> = map.iter().filter(|e| e.2 == 1).map(|e| (e.0, e.1)).collect();
    assert_eq!(usable, vec![(0, 0x9fc00), (0x10_0000, ram_size - 0x10_0000)], "{map:x?}");

    let module = read(&ram, modlist, 32);
    let (paddr, size) = (u64_at(&module, 0), u64_at(&module, 8));
    assert_eq!(size, initrd.len() as u64);
    assert_eq!(paddr % 4096, 0);
    assert!(paddr + size <= ram_size && paddr + size > ram_size - 8192, "initrd at the top of RAM: {paddr:#x}");
    assert_eq!(read(&ram, paddr, initrd.len()), initrd);
}

#[test]
fn an_elf_beyond_ram_is_refused_by_note_first() {
    let dir = scratch("pvh-far");
    let ram = GuestRam::new(16 << 20).unwrap();
    let open = |p: &Path| BootSource {
        kernel: File::open(p).unwrap(),
        kernel_path: p.display().to_string(),
        initrd: None,
        cmdline: String::new(),
    };
    // Without the note: QEMU's message, whatever the segments are.
    let far_plain = pvh_kernel(&dir, "far-plain", 0x4000_0000, false);
    let err = boot::load(&ram, &mut open(&far_plain), LinuxEntry::BootProtocol64).unwrap_err();
    assert_eq!(err.to_string(), "Error loading uncompressed kernel without PVH ELF Note");
    // With the note but linked at 1 GiB in a 16 MiB guest: it does not fit.
    let far_pvh = pvh_kernel(&dir, "far-pvh", 0x4000_0000, true);
    let err = boot::load(&ram, &mut open(&far_pvh), LinuxEntry::BootProtocol64).unwrap_err();
    assert!(matches!(err, Error::KernelDoesNotFit { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hostile_bzimage_headers_fail_cleanly() {
    let ram = GuestRam::new(128 << 20).unwrap();
    let mut base = vec![0u8; 0x4000];
    base[0x1f1] = 4; // setup_sects
    base[0x202..0x206].copy_from_slice(b"HdrS");
    base[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    base[0x211] = 1; // LOADED_HIGH
    base[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    base[0x238..0x23c].copy_from_slice(&0x7ffu32.to_le_bytes()); // cmdline_size
    base[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let variants: Vec<(&str, Patch)> = vec![
        ("payload beyond the file", Box::new(|b| b[0x24c..0x250].copy_from_slice(&0x100_0000u32.to_le_bytes()))),
        ("payload not xz", Box::new(|b| b[0x24c..0x250].copy_from_slice(&0x100u32.to_le_bytes()))),
        (
            "truncated xz",
            Box::new(|b| {
                b[0x24c..0x250].copy_from_slice(&0x20u32.to_le_bytes());
                b[0xa00..0xa06].copy_from_slice(b"\xfd7zXZ\0");
            }),
        ),
        ("huge payload length", Box::new(|b| b[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes()))),
        ("huge init_size", Box::new(|b| b[0x260..0x264].copy_from_slice(&u32::MAX.to_le_bytes()))),
        ("old protocol", Box::new(|b| b[0x206..0x208].copy_from_slice(&0x0201u16.to_le_bytes()))),
        ("setup beyond the file", Box::new(|b| b[0x1f1] = 0xff)),
    ];
    for (what, patch) in variants {
        let mut img = base.clone();
        patch(&mut img);
        let (p, _) = temp_file("hostile", &img, None);
        for mode in [LinuxEntry::BootProtocol64, LinuxEntry::Decompressed] {
            let mut src = BootSource {
                kernel: File::open(&p).unwrap(),
                kernel_path: "hostile".into(),
                initrd: None,
                cmdline: String::new(),
            };
            let r = boot::load(&ram, &mut src, mode);
            // A 16 KiB image with a valid header loads on the compressed path (it is only copied); everything
            // the decompressed path reads must be checked.
            if mode == LinuxEntry::Decompressed || what == "old protocol" || what == "setup beyond the file" {
                assert!(r.is_err(), "{what} ({mode:?}) was accepted");
            }
        }
        std::fs::remove_file(&p).ok();
    }
}
