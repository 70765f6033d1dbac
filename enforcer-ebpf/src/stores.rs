//! Values built so the compiler emits no `memset`.
//!
//! bpf-linker expands `memcpy` in order but leaves every `memset` a call to
//! compiler-builtins' byte loop, and the verifier refuses that loop's
//! variable-offset pointer arithmetic unless the loader holds CAP_PERFMON.
//! The optimizer turns any run of constant zero stores (an array literal, a
//! `Default`, a struct with two zero fields) into such a `memset`, so zeros
//! stored next to each other here come from an opaque value it cannot fold.
//! A unit test of the daemon fails on any `memset` call left in the object.
//! Addresses avoid the problem as whole words (`enforcer_common::AddrWords`).

use enforcer_common::{AddrWords, BlockCounters};

/// Zero, read at run time so the optimizer cannot fold it. A read-only
/// global, not a local: a narrow store of a local can land on a stack slot
/// that held a spilled pointer on another path, which kernels before 7.x
/// refuse without CAP_PERFMON ("attempt to corrupt spilled pointer").
#[unsafe(no_mangle)]
static OPAQUE_ZERO: u32 = 0;

#[inline(always)]
fn opaque_zero() -> u32 {
    // SAFETY: a plain read of an immutable global.
    unsafe { core::ptr::read_volatile(&OPAQUE_ZERO) }
}

/// The all-zeros address, for an event that has no destination.
#[inline(always)]
pub fn no_address() -> AddrWords {
    let zero = u64::from(opaque_zero());
    AddrWords { hi: zero, lo: zero }
}

/// Counters with one attempt counted in the field `pick` selects.
#[inline(always)]
pub fn one_count(pick: impl FnOnce(&mut BlockCounters) -> &mut u64) -> BlockCounters {
    let zero = u64::from(opaque_zero());
    let mut counters = BlockCounters {
        connect: zero,
        sendmsg: zero,
        egress: zero,
    };
    *pick(&mut counters) += 1;
    counters
}
