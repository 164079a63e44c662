//! The front-end side the raw vhost-user tests share (included with `#[path]`): guest memory in a file the
//! backend maps, and one queue (queue 0) at fixed guest addresses started on a `vhost` crate `Frontend`.

use std::fs::File;
use std::os::fd::AsRawFd;

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size, and where queue 0's descriptor table, available and used rings are.
pub const MEM: usize = 1 << 20;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;

/// `MEM` bytes of guest memory backed by `file` (resized to fit), so the backend can map the same pages.
pub fn guest_memory(file: &File) -> GuestMemoryMmap {
    file.set_len(MEM as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap()
}

/// SET_MEM_TABLE with `mem` (backed by `file`), then queue 0 with `size` entries at DESC/AVAIL/USED, starting at
/// `base`, enabled. Returns the queue's (call, kick) eventfds.
pub fn start_queue0(fe: &mut Frontend, mem: &GuestMemoryMmap, file: &File, size: u16, base: u16) -> (EventFd, EventFd) {
    let hva = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: hva(0),
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }])
    .unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    fe.set_vring_num(0, size).unwrap();
    let addrs = VringConfigData {
        queue_max_size: size,
        queue_size: size,
        flags: 0,
        desc_table_addr: hva(DESC),
        used_ring_addr: hva(USED),
        avail_ring_addr: hva(AVAIL),
        log_addr: None,
    };
    fe.set_vring_addr(0, &addrs).unwrap();
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (call, kick)
}
