//! Stop signals of a training run: SIGINT (Ctrl-C) and SIGTERM (what schedulers and
//! `docker stop` send) raise a flag the loop checks between steps; a second signal exits at
//! once. The exit status of a stopped run says which signal stopped it — in a data-parallel
//! run, the signal any rank received.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

/// The signal another rank of a data-parallel run received when the ranks agreed to stop
/// (0: none).
static PEER_STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The signal that raised the stop flag (SIGINT or SIGTERM), 0 while none arrived.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOP_FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_stop_signal(sig: libc::c_int) {
    // Async-signal-safe only: atomics, write(2), _exit(2).
    if STOP_SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        unsafe { libc::_exit(128 + sig) };
    }
    if let Some(f) = STOP_FLAG.get() {
        f.store(true, Ordering::SeqCst);
    }
    let msg: &[u8] = if sig == libc::SIGTERM {
        b"\nSIGTERM: finishing this step and saving a resumable checkpoint (a second signal aborts)\n"
    } else {
        b"\ninterrupt: finishing this step and saving a resumable checkpoint (Ctrl-C again to abort)\n"
    };
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Installs the SIGINT / SIGTERM handler: the first signal raises the returned flag (the
/// loop then finishes its step, saves a resumable checkpoint and stops); a second one exits
/// at once with 128 + its number. [`stop_signal`] tells which signal it was.
pub fn install_ctrlc() -> Arc<AtomicBool> {
    let flag = STOP_FLAG.get_or_init(|| Arc::new(AtomicBool::new(false))).clone();
    let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        unsafe { libc::signal(sig, handler) };
    }
    flag
}

/// The signal that stopped the run (`libc::SIGINT` or `libc::SIGTERM`), if one did.
pub fn stop_signal() -> Option<i32> {
    Some(STOP_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// Records the signal another rank received (when this rank stops because the ranks agreed
/// to, without a signal of its own).
pub(crate) fn set_peer_stop_signal(sig: i32) {
    PEER_STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// The conventional exit status of a run stopped by the signal [`stop_signal`] reports
/// (130 for SIGINT, 143 for SIGTERM; in a data-parallel run, the signal any rank received;
/// 130 when the flag was raised otherwise).
pub fn stop_exit_code() -> i32 {
    let peer = Some(PEER_STOP_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0);
    128 + stop_signal().or(peer).unwrap_or(libc::SIGINT)
}
