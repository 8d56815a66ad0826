//! The paged allocator on a real GPU: data round-trips through mapped pages, forward-sized
//! cycles reuse pages without growing, and the budget gives a typed out-of-memory.

use half::bf16;

use crate::harness::{e, Ctx};
use jv4::cuda::{DTensor, DeviceAllocator, DEFAULT_PAGE_SIZE};
use jv4::{ops, Error};

pub fn alloc_round_trip(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = DeviceAllocator::new(&ctx.gpu, 1 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    // Several blocks, odd sizes, written and read back: each must hold its own data.
    let sizes = [1usize, 1000, (3 << 20) + 17, 5 << 20];
    let mut blocks = Vec::new();
    for &n in &sizes {
        let data: Vec<bf16> = (0..n).map(|_| bf16::from_f32(ctx.rng.normal())).collect();
        let mut t = DTensor::<bf16>::from_block(mem.alloc((n * 2) as u64).map_err(e)?, &[n]);
        ctx.gpu.upload(&mut t.view_mut(), &data).map_err(e)?;
        blocks.push((t, data));
    }
    for (t, data) in &blocks {
        let back = ctx.gpu.download(&t.view()).map_err(e)?;
        if back.iter().zip(data).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(format!("block of {} elements did not round-trip", data.len()));
        }
    }
    for (t, _) in blocks {
        mem.free(t.into_block());
    }
    let s = mem.stats();
    if s.in_use != 0 || s.live_allocations != 0 {
        return Err(format!("after freeing everything: {s:?}"));
    }
    Ok(())
}

pub fn alloc_no_growth_over_100_cycles(ctx: &mut Ctx) -> Result<(), String> {
    // One "forward" of a 4096-token batch through a few decoder-like steps: the hidden state
    // lives through the forward, MLP temporaries are taken and given back per layer, and a real
    // kernel writes into them so that mapping errors would fault.
    let tokens = 4096;
    let (hidden, inter) = (2048, 11008);
    let mut mem = DeviceAllocator::new(&ctx.gpu, 4 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    let mut after_first = None;
    for cycle in 0..100 {
        let h = mem.alloc((tokens * hidden * 2) as u64).map_err(e)?;
        for _layer in 0..3 {
            let mut gu = DTensor::<bf16>::from_block(
                mem.alloc((tokens * 2 * inter * 2) as u64).map_err(e)?,
                &[tokens, 2 * inter],
            );
            let mut act = DTensor::<bf16>::from_block(
                mem.alloc((tokens * inter * 2) as u64).map_err(e)?,
                &[tokens, inter],
            );
            ctx.gpu.fill_u16(&mut gu.view_mut(), 0x3F80).map_err(e)?; // 1.0
            ops::swiglu(&ctx.gpu, &gu.view(), &mut act.view_mut()).map_err(e)?;
            mem.free(gu.into_block());
            mem.free(act.into_block());
        }
        mem.free(h);
        ctx.gpu.sync().map_err(e)?;
        let s = mem.stats();
        if s.in_use != 0 {
            return Err(format!("cycle {cycle}: {} bytes still in use", s.in_use));
        }
        match after_first {
            None => after_first = Some(s),
            Some(first) if s.mapped != first.mapped || s.grow_events != first.grow_events => {
                return Err(format!("cycle {cycle} grew the mapping: first {first:?}, now {s:?}"));
            }
            _ => {}
        }
    }
    let s = after_first.unwrap();
    println!(
        "  mapped {} MiB in {} growth events, peak {} MiB, page {} KiB",
        s.mapped >> 20,
        s.grow_events,
        s.peak >> 20,
        s.page_size >> 10
    );
    Ok(())
}

pub fn alloc_budget_gives_typed_oom(ctx: &mut Ctx) -> Result<(), String> {
    let budget = 64u64 << 20;
    let mut mem = DeviceAllocator::new(&ctx.gpu, budget, DEFAULT_PAGE_SIZE).map_err(e)?;
    let a = mem.alloc(48 << 20).map_err(e)?;
    match mem.alloc(32 << 20) {
        Err(Error::OutOfMemory { requested, in_use, budget: b }) => {
            if requested != 32 << 20 || in_use != 48 << 20 || b != budget {
                return Err(format!("OOM fields wrong: {requested} {in_use} {b}"));
            }
        }
        other => return Err(format!("expected OutOfMemory within the budget, got {other:?}")),
    }
    mem.free(a);
    let all = mem.alloc(budget).map_err(|err| format!("the whole budget after a free: {err}"))?;
    mem.free(all);

    // A budget larger than the card: the driver's refusal must also come back as OutOfMemory.
    let total = ctx.gpu.info().total_mem;
    let mut big = DeviceAllocator::new(&ctx.gpu, 2 * total, DEFAULT_PAGE_SIZE).map_err(e)?;
    match big.alloc(total + (1 << 30)) {
        Err(Error::OutOfMemory { .. }) => Ok(()),
        Ok(_) => Err("allocating more than the card holds succeeded".into()),
        Err(other) => Err(format!("expected OutOfMemory from the driver, got {other}")),
    }
}
