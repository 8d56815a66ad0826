//! The paged allocator on a real GPU: data round-trips through mapped pages, forward-sized
//! cycles reuse pages without growing, and the budget gives a typed out-of-memory; arenas give
//! every block back when they drop (nested ones first), and staged uploads land intact even when
//! the pinned buffer is reused straight away.

use half::bf16;

use crate::harness::{e, Ctx};
use jv4::cuda::{BufferLayout, DTensor, DeviceAllocator, DEFAULT_PAGE_SIZE};
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

pub fn arena_gives_every_block_back(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = DeviceAllocator::new(&ctx.gpu, 1 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    let mut after_first = None;
    for cycle in 0..50 {
        let n = (3 << 20) + 17 + cycle;
        let data: Vec<bf16> = (0..n).map(|_| bf16::from_f32(ctx.rng.normal())).collect();
        {
            let arena = mem.arena();
            let mut a = arena.alloc::<bf16>(&[n]).map_err(e)?;
            ctx.gpu.upload(&mut a.view_mut(), &data).map_err(e)?;
            let outer = arena.stats().in_use;
            {
                // An inner arena (the vision tower's): its blocks go back when it drops.
                let inner = arena.nested();
                let mut b = inner.alloc::<bf16>(&[2 * n, 2]).map_err(e)?;
                ctx.gpu.fill_u16(&mut b.view_mut(), 0x7FC0).map_err(e)?;
                let _c = inner.alloc::<f32>(&[n]).map_err(e)?;
                let s = arena.stats();
                if s.in_use <= outer || s.live_allocations != 3 {
                    return Err(format!("inner arena not counted: {s:?}"));
                }
            }
            let s = arena.stats();
            if s.in_use != outer || s.live_allocations != 1 {
                return Err(format!("after the inner arena dropped: {s:?}, outer {outer}"));
            }
            // The outer tensor kept its data while the inner blocks came and went.
            let back = ctx.gpu.download(&a.view()).map_err(e)?;
            if back.iter().zip(&data).any(|(x, y)| x.to_bits() != y.to_bits()) {
                return Err(format!("cycle {cycle}: the outer tensor changed"));
            }
        }
        let s = mem.stats();
        if s.in_use != 0 || s.live_allocations != 0 {
            return Err(format!("cycle {cycle}: after the arena dropped: {s:?}"));
        }
        match after_first {
            None => after_first = Some(s),
            Some(first) if s.mapped != first.mapped => {
                return Err(format!("cycle {cycle} grew the mapping: first {first:?}, now {s:?}"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Downloads `view` and compares it with `host` element by element.
fn same<T: Copy + Default + PartialEq + std::fmt::Debug>(
    ctx: &Ctx,
    what: &str,
    view: &jv4::cuda::DView<'_, T>,
    host: &[T],
) -> Result<(), String> {
    let back = ctx.gpu.download(view).map_err(e)?;
    match back.iter().zip(host).position(|(a, b)| a != b) {
        _ if back.len() != host.len() => {
            Err(format!("{what}: {} elements back, {} sent", back.len(), host.len()))
        }
        Some(i) => Err(format!("{what}: element {i} is {:?} on the device, {:?} sent", back[i], host[i])),
        None => Ok(()),
    }
}

pub fn arena_upload_stages_in_one_copy(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = DeviceAllocator::new(&ctx.gpu, 2 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    let arena = mem.arena();
    // Uploads back to back, the first large: each reuses the pinned buffer at once, so it must
    // wait for the previous copy to have read it (the guard event) or that one lands wrong.
    struct Round {
        ids: Vec<u32>,
        pos: Vec<i32>,
        task: Vec<u8>,
        angles: Vec<f32>,
        pix: Vec<bf16>,
    }
    // All host data first, so that each upload writes the pinned buffer right after the previous
    // copy was enqueued (a missing guard would then overwrite data still being copied).
    let rounds: Vec<Round> = [24usize << 20, 1000, 5 << 20, 40 << 20]
        .into_iter()
        .map(|big| {
            let tokens = 1 + ctx.rng.below(3000);
            Round {
                ids: (0..tokens).map(|_| ctx.rng.next_u64() as u32).collect(),
                pos: (0..3 * tokens).map(|_| ctx.rng.next_u64() as i32).collect(),
                task: (0..tokens).map(|_| ctx.rng.below(3) as u8).collect(),
                angles: (0..big / 4).map(|_| ctx.rng.normal()).collect(),
                pix: (0..big / 2 + 3).map(|_| bf16::from_f32(ctx.rng.normal())).collect(),
            }
        })
        .collect();
    let mut staged = Vec::new();
    for r in &rounds {
        let tokens = r.ids.len();
        let mut lay = BufferLayout::new(256);
        let ids = lay.push::<u32>(&[tokens]);
        let pos = lay.push::<i32>(&[3, tokens]);
        let task = lay.push::<u8>(&[tokens]);
        let angles = lay.push::<f32>(&[r.angles.len()]);
        let pix = lay.push::<bf16>(&[r.pix.len()]);
        let st = arena
            .upload(&ctx.gpu, &lay, |w| {
                w.put(&ids, &r.ids)?;
                w.slice(&pos).copy_from_slice(&r.pos);
                w.put(&task, &r.task)?;
                w.put(&angles, &r.angles)?;
                w.put(&pix, &r.pix)
            })
            .map_err(e)?;
        staged.push((st, (ids, pos, task, angles, pix), r));
    }
    let (_, (ids, ..), r) = &staged[0];
    if arena.upload(&ctx.gpu, &BufferLayout::new(256), |w| w.put(ids, &r.ids[1..])).is_ok() {
        return Err("a short host slice was staged without an error".into());
    }
    for (k, (st, (ids, pos, task, angles, pix), r)) in staged.iter().enumerate() {
        same(ctx, &format!("round {k} ids"), &st.view(ids), &r.ids)?;
        same(ctx, &format!("round {k} positions"), &st.view(pos), &r.pos)?;
        same(ctx, &format!("round {k} tasks"), &st.view(task), &r.task)?;
        same(ctx, &format!("round {k} angles"), &st.view(angles), &r.angles)?;
        same(ctx, &format!("round {k} pixels"), &st.view(pix), &r.pix)?;
    }
    Ok(())
}
