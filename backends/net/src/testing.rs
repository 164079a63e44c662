//! Fuzz harness for the guest-frame path, shared by the cargo-fuzz target and a stable unit
//! test: a fixed ring layout in 64 KiB of guest memory whose descriptor table, avail ring and
//! buffers come from the input, run through [`crate::frame::process_tx`] (TX) and
//! [`crate::frame::deliver_rx`] (RX, with frames taken from the input too).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::frame::{
    deliver_rx, deliver_rx_with, process_tx_with, RxOutcome, TxMode, MAX_FRAME_LEN, MAX_GSO_FRAME_LEN, MIN_FRAME_LEN,
    VNET_HDR_LEN,
};

const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const DATA: u64 = 0x400;
const MEM: usize = 0x1_0000;

fn queue(event_idx: bool) -> Option<Queue> {
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Some(q)
}

/// Byte 0: flags (bit 0 event idx, bit 1 RX instead of TX, bit 2 mergeable RX buffers);
/// bytes 1-2: RX frame length; then the descriptor table (16 x 16 bytes), the avail ring, and
/// the memory from DATA on. Nothing may panic, whatever the bytes.
pub fn fuzz_queues(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let (flags, rest) = data.split_first().unwrap_or((&0, &[]));
    let (len_bytes, rest) = rest.split_at(rest.len().min(2));
    let frame_len = len_bytes.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b));
    let take = |rest: &[u8], n: usize| -> (Vec<u8>, Vec<u8>) {
        let n = n.min(rest.len());
        (rest[..n].to_vec(), rest[n..].to_vec())
    };
    let (desc, rest) = take(rest, usize::from(QUEUE_SIZE) * 16);
    let (avail, rest) = take(&rest, 4 + 2 * usize::from(QUEUE_SIZE));
    let rest = &rest[..rest.len().min(MEM - DATA as usize)];
    if mem.write_slice(&desc, GuestAddress(DESC)).is_err()
        || mem.write_slice(&avail, GuestAddress(AVAIL)).is_err()
        || mem.write_slice(rest, GuestAddress(DATA)).is_err()
    {
        return;
    }
    let Some(mut q) = queue(flags & 1 != 0) else {
        return;
    };
    // Bit 3: the tap-with-vnet-header path (header kept, GSO-sized frames).
    let vnet = flags & 8 != 0;
    if flags & 2 == 0 {
        let mut frames = 0usize;
        let (mode, min, max) = if vnet {
            (TxMode::VnetHdr, VNET_HDR_LEN + MIN_FRAME_LEN, VNET_HDR_LEN + MAX_GSO_FRAME_LEN)
        } else {
            (TxMode::Plain, MIN_FRAME_LEN, MAX_FRAME_LEN)
        };
        for _ in 0..2 {
            let r = process_tx_with(&mut q, &mem, mode, |f| {
                assert!((min..=max).contains(&f.len()), "frame of {} bytes passed", f.len());
                frames += 1;
                !frames.is_multiple_of(3)
            });
            if let Ok(n) = r {
                assert!(n <= usize::from(QUEUE_SIZE));
            }
        }
    } else {
        let cap = if vnet { MAX_GSO_FRAME_LEN + 1 } else { 2 * MAX_FRAME_LEN };
        let frame: Vec<u8> = (0..frame_len.min(cap)).map(|i| i as u8).collect();
        let hdr = [*flags; VNET_HDR_LEN];
        for _ in 0..4 {
            let outcome = if vnet {
                deliver_rx_with(&mut q, &mem, hdr, &frame, flags & 4 != 0, MAX_GSO_FRAME_LEN)
            } else {
                deliver_rx(&mut q, &mem, &frame, flags & 4 != 0)
            };
            if let RxOutcome::Delivered(n) = outcome {
                assert!((1..=QUEUE_SIZE).contains(&n));
            }
        }
    }
    let _ = q.needs_notification(&mem);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{process_tx, Desc};

    fn write_desc(mem: &GuestMemoryMmap, i: u16, d: Desc, next: Option<u16>) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        let mut flags = 0u16;
        if next.is_some() {
            flags |= 1;
        }
        if d.writable {
            flags |= 2;
        }
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
        mem.write_slice(&b, GuestAddress(DESC + 16 * u64::from(i))).unwrap();
    }

    fn publish(mem: &GuestMemoryMmap, heads: &[u16]) {
        for (i, h) in heads.iter().enumerate() {
            mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64)).unwrap();
        }
        mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used(mem: &GuestMemoryMmap, i: u64) -> (u32, u32) {
        let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * i)).unwrap();
        (id, len)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    #[test]
    fn tx_frames_split_anyhow_and_bad_ones_dropped() {
        let m = mem();
        let frame: Vec<u8> = (0..60u8).collect();
        // Chain 0: header and frame split across 3 descriptors at odd places.
        let mut bytes = vec![0u8; VNET_HDR_LEN];
        bytes.extend_from_slice(&frame);
        m.write_slice(&bytes, GuestAddress(0x1000)).unwrap();
        write_desc(&m, 0, Desc { addr: 0x1000, len: 5, writable: false }, Some(1));
        write_desc(&m, 1, Desc { addr: 0x1005, len: 20, writable: false }, Some(2));
        write_desc(&m, 2, Desc { addr: 0x1019, len: 47, writable: false }, None);
        // Chain 3: outside memory. Chain 4: oversized. Chain 5: writable. Chain 6: offload flag.
        write_desc(&m, 3, Desc { addr: 0xffff_0000, len: 100, writable: false }, None);
        write_desc(&m, 4, Desc { addr: 0x2000, len: 9000, writable: false }, None);
        write_desc(&m, 5, Desc { addr: 0x1000, len: 72, writable: true }, None);
        m.write_slice(&[1u8], GuestAddress(0x3000)).unwrap();
        write_desc(&m, 6, Desc { addr: 0x3000, len: 72, writable: false }, None);
        publish(&m, &[0, 3, 4, 5, 6]);
        let mut q = queue(false).unwrap();
        let mut got = Vec::new();
        let n = process_tx(&mut q, &m, |f| {
            got.push(f.to_vec());
            true
        })
        .unwrap();
        assert_eq!(n, 5, "every chain is returned");
        assert_eq!(got, vec![frame], "only the good frame is sent");
        assert_eq!(used(&m, 0), (0, 0));
    }

    #[test]
    fn tx_with_vnet_header_keeps_offload_requests_and_takes_gso_frames() {
        use crate::frame::{process_tx_with, TxMode};
        let m = mem();
        // Chain 0: a checksum-offload request (flags = NEEDS_CSUM) on a short frame. Chain 1: a
        // 9000-byte GSO frame. Both go to the tap with their headers.
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[0] = 1;
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(&[7u8; 60]);
        m.write_slice(&bytes, GuestAddress(0x1000)).unwrap();
        write_desc(&m, 0, Desc { addr: 0x1000, len: 72, writable: false }, None);
        write_desc(&m, 1, Desc { addr: 0x2000, len: 9000, writable: false }, None);
        publish(&m, &[0, 1]);
        let mut q = queue(false).unwrap();
        let mut got = Vec::new();
        let n = process_tx_with(&mut q, &m, TxMode::VnetHdr, |f| {
            got.push(f.to_vec());
            true
        })
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(got[0], bytes);
        assert_eq!(got[1].len(), 9000);
    }

    #[test]
    fn rx_with_a_tap_header_passes_it_and_sets_num_buffers() {
        use crate::frame::{deliver_rx_with, MAX_GSO_FRAME_LEN};
        let m = mem();
        write_desc(&m, 0, Desc { addr: 0x4000, len: 4096, writable: true }, None);
        publish(&m, &[0]);
        let mut q = queue(false).unwrap();
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[0] = 2; // DATA_VALID
        hdr[10] = 9; // num_buffers from the tap is not trusted
        let frame = [5u8; 3000];
        assert_eq!(deliver_rx_with(&mut q, &m, hdr, &frame, true, MAX_GSO_FRAME_LEN), RxOutcome::Delivered(1));
        let mut got = [0u8; VNET_HDR_LEN];
        m.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        assert_eq!(got, [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(used(&m, 0), (0, (VNET_HDR_LEN + 3000) as u32));
    }

    #[test]
    fn tx_backpressure_leaves_the_chain_available() {
        let m = mem();
        m.write_slice(&[0u8; 80], GuestAddress(0x1000)).unwrap();
        write_desc(&m, 0, Desc { addr: 0x1000, len: 80, writable: false }, None);
        write_desc(&m, 1, Desc { addr: 0x1000, len: 80, writable: false }, None);
        publish(&m, &[0, 1]);
        let mut q = queue(false).unwrap();
        assert_eq!(process_tx(&mut q, &m, |_| false).unwrap(), 0);
        assert_eq!(q.next_avail(), 0);
        assert_eq!(process_tx(&mut q, &m, |_| true).unwrap(), 2);
    }

    #[test]
    fn rx_mergeable_spans_buffers_and_waits_for_more() {
        let m = mem();
        for i in 0..4u16 {
            write_desc(&m, i, Desc { addr: 0x1000 + 0x400 * u64::from(i), len: 512, writable: true }, None);
        }
        publish(&m, &[0, 1, 2]);
        let mut q = queue(false).unwrap();
        let frame: Vec<u8> = (0..1400).map(|i| i as u8).collect();
        assert_eq!(deliver_rx(&mut q, &m, &frame, true), RxOutcome::Delivered(3));
        let mut hdr = [0u8; VNET_HDR_LEN];
        m.read_slice(&mut hdr, GuestAddress(0x1000)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3);
        let mut back = vec![0u8; 500];
        m.read_slice(&mut back, GuestAddress(0x1000 + 12)).unwrap();
        assert_eq!(&back[..], &frame[..500]);
        m.read_slice(&mut back[..12], GuestAddress(0x1400)).unwrap();
        assert_eq!(&back[..12], &frame[500..512]);
        assert_eq!(used(&m, 0), (0, 512));
        assert_eq!(used(&m, 2), (2, (VNET_HDR_LEN + 1400 - 1024) as u32));
        // One buffer left (index 3 not yet published): not enough, nothing is consumed.
        publish(&m, &[0, 1, 2, 3]);
        assert_eq!(deliver_rx(&mut q, &m, &frame, true), RxOutcome::NoBuffers);
        assert_eq!(q.next_avail(), 3);
        // Without MRG_RXBUF a too-small single buffer drops the frame.
        assert_eq!(deliver_rx(&mut q, &m, &frame, false), RxOutcome::Dropped);
        assert_eq!(used(&m, 3), (3, 0));
    }

    #[test]
    fn random_rings_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..3000 {
            let len = 1 + (round * 37) % 1200;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Small values often, so lengths and indices are plausible.
                    if x.is_multiple_of(3) {
                        (x >> 40) as u8 & 0x0f
                    } else {
                        (x >> 32) as u8
                    }
                })
                .collect();
            fuzz_queues(&data);
        }
    }
}
