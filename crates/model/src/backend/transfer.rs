//! Host↔device transfers that overlap the device's work:
//!
//! - [`LateRead`], what [`super::Backend::read_late`] returns: a device→host copy queued
//!   behind the work queued so far, waited for only when the host needs the values. A
//!   training step's loss scalars are read this way after the next step has been queued,
//!   so the device never idles while the host waits for a step to finish.
//! - [`StagingPair`], the two device buffers consecutive batches are uploaded into in turn
//!   ([`super::Backend::input_batch`]): a batch's upload may run while the previous batch's
//!   work, which reads the other buffer, still runs.

use super::Backend;
use std::fmt;

/// Values being read back from a device: [`LateRead::wait`] blocks until they are on the
/// host (at once on the CPU, whose values are already there). Dropping it unread is allowed.
pub struct LateRead(Late);

enum Late {
    Ready(Vec<f32>),
    Pending(Box<dyn FnOnce() -> Vec<f32> + Send>),
}

impl LateRead {
    /// Values already on the host.
    pub fn ready(values: Vec<f32>) -> LateRead {
        LateRead(Late::Ready(values))
    }

    /// Values `wait` fetches when called (it waits for the device).
    pub fn pending(wait: impl FnOnce() -> Vec<f32> + Send + 'static) -> LateRead {
        LateRead(Late::Pending(Box::new(wait)))
    }

    /// The values (waits for the device when they are not on the host yet).
    pub fn wait(self) -> Vec<f32> {
        match self.0 {
            Late::Ready(v) => v,
            Late::Pending(f) => f(),
        }
    }
}

impl fmt::Debug for LateRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Late::Ready(v) => write!(f, "LateRead(ready, {} values)", v.len()),
            Late::Pending(_) => write!(f, "LateRead(pending)"),
        }
    }
}

/// Two staging buffers that consecutive batches use in turn (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct StagingPair<B: Backend> {
    bufs: [B::Buf; 2],
    /// The buffer of the batch staged last.
    current: usize,
}

impl<B: Backend> StagingPair<B> {
    /// Moves on to the other buffer (a new batch): returns it, and the previous batch's.
    pub fn advance(&mut self) -> (&mut B::Buf, &mut B::Buf) {
        self.current ^= 1;
        self.split()
    }

    /// The buffer of the batch staged last, and the other one.
    pub fn split(&mut self) -> (&mut B::Buf, &mut B::Buf) {
        let [a, b] = &mut self.bufs;
        if self.current == 0 {
            (a, b)
        } else {
            (b, a)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_read_runs_only_when_waited_for() {
        let hit = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = hit.clone();
        let r = LateRead::pending(move || {
            h.store(true, std::sync::atomic::Ordering::SeqCst);
            vec![1.0, 2.0]
        });
        assert!(!hit.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(r.wait(), [1.0, 2.0]);
        assert!(hit.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(LateRead::ready(vec![3.0]).wait(), [3.0]);
    }

    #[test]
    fn a_staging_pair_alternates() {
        let mut p = StagingPair::<crate::Cpu>::default();
        p.advance().0.push(1.0);
        p.advance().0.push(2.0);
        assert_eq!(p.split(), (&mut vec![2.0], &mut vec![1.0]));
        assert_eq!(p.advance(), (&mut vec![1.0], &mut vec![2.0]));
    }
}
