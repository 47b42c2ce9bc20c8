//! The detector on a device backend: the simulated device of `demovlp_model` (buffers reachable
//! only through transfers, NaN wherever a GPU's memory would be unspecified, the CPU's kernels)
//! must give the CPU's results bit for bit on the fixture's frames. A host step that read a
//! device buffer without a transfer, or a kernel output read before it was written, would
//! show here as NaN or as a difference.

use demovlp_extract::{load_weights, Detector, DetectorConfig, Frame, Trace};
use demovlp_model::backend::sim::SimDevice;
use demovlp_model::Cpu;
use demovlp_testutil::{testdata, Fixture};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn box_bits(v: &[[f32; 4]]) -> Vec<u32> {
    v.iter().flatten().map(|x| x.to_bits()).collect()
}

fn same(a: &Trace, b: &Trace, what: &str) {
    assert_eq!(a.res4_hw, b.res4_hw, "{what}: res4 size");
    assert!(a.res4.iter().all(|v| v.is_finite()), "{what}: res4 not finite on the CPU");
    assert_eq!(bits(&a.res4), bits(&b.res4), "{what}: res4");
    assert_eq!(bits(&a.proposals.fg_prob), bits(&b.proposals.fg_prob), "{what}: RPN probabilities");
    assert_eq!(a.proposals.nms_keep, b.proposals.nms_keep, "{what}: RPN NMS");
    assert_eq!(box_bits(&a.proposals.boxes), box_bits(&b.proposals.boxes), "{what}: proposals");
    assert_eq!(bits(&a.x), bits(&b.x), "{what}: features");
    assert_eq!(bits(&a.cls_prob), bits(&b.cls_prob), "{what}: class probabilities");
    assert_eq!(bits(&a.attr_prob), bits(&b.attr_prob), "{what}: attribute probabilities");
    assert_eq!(a.selected, b.selected, "{what}: selection");
    let (ra, rb) = (&a.regions, &b.regions);
    assert_eq!(box_bits(&ra.bbox), box_bits(&rb.bbox), "{what}: boxes");
    assert_eq!((&ra.objects_id, &ra.attrs_id), (&rb.objects_id, &rb.attrs_id), "{what}: ids");
    assert_eq!(bits(&ra.objects_conf), bits(&rb.objects_conf), "{what}: object confidences");
    assert_eq!(bits(&ra.attrs_conf), bits(&rb.attrs_conf), "{what}: attribute confidences");
}

#[test]
fn detector_on_a_simulated_device_matches_the_cpu_bit_for_bit() {
    let f = Fixture::load("extract/extract_tiny.safetensors");
    let w = load_weights(&testdata("extract/bua_tiny.pth")).unwrap();
    let cpu = Detector::new(Cpu, &w, DetectorConfig::default());
    let dev = SimDevice::new();
    // Small RoI chunks: several res5 passes per frame, and the last one partial.
    let cfg = DetectorConfig { roi_chunk: 7, ..Default::default() };
    let sim = Detector::new(dev.clone(), &w, cfg);
    let weights_up = dev.snapshot();
    assert!(weights_up.h2d_bytes > 0 && weights_up.d2h_bytes == 0, "{weights_up:?}");
    for i in [0, 2] {
        let name = format!("frame{i}.image_bgr");
        let shape = &f.u8s[&name].0;
        let frame = Frame { h: shape[0], w: shape[1], bgr: f.u8(&name).to_vec() };
        let before = dev.snapshot();
        let (a, b) = (cpu.trace(&frame), sim.trace(&frame));
        same(&a, &b, &format!("frame {i}"));
        assert!(!a.regions.is_empty(), "frame {i}: no regions");
        // The frame went up and its results came back through the device's transfers.
        let moved = dev.snapshot() - before;
        assert!(moved.h2d_bytes >= (4 * a.blob.data.len()) as u64, "frame {i}: {moved:?}");
        assert!(moved.d2h_bytes >= (4 * (a.res4.len() + a.x.len())) as u64, "frame {i}: {moved:?}");
        // The layers (hundreds of kernel launches) take their buffers from the detector's
        // pool: a handful of allocations per frame (6 for the heads, a few for the pool to
        // grow), not one per layer; the same frame again gives the same bits.
        let before = dev.snapshot();
        same(&a, &sim.trace(&frame), &format!("frame {i} again"));
        let again = dev.snapshot() - before;
        assert!(moved.launches > 300, "{moved:?}");
        assert!(moved.allocations <= 12 && again.allocations <= 8, "frame {i}: {moved:?} then {again:?}");
    }
}
