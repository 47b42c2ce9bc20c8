//! Learning-rate schedules: the only code that computes a learning rate (the trainer sets
//! `AdamW::lr` from [`learning_rate`] before every step; configs only hold its parameters).
//!
//! Published (SPEC §7): the whole first epoch runs at `first_epoch_lr` (1e-5); at the end of
//! every epoch the rate is set to `lr × gamma^k`, k = number of milestones ≤ the epoch just
//! finished. So with milestones [2, 4, 8]: epoch 1 → 1e-5, epoch 2 → 2e-4, epochs 3–4 →
//! 2e-5, epochs 5–8 → 2e-6, epochs 9+ → 2e-7 (epochs are 1-based).
//! Options: linear warm-up over the first `warmup_steps` optimiser steps (multiplies either
//! schedule), and cosine decay from `lr` to `min_lr` over all steps after warm-up.

use crate::config::{OptimConfig, ScheduleKind};

/// Learning rate for optimiser step `step` (0-based, global) taken during `epoch` (1-based);
/// `total_steps` is the planned number of steps of the run (cosine only).
pub fn learning_rate(cfg: &OptimConfig, epoch: usize, step: u64, total_steps: u64) -> f32 {
    let scheduled = match cfg.schedule {
        ScheduleKind::Step => step_rate(cfg, epoch),
        ScheduleKind::Cosine => {
            let t = step.saturating_sub(cfg.warmup_steps) as f64;
            let span = total_steps.saturating_sub(cfg.warmup_steps).max(1) as f64;
            let c = 0.5 * (1.0 + (std::f64::consts::PI * (t / span).min(1.0)).cos());
            (cfg.min_lr as f64 + (cfg.lr - cfg.min_lr) as f64 * c) as f32
        }
    };
    if cfg.warmup_steps > 0 && step < cfg.warmup_steps {
        scheduled * (step + 1) as f32 / cfg.warmup_steps as f32
    } else {
        scheduled
    }
}

/// The published per-epoch step schedule.
pub fn step_rate(cfg: &OptimConfig, epoch: usize) -> f32 {
    if epoch <= 1 {
        if let Some(lr) = cfg.first_epoch_lr {
            return lr;
        }
    }
    let passed = cfg.milestones.iter().filter(|&&m| m < epoch).count();
    cfg.lr * cfg.gamma.powi(passed as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: ScheduleKind, milestones: &[usize]) -> OptimConfig {
        OptimConfig {
            lr: 2e-4,
            first_epoch_lr: Some(1e-5),
            betas: [0.9, 0.999],
            eps: 1e-6,
            weight_decay: 0.0,
            schedule,
            milestones: milestones.to_vec(),
            gamma: 0.1,
            warmup_steps: 0,
            min_lr: 0.0,
        }
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * b.abs().max(1e-12)
    }

    #[test]
    fn published_finetune_schedule_per_epoch() {
        let c = cfg(ScheduleKind::Step, &[2, 4, 8]);
        let want = [1e-5, 2e-4, 2e-5, 2e-5, 2e-6, 2e-6, 2e-6, 2e-6, 2e-7, 2e-7];
        for (e, w) in want.iter().enumerate() {
            let got = learning_rate(&c, e + 1, 1000 * e as u64, 10_000);
            assert!(close(got, *w), "epoch {}: {got} vs {w}", e + 1);
        }
    }

    #[test]
    fn published_pretrain_schedule_per_epoch() {
        let c = cfg(ScheduleKind::Step, &[30, 40]);
        for (epoch, w) in [(1, 1e-5), (2, 2e-4), (30, 2e-4), (31, 2e-5), (40, 2e-5), (41, 2e-6), (50, 2e-6)] {
            assert!(close(step_rate(&c, epoch), w), "epoch {epoch}");
        }
    }

    #[test]
    fn warmup_then_cosine() {
        let mut c = cfg(ScheduleKind::Cosine, &[]);
        c.warmup_steps = 10;
        c.min_lr = 1e-6;
        assert!(close(learning_rate(&c, 1, 0, 110), 2e-4 * 0.1));
        assert!(close(learning_rate(&c, 1, 9, 110), 2e-4));
        assert!(close(learning_rate(&c, 1, 10, 110), 2e-4));
        assert!(close(learning_rate(&c, 3, 60, 110), 1e-6 + (2e-4 - 1e-6) * 0.5));
        assert!(close(learning_rate(&c, 5, 110, 110), 1e-6));
        // Warm-up multiplies the step schedule too.
        let mut s = cfg(ScheduleKind::Step, &[2]);
        s.warmup_steps = 4;
        assert!(close(learning_rate(&s, 1, 1, 100), 1e-5 * 0.5));
    }
}
