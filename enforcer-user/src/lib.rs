//! imds-guard's user side, one folder a responsibility:
//! - [`app`]: the daemon's skeleton, one start, loop and shutdown for every mode;
//! - [`standalone`] and [`k8s`]: the modes, which supply only what differs;
//! - [`config`]: the settings, from flags and file, checked (pure);
//! - [`bpf`]: the eBPF object, its maps and pins, and the task that owns them;
//! - [`edge`]: the node edge guard: which interfaces to guard, which pods'
//!   interfaces to let through, kept in step with the node's network;
//! - [`host`]: the machine: cgroups, capabilities, kernel, memlock;
//! - [`report`]: events, metrics, HTTP endpoints and `status`.
//!
//! Dependencies point one way: the modes use [`app`], which uses
//! [`edge`], [`report`], [`bpf`], [`host`] and [`config`]; [`config`] uses nothing of
//! the crate. `tests/layering.rs` fails on a cycle or a module reaching
//! into a mode.

pub mod app;
pub mod bpf;
pub mod config;
pub mod edge;
pub mod host;
pub mod k8s;
pub mod report;
pub mod standalone;
