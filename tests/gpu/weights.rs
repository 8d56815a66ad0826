//! The checkpoint on the GPU: every tensor of a synthetic checkpoint (real layout, both key
//! spellings, f32 adapters that must be converted) arrives bit for bit as the host's bf16.

use crate::harness::{e, Ctx};
use jv4::model::checkpoint::Checkpoint;
use jv4::model::synth::{write_checkpoint, Preset, SynthSpec};
use jv4::model::weights::DeviceWeights;
use jv4::model::Dtype;

pub fn weights_upload_round_trip(ctx: &mut Ctx) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(e)?;
    let seed = ctx.rng.next_u64();
    write_checkpoint(dir.path(), &SynthSpec { seed, preset: Preset::Tiny, adapter_dtype: Dtype::F32 })
        .map_err(e)?;
    let ckpt = Checkpoint::open(dir.path()).map_err(e)?;
    let (weights, report) = DeviceWeights::upload(&ctx.gpu, &ckpt).map_err(e)?;
    if report.tensors != ckpt.tensors().len() || report.converted == 0 {
        return Err(format!("report {report:?} for {} tensors with f32 adapters", ckpt.tensors().len()));
    }
    for t in ckpt.tensors() {
        let view = weights.get(&t.name).ok_or_else(|| format!("{} missing on the device", t.name))?;
        if view.shape() != t.shape.as_slice() {
            return Err(format!("{}: device shape {:?}, checkpoint {:?}", t.name, view.shape(), t.shape));
        }
        let back = ctx.gpu.download(&view).map_err(e)?;
        let want = ckpt.to_bf16(t).map_err(e)?;
        if let Some(i) = back.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(format!(
                "{}: element {i} is {} on the device, {} on the host",
                t.name, back[i], want[i]
            ));
        }
    }
    println!(
        "  {} tensors, {} bytes, {} converted, {:.3} s",
        report.tensors, report.bytes, report.converted, report.seconds
    );
    Ok(())
}
