//! Ctrl-C and SIGTERM for long tasks: the handler only sets a flag, and the
//! task checks it between steps and returns an error, so its guards
//! (namespaces, cgroups, daemons) clean up on the way out.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM end the task between steps, so the guards clean up.
pub fn catch_interrupts() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }.context("installing a signal handler")?;
    }
    Ok(())
}

/// An error once Ctrl-C or SIGTERM has come.
pub fn interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}
