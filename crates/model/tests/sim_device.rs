//! The models on the simulated device (`backend::sim::SimDevice`): every kernel and whole
//! training runs give the CPU's bits (the device poisons every value a GPU would leave
//! unspecified with NaN, so a read of memory nobody wrote would show), a training step after
//! the first two allocates nothing (the second stages its batch in the other buffer of a
//! pair), and a step moves exactly the bytes written down here as a formula of the batch's
//! shape.

use demovlp_model::adamw::{AdamW, AdamWSettings};
use demovlp_model::backend::check::{self, tiny_config, CheckBatch};
use demovlp_model::backend::kernels_check::{compare_kernels_with_cpu, CASES};
use demovlp_model::backend::sim::{SimCounts, SimDevice};
use demovlp_model::backend::{Backend, Cpu};
use demovlp_model::qa::{QaHead, QaHeadConfig, QaModel};
use demovlp_model::{BatchRef, Model, TextDropout, TextKind};
use demovlp_retrieval::{LossConfig, LossOutputs};

/// Batch shape of the training runs: clips of F × R regions, captions of L tokens.
const B: usize = 3;
const F: usize = 2;
const R: usize = 3;
const L: usize = 10;
const STEPS: u64 = 4;
/// Values per region row: 2048 features + 6 box coordinates.
const ROW: usize = 2054;
const F32: u64 = 4;
/// A token id, a table row or a label passed to a kernel as a host value (`i64` / `usize`).
const INDEX: u64 = 8;

const SETTINGS: AdamWSettings = AdamWSettings { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01 };

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn host(sim: &SimDevice, b: &<SimDevice as Backend>::Buf) -> Vec<f32> {
    sim.to_host(SimDevice::view(b))
}

fn assert_same(what: &str, got: &[f32], want: &[f32]) {
    assert!(got.iter().all(|x| !x.is_nan()) || want.iter().any(|x| x.is_nan()), "{what}: NaN on the simulated device");
    assert_eq!(bits(got), bits(want), "{what} differs from the CPU's");
}

/// Distinct word ids other than [PAD] (0): the rows of the word table a step updates by row.
fn distinct_ids(ids: &[i64]) -> u64 {
    let mut d: Vec<i64> = ids.iter().copied().filter(|&i| i != 0).collect();
    d.sort_unstable();
    d.dedup();
    d.len() as u64
}

/// What one step moves; `ideal` is the batch's upload and the read-back of its scalars,
/// `extra` what the model and the trait move today on top (each term named).
struct Budget {
    h2d_ideal: u64,
    h2d_extra: u64,
    d2h_ideal: u64,
    d2h_extra: u64,
}

impl Budget {
    fn check(&self, step: u64, got: SimCounts) {
        assert_eq!(got.h2d_bytes, self.h2d_ideal + self.h2d_extra, "step {step}: bytes host→device");
        assert_eq!(got.d2h_bytes, self.d2h_ideal + self.d2h_extra, "step {step}: bytes device→host");
        assert_eq!(got.syncs, 1, "step {step}: one synchronisation (the losses' read-back)");
    }
}

/// A retrieval training step (`forward_backward` + `AdamW::step`, or `train_step_fused`).
fn retrieval_budget(ids: &[i64], use_local: bool, fused: bool) -> Budget {
    let (b, f, r, l) = (B as u64, F as u64, R as u64, L as u64);
    let nr = f * r;
    let h2d_ideal = b * nr * ROW as u64 * F32 // region features, once (forward; the backward reuses them)
        + b * l * INDEX // token ids
        + b * l * F32 // attention mask, as the text tower's additive mask
        + b * (1 + nr) * F32; // object mask, as the video tower's additive mask (CLS + regions)
    let rows = distinct_ids(ids);
    let h2d_extra = b * (l - 1) * F32 // the losses' word mask: the attention mask again, built on the host
        + b * l * INDEX // the token ids again: the embeddings' backward takes them as host values
        + if fused { 2 * rows * INDEX } else { 0 }; // the looked-up table rows, host values of the row-wise backward and of its AdamW update
    let d2h_ideal = 3 * F32; // loss_total, loss_global, loss_local
                             // LossOutputs carries the [B, B] similarity matrices (global, and local when on) to the host.
    let d2h_extra = b * b * F32 * if use_local { 2 } else { 1 };
    Budget { h2d_ideal, h2d_extra, d2h_ideal, d2h_extra }
}

/// A QA training step (`forward_backward_loss` + the two optimisers' steps).
fn qa_budget() -> Budget {
    let (b, f, r, l) = (B as u64, F as u64, R as u64, L as u64);
    let nr = f * r;
    let h2d_ideal = b * nr * ROW as u64 * F32 // region features, once
        + b * l * INDEX // token ids
        + b * l * F32 // attention mask (text tower, additive)
        + b * (1 + nr) * F32 // object mask (video tower, additive)
        + b * nr * F32 // object mask (the head's, multiplicative)
        + b * INDEX; // answer labels
    let h2d_extra = b * l * INDEX; // the token ids again: the embeddings' backward takes them as host values
    Budget { h2d_ideal, h2d_extra, d2h_ideal: F32, d2h_extra: 0 }
}

#[test]
fn every_kernel_is_the_cpus_bit_for_bit() {
    let verdicts = compare_kernels_with_cpu(&SimDevice::new(), 0.0);
    assert_eq!(verdicts.len(), CASES.len(), "one verdict per kernel");
    for v in &verdicts {
        assert!(v.ok, "{}: {} (max relative error {:e})", v.name, v.detail, v.max_rel_err);
    }
}

#[test]
fn the_backend_comparison_holds_at_tolerance_zero() {
    check::compare_with_cpu(SimDevice::new(), 0.0).unwrap();
}

#[test]
fn new_and_grown_memory_is_nan_and_zeros_are_zeros() {
    let sim = SimDevice::new();
    let mut b = sim.zeros(4);
    assert_eq!(host(&sim, &b), vec![0.0; 4]);
    sim.fit(&mut b, 7);
    let h = host(&sim, &b);
    assert_eq!(bits(&h[..4]), bits(&[0.0; 4]), "fit keeps the old values");
    assert!(h[4..].iter().all(|x| x.is_nan()), "fit's new values are NaN: {h:?}");
    sim.fit(&mut b, 2);
    sim.fit(&mut b, 5);
    assert!(host(&sim, &b)[2..].iter().all(|x| x.is_nan()), "regrown within the allocation: NaN again");
    let mut staged = <SimDevice as Backend>::Buf::default();
    let _ = sim.input(&[1.0, 2.0], &mut staged);
    let again = sim.to_host(sim.input_again(&[1.0, 2.0], &mut staged));
    assert_eq!(again, vec![1.0, 2.0]);
    let c = sim.snapshot();
    // zeros(4), the growth to 7, the staging buffer; the shrink and regrowth reuse.
    assert_eq!(c.allocations, 3);
    assert_eq!((c.h2d_bytes, c.d2h_bytes, c.syncs), (8, 4 * (4 + 7 + 5 + 2), 4));
    let clone = b.clone();
    assert_eq!(sim.snapshot().allocations, 4, "a clone is an allocation");
    drop(clone);
    sim.reset();
    assert_eq!(sim.snapshot(), SimCounts::default());
}

#[test]
#[should_panic(expected = "no longer holds")]
fn input_again_refuses_other_values() {
    let sim = SimDevice::new();
    let mut staged = <SimDevice as Backend>::Buf::default();
    let _ = sim.input(&[1.0, 2.0], &mut staged);
    let _ = sim.input_again(&[1.0, 3.0], &mut staged);
}

#[test]
fn batches_are_staged_in_turn_and_the_previous_batch_stays_intact() {
    // What lets a device upload batch s + 1 while batch s still computes: the upload goes
    // to the other buffer of the pair, and batch s's values stay where its kernels read them.
    use demovlp_model::backend::StagingPair;
    let sim = SimDevice::new();
    let mut pair = StagingPair::<SimDevice>::default();
    let _ = sim.input_batch(&[1.0, 2.0], &mut pair);
    let _ = sim.input_batch(&[3.0, 4.0], &mut pair);
    let again = sim.to_host(sim.input_batch_again(&[3.0, 4.0], &mut pair));
    assert_eq!(again, [3.0, 4.0]);
    let (now, before) = pair.split();
    assert_eq!((host(&sim, now), host(&sim, before)), (vec![3.0, 4.0], vec![1.0, 2.0]));
    let c = sim.snapshot();
    assert_eq!((c.h2d_bytes, c.allocations), (16, 2), "one upload per batch, one buffer each");
    let _ = sim.input_batch(&[5.0, 6.0], &mut pair);
    assert_eq!(host(&sim, pair.split().1), vec![3.0, 4.0], "the third batch reuses the first's buffer");
    assert_eq!(sim.snapshot().allocations, 2);
}

/// The tiny model of `kind`, initialised, text dropout on, on the CPU and (moved) on `sim`.
fn retrieval_pair(kind: TextKind, sim: &SimDevice) -> (Model, Model<SimDevice>) {
    let cfg = tiny_config(kind);
    let mut cpu = Model::new(cfg.clone());
    cpu.init_random(5);
    cpu.set_text_dropout(TextDropout::PUBLISHED, 11);
    let mut dev = Model::from_params_on(sim.clone(), cfg, cpu.params.to_backend(&Cpu, sim));
    dev.set_text_dropout(TextDropout::PUBLISHED, 11);
    (cpu, dev)
}

/// One training step: `train_step_fused`, or `forward_backward` then `AdamW::step`.
fn train_step<B: Backend>(m: &mut Model<B>, opt: &mut AdamW<B>, batch: &BatchRef, use_local: bool, fused: bool) -> LossOutputs {
    let loss = LossConfig::default();
    if fused {
        return m.train_step_fused(batch, &loss, use_local, opt);
    }
    let out = m.forward_backward(batch, &loss, use_local);
    opt.step(&mut m.params);
    out
}

fn retrieval_training(kind: TextKind, fused: bool, use_local: bool) {
    let sim = SimDevice::new();
    let (mut cpu, mut dev) = retrieval_pair(kind, &sim);
    let mut opt_cpu = AdamW::with_settings(cpu.params.len(), SETTINGS);
    let mut opt_dev = AdamW::new_on(sim.clone(), dev.params.len(), SETTINGS);
    for step in 0..STEPS {
        let data = CheckBatch::new(100 + step, B, F, R, L);
        let batch = data.as_ref();
        let want = train_step(&mut cpu, &mut opt_cpu, &batch, use_local, fused);
        let before = sim.snapshot();
        let got = train_step(&mut dev, &mut opt_dev, &batch, use_local, fused);
        let spent = sim.snapshot() - before;
        let what = |x: &str| format!("{kind:?} fused {fused} local {use_local} step {step}: {x}");
        assert_same(
            &what("losses"),
            &[got.loss_total, got.loss_global, got.loss_local],
            &[want.loss_total, want.loss_global, want.loss_local],
        );
        assert_same(&what("similarities"), &got.global_sim_text_video, &want.global_sim_text_video);
        match step {
            0 => assert!(spent.allocations > 0, "the first step fits the arenas"),
            // The second batch is staged in the other buffer of the pair (double buffering).
            1 => assert_eq!(spent.allocations, 1, "{}", what("the second staging buffer")),
            _ => assert_eq!(spent.allocations, 0, "{}", what("allocations after the first two steps")),
        }
        assert!(spent.launches > 0);
        retrieval_budget(&data.ids, use_local, fused).check(step, spent);
        if !fused {
            assert_same(&what("gradients"), &host(&sim, &dev.params.grad), &cpu.params.grad);
        }
        assert_same(&what("parameters"), &host(&sim, &dev.params.data), &cpu.params.data);
    }
    assert_same("first moments", &host(&sim, &opt_dev.m), &opt_cpu.m);
    assert_same("second moments", &host(&sim, &opt_dev.v), &opt_cpu.v);
}

#[test]
fn retrieval_training_unfused_matches_the_cpu_and_keeps_to_its_budget() {
    retrieval_training(TextKind::Distilbert, false, true);
    retrieval_training(TextKind::Bert, false, false);
}

#[test]
fn retrieval_training_fused_matches_the_cpu_and_keeps_to_its_budget() {
    retrieval_training(TextKind::Bert, true, true);
    retrieval_training(TextKind::Distilbert, true, false);
}

/// The tiny QA model (Distilbert towers, a head of 5 answers) on the CPU and on `sim`.
fn qa_pair(sim: &SimDevice) -> (QaModel, QaModel<SimDevice>, QaHeadConfig) {
    let (cpu_base, dev_base) = retrieval_pair(TextKind::Distilbert, sim);
    let head_cfg = QaHeadConfig { dim: cpu_base.config.proj_dim, hidden: 12, answers: 5 };
    let mut cpu_head = QaHead::new(head_cfg);
    cpu_head.init_random(7);
    let dev_head = QaHead::from_params_on(sim.clone(), head_cfg, cpu_head.params.to_backend(&Cpu, sim));
    (QaModel::new(cpu_base, cpu_head), QaModel::new(dev_base, dev_head), head_cfg)
}

#[test]
fn qa_training_matches_the_cpu_and_keeps_to_its_budget() {
    let sim = SimDevice::new();
    let (mut cpu, mut dev, head_cfg) = qa_pair(&sim);
    cpu.set_attention_dropout(true, 13);
    dev.set_attention_dropout(true, 13);
    let (nt, nh) = (cpu.base.params.len(), cpu.head.params.len());
    let (mut ot_cpu, mut oh_cpu) = (AdamW::with_settings(nt, SETTINGS), AdamW::with_settings(nh, SETTINGS));
    let (mut ot_dev, mut oh_dev) = (AdamW::new_on(sim.clone(), nt, SETTINGS), AdamW::new_on(sim.clone(), nh, SETTINGS));
    for step in 0..STEPS {
        let data = CheckBatch::new(200 + step, B, F, R, L);
        let batch = data.as_ref();
        let labels: Vec<usize> = (0..B).map(|i| (i + step as usize) % head_cfg.answers).collect();
        let want = cpu.forward_backward_loss(&batch, &labels);
        ot_cpu.step(&mut cpu.base.params);
        oh_cpu.step(&mut cpu.head.params);
        let before = sim.snapshot();
        let got = dev.forward_backward_loss(&batch, &labels);
        ot_dev.step(&mut dev.base.params);
        oh_dev.step(&mut dev.head.params);
        let spent = sim.snapshot() - before;
        assert_same(&format!("QA step {step}: loss"), &[got], &[want]);
        match step {
            0 => assert!(spent.allocations > 0, "the first step fits the arenas"),
            // The second batch's region features and object mask go to the other buffers of their pairs.
            1 => assert_eq!(spent.allocations, 2, "QA step 1: the second staging buffers"),
            _ => assert_eq!(spent.allocations, 0, "QA step {step}: allocations after the first two steps"),
        }
        qa_budget().check(step, spent);
        assert_same(&format!("QA step {step}: tower gradients"), &host(&sim, &dev.base.params.grad), &cpu.base.params.grad);
        assert_same(&format!("QA step {step}: head gradients"), &host(&sim, &dev.head.params.grad), &cpu.head.params.grad);
        assert_same(&format!("QA step {step}: tower parameters"), &host(&sim, &dev.base.params.data), &cpu.base.params.data);
        assert_same(&format!("QA step {step}: head parameters"), &host(&sim, &dev.head.params.data), &cpu.head.params.data);
    }
    assert_same("QA head moments", &host(&sim, &oh_dev.v), &oh_cpu.v);
    assert_same("QA tower moments", &host(&sim, &ot_dev.m), &ot_cpu.m);
    // `forward_backward` reads the logits back on top: [B, answers] values, one more sync.
    let data = CheckBatch::new(300, B, F, R, L);
    let labels = vec![0; B];
    let want = cpu.forward_backward(&data.as_ref(), &labels);
    let before = sim.snapshot();
    let got = dev.forward_backward(&data.as_ref(), &labels);
    let spent = sim.snapshot() - before;
    assert_same("QA logits", &got.logits, &want.logits);
    assert_eq!(spent.d2h_bytes, F32 + (B * head_cfg.answers) as u64 * F32);
    assert_eq!((spent.syncs, spent.allocations), (2, 0));
}

/// The `_late` steps (what the training loop runs): the step itself reads nothing back and
/// never synchronises; its losses come when the read is waited for (one synchronisation, the
/// two scalars), bit for bit the CPU's; the parameters are the CPU's after every step.
#[test]
fn late_steps_synchronise_only_when_their_losses_are_read() {
    for (kind, fused, use_local) in [(TextKind::Bert, true, true), (TextKind::Distilbert, false, false)] {
        let sim = SimDevice::new();
        let (mut cpu, mut dev) = retrieval_pair(kind, &sim);
        let mut opt_cpu = AdamW::with_settings(cpu.params.len(), SETTINGS);
        let mut opt_dev = AdamW::new_on(sim.clone(), dev.params.len(), SETTINGS);
        let loss = LossConfig::default();
        for step in 0..STEPS {
            let data = CheckBatch::new(100 + step, B, F, R, L);
            let batch = data.as_ref();
            let want = train_step(&mut cpu, &mut opt_cpu, &batch, use_local, fused);
            let before = sim.snapshot();
            let (read, at_read) = if fused {
                let r = dev.train_step_fused_late(&batch, &loss, use_local, &mut opt_dev);
                (r, sim.snapshot().launches)
            } else {
                let r = dev.forward_backward_late(&batch, &loss, use_local);
                let at_read = sim.snapshot().launches;
                // The optimiser's kernels are queued behind the read; it does not wait for them.
                opt_dev.step(&mut dev.params);
                (r, at_read)
            };
            let queued = sim.snapshot() - before;
            let at_wait = sim.snapshot().launches;
            let what = format!("{kind:?} fused {fused} step {step}");
            assert_eq!((queued.syncs, queued.d2h_bytes), (0, 0), "{what}: the step reads nothing back");
            let budget = retrieval_budget(&data.ids, use_local, fused);
            assert_eq!(queued.h2d_bytes, budget.h2d_ideal + budget.h2d_extra, "{what}: bytes host→device");
            if step > 1 {
                assert_eq!(queued.allocations, 0, "{what}: allocations");
            }
            let got = read.wait();
            assert_eq!(sim.late_reads().last(), Some(&(at_read, at_wait)), "{what}: when the read was queued and waited for");
            let waited = sim.snapshot() - before;
            assert_eq!((waited.syncs, waited.d2h_bytes), (1, 2 * F32), "{what}: one read of the two scalars");
            assert_same(
                &format!("{what}: losses"),
                &[got[0] + got[1], got[0], got[1]],
                &[want.loss_total, want.loss_global, want.loss_local],
            );
            assert_same(&format!("{what}: parameters"), &host(&sim, &dev.params.data), &cpu.params.data);
        }
        assert_eq!(sim.late_reads().len(), STEPS as usize);
    }
    // QA: the loss alone.
    let sim = SimDevice::new();
    let (mut cpu, mut dev, head_cfg) = qa_pair(&sim);
    for step in 0..2 {
        let data = CheckBatch::new(200 + step, B, F, R, L);
        let labels: Vec<usize> = (0..B).map(|i| (i + step as usize) % head_cfg.answers).collect();
        let want = cpu.forward_backward_loss(&data.as_ref(), &labels);
        let before = sim.snapshot();
        let read = dev.forward_backward_late(&data.as_ref(), &labels);
        let queued = sim.snapshot() - before;
        assert_eq!((queued.syncs, queued.d2h_bytes), (0, 0), "QA step {step}: the step reads nothing back");
        assert_eq!(queued.h2d_bytes, qa_budget().h2d_ideal + qa_budget().h2d_extra, "QA step {step}: bytes host→device");
        assert_same(&format!("QA step {step}: loss"), &read.wait(), &[want]);
        assert_eq!(sim.snapshot() - before - queued, SimCounts { d2h_bytes: F32, syncs: 1, ..Default::default() });
        assert_same(&format!("QA step {step}: tower gradients"), &host(&sim, &dev.base.params.grad), &cpu.base.params.grad);
    }
}
