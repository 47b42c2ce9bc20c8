//! Runtime instruction-set dispatch for the elementwise kernels.
//!
//! The crate is built for the baseline x86-64 (SSE2), so that one binary runs everywhere;
//! the compiler then vectorises loops four lanes wide. [`multiversion!`] compiles a kernel's
//! plain scalar Rust a second and third time with AVX-512 or AVX2 enabled and picks the
//! widest the CPU has at run time. Results are bit-identical across the versions: Rust
//! never contracts `a * b + c` into an FMA or reorders float operations, so each lane does
//! exactly the scalar arithmetic (the tests check this on the machine they run on).

use std::sync::atomic::{AtomicU8, Ordering};

/// Widest instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Baseline = 1,
    Avx2 = 2,
    Avx512 = 3,
}

/// 0 = not yet detected; else `Level as u8`.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The level the kernels run at: detected once (or set by [`set_level`]).
#[inline]
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        3 => Level::Avx512,
        2 => Level::Avx2,
        1 => Level::Baseline,
        _ => {
            let l = detect();
            LEVEL.store(l as u8, Ordering::Relaxed);
            l
        }
    }
}

/// Forces a level (clamped to what the CPU has): tests compare the versions, and
/// `DEMOVLP_SIMD=baseline` does the same for a whole run.
pub fn set_level(l: Level) {
    LEVEL.store((l as u8).min(detect() as u8), Ordering::Relaxed);
}

fn detect() -> Level {
    if std::env::var("DEMOVLP_SIMD").as_deref() == Ok("baseline") {
        return Level::Baseline;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// Defines `fn name(args)` whose body is compiled for the baseline, AVX2 and AVX-512 and
/// dispatched on [`level`] at each call (one relaxed atomic load): call it per chunk or
/// per row, not per element. The body must be plain safe Rust over its arguments.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match $crate::simd::level() {
                    // SAFETY: `level` reports only instruction sets this CPU has.
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Level::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}
