//! `blk-bench`: drives a vhost-user-blk socket through libblkio (the `blkio` crate's
//! virtio-blk-vhost-user driver) with a fixed-depth random or sequential workload, and prints one
//! result line: `<workload> bs=<bytes> qd=<n> iops=<x> mibps=<y> seconds=<s>`.
//!
//! Usage: blk-bench <socket> <randread|randwrite|read|write> <block-size> <queue-depth> <seconds>
//!
//! Same client for every backend under test, so differences are the backends'.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: cheap and good enough to spread offsets.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("blk-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        return Err(
            "usage: blk-bench <socket> <randread|randwrite|read|write> <block-size> <queue-depth> <seconds>".into()
        );
    }
    let socket = &args[1];
    let workload = args[2].as_str();
    let (random, write) = match workload {
        "randread" => (true, false),
        "randwrite" => (true, true),
        "read" => (false, false),
        "write" => (false, true),
        other => return Err(format!("unknown workload {other}")),
    };
    let bs: usize = args[3].parse().map_err(|e| format!("block size: {e}"))?;
    let qd: usize = args[4].parse().map_err(|e| format!("queue depth: {e}"))?;
    let seconds: f64 = args[5].parse().map_err(|e| format!("seconds: {e}"))?;
    if bs == 0 || bs % 512 != 0 || qd == 0 {
        return Err("block size must be a non-zero multiple of 512, queue depth non-zero".into());
    }

    let e = |what: &str| {
        let what = what.to_owned();
        move |err: blkio::Error| format!("{what}: {err}")
    };
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e("driver"))?;
    b.set_str("path", socket).map_err(e("path"))?;
    b.connect().map_err(e("connect"))?;
    b.set_i32("num-queues", 1).map_err(e("num-queues"))?;
    let qsize = (qd.next_power_of_two() * 2).clamp(64, 1024) as i32;
    b.set_i32("queue-size", qsize).map_err(e("queue-size"))?;
    let mut started = b.start().map_err(e("start"))?;
    let mut q = started.queues.pop().ok_or("no queue")?;
    let capacity = b.get_u64("capacity").map_err(e("capacity"))?;
    let align = b.get_u64("mem-region-alignment").map_err(e("alignment"))? as usize;
    let blocks = capacity / bs as u64;
    if blocks == 0 {
        return Err(format!("disk of {capacity} bytes is smaller than one block"));
    }

    let region_len = (bs * qd).div_ceil(align) * align;
    let region = b.alloc_mem_region(region_len).map_err(e("alloc"))?;
    b.map_mem_region(&region).map_err(e("map"))?;
    let base = region.addr as *mut u8;
    // Fill write buffers with non-zero data so zero-detection anywhere cannot shortcut writes.
    // SAFETY: the region is `region_len` bytes of memory libblkio allocated for us.
    unsafe { std::ptr::write_bytes(base, 0x5a, region_len) };

    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut seq_block = 0u64;
    let mut next_offset = |rng: &mut Rng| -> u64 {
        let blk = if random {
            rng.next() % blocks
        } else {
            let b = seq_block;
            seq_block = (seq_block + 1) % blocks;
            b
        };
        blk * bs as u64
    };
    let submit = |q: &mut blkio::Blkioq, slot: usize, offset: u64| {
        // SAFETY: slot < qd, so the buffer lies inside the mapped region.
        let buf = unsafe { base.add(slot * bs) };
        if write {
            q.write(offset, buf, bs, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf, bs, slot, ReqFlags::empty());
        }
    };

    for slot in 0..qd {
        let off = next_offset(&mut rng);
        submit(&mut q, slot, off);
    }
    let mut completions: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let deadline = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut done: u64 = 0;
    let mut in_flight = qd;
    let mut stopping = false;
    while in_flight > 0 {
        let n = q.do_io(&mut completions, 1, None, None).map_err(e("do_io"))?;
        if !stopping && start.elapsed() >= deadline {
            stopping = true;
        }
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                return Err(format!("request failed with {}", c.ret));
            }
            in_flight -= 1;
            done += 1;
            if !stopping {
                let off = next_offset(&mut rng);
                submit(&mut q, c.user_data, off);
                in_flight += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let iops = done as f64 / secs;
    println!(
        "{workload} bs={bs} qd={qd} iops={iops:.0} mibps={:.1} seconds={secs:.2}",
        iops * bs as f64 / (1 << 20) as f64
    );
    Ok(())
}
