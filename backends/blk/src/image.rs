//! Host side of the block device: the [`BlockIo`] trait the request logic runs on, and its two
//! image implementations (raw files through positioned vectored syscalls, qcow2 through imago).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions};
use log::warn;
use vm_memory::VolatileSlice;

use crate::error::{Error, Result};

/// A piece of guest memory a request reads into or writes from.
///
/// The bitmap type is `()` because tessera-blk does not track dirty pages (no live migration of
/// the backend's view of guest memory).
pub type GuestSlice<'a> = VolatileSlice<'a, ()>;

/// What the virtio-blk request logic needs from the host: one disk of a fixed size.
///
/// Offsets and lengths are in bytes; the caller has already checked that every range lies inside
/// `size()`, so implementations may treat an out-of-range access as an I/O error.
pub trait BlockIo: Send + Sync {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;
    /// Fill `bufs`, in order, with the disk contents starting at `offset`.
    fn read_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()>;
    /// Write the contents of `bufs`, in order, to the disk starting at `offset`.
    fn write_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()>;
    /// Like `read_at`, but fails with `ErrorKind::WouldBlock` rather than wait for the device
    /// (a page-cache miss), so the caller can move the request to a thread that may block. Bytes
    /// may have been copied before it gives up. Default: just `read_at`.
    fn try_read_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.read_at(offset, bufs)
    }
    /// Like `write_at`, failing with `ErrorKind::WouldBlock` rather than wait (writeback
    /// throttling, block allocation); a partial write may have happened. Default: `write_at`.
    fn try_write_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.write_at(offset, bufs)
    }
    /// Whether `try_write_at` can really refuse to wait. False where the host file system has no
    /// `RWF_NOWAIT` for writes (ext4 buffered writes): then it simply blocks. Default: true.
    fn nonblocking_writes(&self) -> bool {
        true
    }
    /// The descriptor reads and writes may be submitted on directly, bypassing `read_at` and
    /// `write_at` (tessera-blk's io_uring path): only for raw images opened with `O_DIRECT`,
    /// where nothing else happens on the way. Default: none.
    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// The guest no longer needs `[offset, offset+len)`; its contents become unspecified.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// `[offset, offset+len)` must read back as zeroes; with `may_unmap` the space may be freed.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
}

/// Disk image formats tessera-blk can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    pub path: PathBuf,
    /// `None`: probe, like QEMU does when `format=` is not given.
    pub format: Option<ImageFormat>,
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`), like QEMU's `cache.direct=on`.
    pub direct: bool,
    /// Take QEMU-compatible image locks (QEMU's `file.locking=on`, its default).
    pub lock: bool,
    /// Serve this already open descriptor instead of opening `path` (which then only names the
    /// image in messages): a launcher opens the image before sandboxing us.
    pub fd: Option<RawFd>,
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Probes the format from the first bytes of the image, as QEMU does.
pub fn detect_format(path: &Path) -> Result<ImageFormat> {
    let file = File::open(path).map_err(|source| Error::DetectFormat { path: path.to_owned(), source })?;
    detect_format_of(&file, path)
}

/// [`detect_format`] on an open file (read with `pread`, so its offset is untouched); `path`
/// names it in errors.
pub fn detect_format_of(file: &File, path: &Path) -> Result<ImageFormat> {
    let detect_err = |source| Error::DetectFormat { path: path.to_owned(), source };
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match std::os::unix::fs::FileExt::read_at(file, &mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(detect_err(e)),
        }
    }
    let head = &head[..got];
    if head.starts_with(&QCOW2_MAGIC) {
        return Ok(ImageFormat::Qcow2);
    }
    // Formats QEMU would recognise but we do not serve: probing them as raw would hand the
    // guest the container's metadata as disk contents, so refuse instead.
    for (magic, name) in OTHER_FORMATS {
        if head.starts_with(magic) {
            return Err(Error::UnsupportedFormat { path: path.to_owned(), format: name });
        }
    }
    Ok(ImageFormat::Raw)
}

/// Magic numbers at offset 0 of image formats tessera-blk does not serve.
const OTHER_FORMATS: &[(&[u8], &str)] =
    &[(b"KDMV", "vmdk"), (b"vhdxfile", "vhdx"), (b"QED\0", "qed"), (b"LUKS\xba\xbe", "luks"), (b"conectix", "vpc")];

/// Opens the image described by `opts`, probing its format if none was given.
pub fn open_image(opts: &ImageOptions) -> Result<Box<dyn BlockIo>> {
    if let Some(fd) = opts.fd {
        return open_image_fd(opts, fd);
    }
    let lock = if opts.lock { Some(ImageLock::acquire(&opts.path, !opts.read_only)?) } else { None };
    let format = match opts.format {
        Some(f) => f,
        None => {
            let f = detect_format(&opts.path)?;
            if f == ImageFormat::Raw {
                // Same advice QEMU gives: a guest can write a qcow2 header into a raw image, and a
                // later probe would then trust it.
                warn!(
                    "image format was not specified for {} and probing guessed raw; \
                     specify --format raw explicitly to silence this warning",
                    opts.path.display()
                );
            }
            f
        }
    };
    let image: Box<dyn BlockIo> = match format {
        ImageFormat::Raw => {
            let mut raw = RawImage::open(opts)?;
            raw.guard_probe = opts.format.is_none();
            raw.lock = lock;
            Box::new(raw)
        }
        ImageFormat::Qcow2 => {
            let mut q = Qcow2Image::open(opts)?;
            q.lock = lock;
            Box::new(q)
        }
    };
    if image.size() < 512 {
        return Err(Error::ImageTooSmall { path: opts.path.clone(), size: image.size() });
    }
    Ok(image)
}

fn warn_probed_raw(path: &Path) {
    // Same advice QEMU gives: a guest can write a qcow2 header into a raw image, and a later
    // probe would then trust it.
    warn!(
        "image format was not specified for {} and probing guessed raw; \
         specify --format raw explicitly to silence this warning",
        path.display()
    );
}

/// Takes ownership of an inherited descriptor after checking that it is open.
pub fn take_fd(fd: RawFd, what: &Path) -> Result<File> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::BadFd { what: what.to_owned(), fd });
    }
    // SAFETY: the descriptor is open (checked above) and handed to us by our parent for this
    // purpose; nothing else in this process owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn open_image_fd(opts: &ImageOptions, fd: RawFd) -> Result<Box<dyn BlockIo>> {
    let open_err = |source| Error::OpenImage { path: opts.path.clone(), source };
    let file = take_fd(fd, &opts.path)?;
    if opts.direct {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; only O_DIRECT is added.
        let ok = unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) == 0
        };
        if !ok {
            return Err(open_err(io::Error::last_os_error()));
        }
    }
    let lock = if opts.lock {
        Some(ImageLock::acquire_on(file.try_clone().map_err(open_err)?, &opts.path, !opts.read_only)?)
    } else {
        None
    };
    let format = match opts.format {
        Some(f) => f,
        None => {
            let f = detect_format_of(&file, &opts.path)?;
            if f == ImageFormat::Raw {
                warn_probed_raw(&opts.path);
            }
            f
        }
    };
    let image: Box<dyn BlockIo> = match format {
        ImageFormat::Raw => {
            let mut raw = RawImage::from_file(file, opts.direct).map_err(open_err)?;
            raw.guard_probe = opts.format.is_none();
            raw.lock = lock;
            Box::new(raw)
        }
        ImageFormat::Qcow2 => {
            let mut q = Qcow2Image::from_file(file, opts)?;
            q.lock = lock;
            Box::new(q)
        }
    };
    if image.size() < 512 {
        return Err(Error::ImageTooSmall { path: opts.path.clone(), size: image.size() });
    }
    Ok(image)
}

/// A raw image (file or block device), accessed with `preadv`/`pwritev` straight into guest
/// memory.
pub struct RawImage {
    file: File,
    size: u64,
    direct: bool,
    /// Held for as long as the image is open.
    lock: Option<ImageLock>,
    /// `RWF_NOWAIT` still believed to work on this file for [reads, writes] (cleared on
    /// EOPNOTSUPP: ext4, for one, supports it for buffered reads but not buffered writes).
    nowait: [AtomicBool; 2],
    /// The file lives in memory (tmpfs): its writes never wait for a device, with or without
    /// `RWF_NOWAIT` (tmpfs refuses the flag for writes).
    memory_fs: bool,
    /// The format was probed: refuse guest writes that would make the next probe see qcow2
    /// (QEMU restricts writes to block 0 of probed raw images for the same reason).
    guard_probe: bool,
}

/// Most iovecs one `preadv`/`pwritev` accepts (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;
/// Whether `file` is on tmpfs (or another memory file system).
fn on_memory_fs(file: &File) -> bool {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;
    // SAFETY: statfs is plain data, zero is a valid value; fstatfs writes at most its size.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a pointer to a statfs we own.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let t = st.f_type as libc::c_long;
    [TMPFS_MAGIC, RAMFS_MAGIC, HUGETLBFS_MAGIC].contains(&t)
}

/// Alignment of bounce buffers for `O_DIRECT`; 4 KiB satisfies every common logical block size.
const DIRECT_ALIGN: usize = 4096;

impl RawImage {
    pub fn open(opts: &ImageOptions) -> Result<Self> {
        let open_err = |source| Error::OpenImage { path: opts.path.clone(), source };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let mut file = oo.open(&opts.path).map_err(open_err)?;
        // Seeking to the end works for regular files and block devices alike.
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(RawImage {
            memory_fs: on_memory_fs(&file),
            file,
            size,
            direct: opts.direct,
            guard_probe: false,
            lock: None,
            nowait: [AtomicBool::new(true), AtomicBool::new(true)],
        })
    }

    /// Wraps an already open file (tests, and a launcher that opens images before jailing us).
    pub fn from_file(mut file: File, direct: bool) -> io::Result<Self> {
        let size = file.seek(SeekFrom::End(0))?;
        Ok(RawImage {
            memory_fs: on_memory_fs(&file),
            file,
            size,
            direct,
            guard_probe: false,
            lock: None,
            nowait: [AtomicBool::new(true), AtomicBool::new(true)],
        })
    }

    /// A non-blocking attempt (`RWF_NOWAIT`, Linux 4.14+ for reads, 5.9+ for buffered writes
    /// on most file systems); `WouldBlock` when the kernel would have to wait for the device.
    fn try_transfer(&self, offset: u64, bufs: &[GuestSlice<'_>], write: bool) -> io::Result<()> {
        if self.direct {
            // O_DIRECT always waits for the device.
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let nowait = &self.nowait[usize::from(write)];
        if !nowait.load(Ordering::Relaxed) {
            return self.transfer(offset, bufs, write);
        }
        match positioned_vectored(&self.file, offset, bufs, write, libc::RWF_NOWAIT) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // This file system cannot do it: block inline from now on.
                if nowait.swap(false, Ordering::Relaxed) {
                    log::info!(
                        "the host file system does not support RWF_NOWAIT for {}; those run on the queue thread{}",
                        if write { "writes" } else { "reads" },
                        if write && !self.memory_fs { " at queue depth 1, in the I/O pool deeper" } else { "" }
                    );
                }
                self.transfer(offset, bufs, write)
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(io::Error::from(io::ErrorKind::WouldBlock)),
            r => r,
        }
    }

    fn transfer(&self, offset: u64, bufs: &[GuestSlice<'_>], write: bool) -> io::Result<()> {
        match positioned_vectored(&self.file, offset, bufs, write, 0) {
            // O_DIRECT wants buffers aligned to the device's logical block; a guest's buffers
            // need not be (virtio only promises 512-byte multiples of length), so retry through
            // an aligned bounce buffer.
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                bounce_transfer(&self.file, offset, bufs, write)
            }
            r => r,
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn write_zero_buffer(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let chunk = AlignedBuf::zeroed(1 << 20)?;
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(chunk.len() as u64) as usize;
            write_all_at(&self.file, &chunk.as_slice()[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl BlockIo for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        // A probed raw image guards its first bytes in `write_at`, so it keeps that path.
        (self.direct && !self.guard_probe).then(|| self.file.as_raw_fd())
    }

    fn read_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.transfer(offset, bufs, false)
    }

    fn try_read_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.try_transfer(offset, bufs, false)
    }

    fn nonblocking_writes(&self) -> bool {
        self.memory_fs || self.nowait[1].load(Ordering::Relaxed)
    }

    fn try_write_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        if self.guard_probe && offset < QCOW2_MAGIC.len() as u64 {
            // Let write_at apply the probe guard.
            return self.write_at(offset, bufs);
        }
        self.try_transfer(offset, bufs, true)
    }

    fn write_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        if self.guard_probe && offset < QCOW2_MAGIC.len() as u64 && writes_format_magic(offset, bufs) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "write of a qcow2 header into a probed raw image refused (use --format raw)",
            ));
        }
        self.transfer(offset, bufs, true)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            // Discard is a hint (virtio 1.2 §5.2.6.2: the device may ignore it), so a host
            // file system that cannot punch holes is not an error.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        // A punched hole reads back as zeroes, so with unmap allowed it is the cheapest way;
        // otherwise keep the blocks allocated with ZERO_RANGE. Fall back to writing zeroes.
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zero_buffer(offset, len),
            r => r,
        }
    }
}

/// Whether a write at `offset` (< 4) puts the qcow2 magic at the start of the image.
fn writes_format_magic(offset: u64, bufs: &[GuestSlice<'_>]) -> bool {
    if offset != 0 {
        return false;
    }
    let mut head = [0u8; 4];
    let mut got = 0;
    for b in bufs {
        if got == head.len() {
            break;
        }
        got += b.copy_to(&mut head[got..]);
    }
    got == head.len() && head == QCOW2_MAGIC
}

/// `preadv`/`pwritev` of guest memory at `offset`, retrying short transfers and splitting at
/// `IOV_MAX`.
fn positioned_vectored(
    file: &File,
    mut offset: u64,
    bufs: &[GuestSlice<'_>],
    write: bool,
    flags: libc::c_int,
) -> io::Result<()> {
    // The guards keep the memory mapped (vm-memory's contract for raw pointers).
    let guards: Vec<_> = bufs.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .filter(|g| g.len() > 0)
        .map(|g| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: g.len() })
        .collect();
    let mut first = 0;
    while first < iovs.len() {
        let count = (iovs.len() - first).min(IOV_MAX);
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let iov_ptr = iovs[first..].as_ptr();
        let ret = if write {
            // SAFETY: every iovec points into guest memory kept mapped by `guards` for the
            // duration of the call, with the length of its VolatileSlice.
            unsafe { libc::pwritev2(file.as_raw_fd(), iov_ptr, count as libc::c_int, off, flags) }
        } else {
            // SAFETY: as above; the kernel writes only within each iovec.
            unsafe { libc::preadv2(file.as_raw_fd(), iov_ptr, count as libc::c_int, off, flags) }
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ret == 0 {
            return Err(io::Error::from(if write { io::ErrorKind::WriteZero } else { io::ErrorKind::UnexpectedEof }));
        }
        let mut done = ret as usize;
        offset += done as u64;
        while done > 0 {
            let iov = &mut iovs[first];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: `done < iov_len`, so the advanced pointer stays inside the same slice.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

fn bounce_transfer(file: &File, offset: u64, bufs: &[GuestSlice<'_>], write: bool) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut bounce = AlignedBuf::zeroed(total)?;
    if write {
        let mut pos = 0;
        for b in bufs {
            b.copy_to(&mut bounce.as_mut_slice()[pos..pos + b.len()]);
            pos += b.len();
        }
        write_all_at(file, bounce.as_slice(), offset)
    } else {
        read_exact_at(file, bounce.as_mut_slice(), offset)?;
        let mut pos = 0;
        for b in bufs {
            b.copy_from(&bounce.as_slice()[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }
}

fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// A zeroed heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(AlignedBuf { ptr, layout })
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live, initialised (zeroed) allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A qcow2 image through imago, which handles cluster allocation, refcounts, L1/L2 caching and
/// backing files. Reads and writes share the lock (imago serialises metadata updates itself);
/// discard needs exclusive access in imago's API.
pub struct Qcow2Image {
    access: RwLock<FormatAccess<imago::file::File>>,
    size: u64,
    /// Held for as long as the image is open.
    lock: Option<ImageLock>,
}

impl Qcow2Image {
    pub fn open(opts: &ImageOptions) -> Result<Self> {
        let open_err = |source| Error::OpenImage { path: opts.path.clone(), source };
        // imago 0.2.6 opens encrypted images without a word and would serve ciphertext (and
        // store guest writes unencrypted): refuse them. qcow2 header: `crypt_method` is the
        // big-endian u32 at byte 32.
        let mut header = [0u8; 36];
        std::os::unix::fs::FileExt::read_exact_at(&File::open(&opts.path).map_err(open_err)?, &mut header, 0)
            .map_err(open_err)?;
        if u32::from_be_bytes([header[32], header[33], header[34], header[35]]) != 0 {
            return Err(Error::UnsupportedFormat { path: opts.path.clone(), format: "encrypted qcow2" });
        }
        // The backing chain is opened implicitly from the paths recorded in the image (as QEMU
        // does without an explicit backing= option), read-only.
        let qcow2 = Qcow2::<imago::file::File>::builder_path(&opts.path)
            .write(!opts.read_only)
            .storage_open_options(StorageOpenOptions::new().direct(opts.direct))
            .open(PermissiveImplicitOpenGate::default())
            .map_err(open_err)?;
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        Ok(Qcow2Image { access: RwLock::new(access), size, lock: None })
    }

    /// [`Qcow2Image::open`] on an already open file; backing files named in the image are still
    /// opened by path (absolute ones only: the descriptor has no directory to resolve against).
    pub fn from_file(file: File, opts: &ImageOptions) -> Result<Self> {
        let open_err = |source| Error::OpenImage { path: opts.path.clone(), source };
        let mut header = [0u8; 36];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0).map_err(open_err)?;
        if u32::from_be_bytes([header[32], header[33], header[34], header[35]]) != 0 {
            return Err(Error::UnsupportedFormat { path: opts.path.clone(), format: "encrypted qcow2" });
        }
        let storage = imago::file::File::from_open_file(
            file,
            StorageOpenOptions::new().write(!opts.read_only).direct(opts.direct),
        )
        .map_err(open_err)?;
        let qcow2 = Qcow2::<imago::file::File>::builder(storage)
            .write(!opts.read_only)
            .open(PermissiveImplicitOpenGate::default())
            .map_err(open_err)?;
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        Ok(Qcow2Image { access: RwLock::new(access), size, lock: None })
    }

    fn read_lock(&self) -> io::Result<std::sync::RwLockReadGuard<'_, FormatAccess<imago::file::File>>> {
        self.access.read().map_err(|_| io::Error::other("qcow2 state poisoned by an earlier panic"))
    }
}

impl BlockIo for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let (vec, _guard) = IoVectorMut::from_volatile_slice(bufs.iter());
        self.read_lock()?.readv(vec, offset)
    }

    fn write_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let (vec, _guard) = IoVector::from_volatile_slice(bufs.iter());
        self.read_lock()?.writev(vec, offset)
    }

    fn flush(&self) -> io::Result<()> {
        let access = self.read_lock()?;
        access.flush()?;
        access.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut access =
            self.access.write().map_err(|_| io::Error::other("qcow2 state poisoned by an earlier panic"))?;
        access.discard_to_any(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        // imago chooses zero clusters where it can, which frees space either way.
        self.read_lock()?.write_zeroes(offset, len)
    }
}

/// QEMU's image locking (block/file-posix.c), so that QEMU, qemu-img and tessera-blk refuse to
/// write an image another of them is using: open-file-description read locks on one byte per
/// block-layer permission, at 100 + bit for each permission held and at 200 + bit for each one
/// not shared with others. Permission bits (QEMU's `BLK_PERM_*`): 0 consistent read, 1 write,
/// 3 resize. Like a QEMU guest disk, we hold consistent read (and write unless read-only), and
/// share neither write nor resize. Written from that description; no QEMU code.
pub struct ImageLock {
    _file: File,
}

const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;

impl ImageLock {
    pub fn acquire(path: &Path, write: bool) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::OpenImage { path: path.to_owned(), source })?;
        Self::acquire_on(file, path, write)
    }

    /// Locks through `file` (any descriptor of the image; `path` names it in errors).
    pub fn acquire_on(file: File, path: &Path, write: bool) -> Result<Self> {
        let lock_err = |source| Error::Lock { path: path.to_owned(), source };
        let held: &[i64] = if write { &[PERM_CONSISTENT_READ, PERM_WRITE] } else { &[PERM_CONSISTENT_READ] };
        let unshared = [PERM_WRITE, PERM_RESIZE];
        // Someone who does not share a permission we hold, or holds one we do not share.
        let conflicts = held.iter().map(|p| LOCK_SHARED_BASE + p).chain(unshared.iter().map(|p| LOCK_PERM_BASE + p));
        for byte in conflicts {
            if ofd_lock(&file, byte, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short).map_err(lock_err)? {
                return Err(Error::InUse { path: path.to_owned(), byte });
            }
        }
        for byte in held.iter().map(|p| LOCK_PERM_BASE + p).chain(unshared.iter().map(|p| LOCK_SHARED_BASE + p)) {
            ofd_lock(&file, byte, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short).map_err(lock_err)?;
        }
        Ok(ImageLock { _file: file })
    }
}

/// One-byte OFD lock operation; for F_OFD_GETLK returns whether another lock conflicts.
fn ofd_lock(file: &File, byte: i64, cmd: libc::c_int, ty: libc::c_short) -> io::Result<bool> {
    // SAFETY: flock is plain data; zeroed is a valid value (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl with an OFD lock command reads and (for GETLK) writes `fl`, a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as libc::c_short)
}
