//! Which weights have a current bf16 copy on the device (the bf16 speed mode's GEMM inputs):
//! the bookkeeping, pure Rust, so it is tested on any machine.
//!
//! A weight (the `w` of a linear layer) is converted to bf16 at its first GEMM and the copy
//! reused by every later GEMM until the weight's memory may have changed. Device memory is
//! written only through mutable views and `&mut` buffer methods (AdamW's update, loads, host
//! writes): the backend marks the copies in a mutable view's range stale when the view is
//! dropped (after everything written through it is queued), those of a buffer on `fit` /
//! `modify_host`, and drops them when that memory is freed or reallocated. AdamW updates the
//! weights block by block through narrow views, so a weight is converted once per optimiser
//! step instead of once per GEMM (forward, input gradient, recomputation).

/// One cached copy: the f32 matrix it mirrors (`rows` runs of `cols` values, `ld` apart, at
/// device address `ptr`) and the bf16 copy (`slot`, `bytes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub ptr: u64,
    pub ld: usize,
    pub rows: usize,
    pub cols: usize,
    pub slot: u64,
    pub bytes: usize,
    pub fresh: bool,
}

impl Entry {
    /// The f32 bytes [start, end) the copy mirrors.
    fn range(&self) -> (u64, u64) {
        let elems = if self.rows == 0 { 0 } else { (self.rows - 1) * self.ld + self.cols };
        (self.ptr, self.ptr + 4 * elems as u64)
    }
    fn overlaps(&self, lo: u64, hi: u64) -> bool {
        let (a, b) = self.range();
        a < hi && lo < b
    }
}

/// What [`Bf16Weights::lookup`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A current copy at this device address.
    Fresh(u64),
    /// A copy whose memory may be reused: convert into it (the slot, its bytes), then
    /// [`Bf16Weights::mark_fresh`].
    Stale(u64, usize),
    Missing,
}

/// The cached bf16 copies.
#[derive(Debug, Default)]
pub struct Bf16Weights {
    entries: Vec<Entry>,
    /// Conversions done (first use or after a change): the figure the GPU check reports.
    pub conversions: u64,
    /// GEMMs that reused a current copy.
    pub hits: u64,
}

impl Bf16Weights {
    pub fn lookup(&mut self, ptr: u64, ld: usize, rows: usize, cols: usize) -> Lookup {
        match self.entries.iter().find(|e| e.ptr == ptr && e.ld == ld && e.rows == rows && e.cols == cols) {
            Some(e) if e.fresh => {
                self.hits += 1;
                Lookup::Fresh(e.slot)
            }
            Some(e) => Lookup::Stale(e.slot, e.bytes),
            None => Lookup::Missing,
        }
    }

    /// After converting into a stale entry's slot (or a new one, `insert`).
    pub fn mark_fresh(&mut self, ptr: u64, ld: usize, rows: usize, cols: usize) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.ptr == ptr && e.ld == ld && e.rows == rows && e.cols == cols) {
            e.fresh = true;
            self.conversions += 1;
        }
    }

    /// A new copy, current.
    pub fn insert(&mut self, ptr: u64, ld: usize, rows: usize, cols: usize, slot: u64, bytes: usize) {
        self.entries.push(Entry { ptr, ld, rows, cols, slot, bytes, fresh: true });
        self.conversions += 1;
    }

    /// The f32 bytes [lo, hi) may be written: their copies are stale.
    pub fn invalidate(&mut self, lo: u64, hi: u64) {
        for e in self.entries.iter_mut().filter(|e| e.overlaps(lo, hi)) {
            e.fresh = false;
        }
    }

    /// The f32 bytes [lo, hi) are freed: their copies go; returns their slots to free.
    pub fn remove(&mut self, lo: u64, hi: u64) -> Vec<(u64, usize)> {
        let mut freed = Vec::new();
        self.entries.retain(|e| {
            let gone = e.overlaps(lo, hi);
            if gone {
                freed.push((e.slot, e.bytes));
            }
            !gone
        });
        freed
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::{Bf16Weights, Lookup};

    #[test]
    fn a_weight_is_converted_once_per_change() {
        let mut c = Bf16Weights::default();
        // Two weights inside one parameter buffer at 0x1000: [4, 8] and [3, 8] (ld 8).
        let (w1, w2) = (0x1000u64, 0x1000 + 4 * 32);
        assert_eq!(c.lookup(w1, 8, 4, 8), Lookup::Missing);
        c.insert(w1, 8, 4, 8, 0x9000, 64);
        c.insert(w2, 8, 3, 8, 0xa000, 48);
        for _ in 0..3 {
            assert_eq!(c.lookup(w1, 8, 4, 8), Lookup::Fresh(0x9000));
        }
        // Another view of the same memory (a different shape) is another copy.
        assert_eq!(c.lookup(w1, 8, 2, 8), Lookup::Missing);
        // A write to the second weight's memory (AdamW on its range) leaves the first current.
        c.invalidate(w2 + 8, w2 + 12);
        assert_eq!(c.lookup(w1, 8, 4, 8), Lookup::Fresh(0x9000));
        assert_eq!(c.lookup(w2, 8, 3, 8), Lookup::Stale(0xa000, 48));
        c.mark_fresh(w2, 8, 3, 8);
        assert_eq!(c.lookup(w2, 8, 3, 8), Lookup::Fresh(0xa000));
        // Adjacent memory does not overlap: [w1, w2) is exactly the first weight.
        c.invalidate(w2 + 3 * 32, w2 + 4 * 32);
        assert_eq!(c.lookup(w2, 8, 3, 8), Lookup::Fresh(0xa000));
        c.invalidate(w1, w2);
        assert_eq!(c.lookup(w1, 8, 4, 8), Lookup::Stale(0x9000, 64));
        assert_eq!(c.lookup(w2, 8, 3, 8), Lookup::Fresh(0xa000));
        assert_eq!((c.conversions, c.hits), (3, 7));
        // Freed memory: the copies go, their slots are returned.
        assert_eq!(c.remove(0x1000, 0x1000 + 4 * 56), vec![(0x9000, 64), (0xa000, 48)]);
        assert!(c.is_empty());
    }

    #[test]
    fn a_strided_weight_block_covers_only_its_rows() {
        // A [2, 4] block of a matrix with rows 16 apart: 4·(16 + 4) bytes from its start.
        let mut c = Bf16Weights::default();
        c.insert(0x100, 16, 2, 4, 0x900, 16);
        c.invalidate(0x100 + 4 * 20, 0x100 + 4 * 30);
        assert_eq!(c.lookup(0x100, 16, 2, 4), Lookup::Fresh(0x900));
        c.invalidate(0x100 + 4 * 19, 0x100 + 4 * 20);
        assert!(matches!(c.lookup(0x100, 16, 2, 4), Lookup::Stale(..)));
    }
}
