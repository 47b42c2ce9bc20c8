//! The process's global allocator: the system allocator, with every large block advised
//! to live on transparent huge pages (Linux `madvise(MADV_HUGEPAGE)`, honoured where
//! `/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` or `always`).
//!
//! Why: a training step streams gigabytes through parameters, AdamW moments, activations
//! and packed GEMM panels; on 4 KiB pages that is one TLB entry per 1 024 floats. Small
//! allocations are left alone, and `DEMOVLP_HUGEPAGES=0` turns the advice off.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks from this size on are advised (smaller ones rarely span a whole 2 MiB page).
const MIN_BYTES: usize = 8 << 20;
const HUGE_PAGE: usize = 2 << 20;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Reads `DEMOVLP_HUGEPAGES` once (at start-up: the allocator itself must not allocate).
pub fn init() {
    ENABLED.store(std::env::var("DEMOVLP_HUGEPAGES").as_deref() != Ok("0"), Ordering::Relaxed);
}

pub struct HugePageAlloc;

fn advise(p: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    if size >= MIN_BYTES && !p.is_null() && ENABLED.load(Ordering::Relaxed) {
        let start = (p as usize).next_multiple_of(HUGE_PAGE);
        let end = (p as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside the block just allocated; the advice changes
            // no contents. A refusal (EINVAL on kernels without THP) is harmless and ignored.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

// SAFETY: every call is forwarded to `System` unchanged; `advise` only adds a hint.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}
