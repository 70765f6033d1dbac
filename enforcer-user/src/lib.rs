//! imds-guard's user side: loading the eBPF enforcer, keeping its maps in
//! sync, and the modes the daemon runs in.

pub mod bpf;
pub mod config;
pub mod host;
pub mod k8s;
pub mod report;
pub mod service;
pub mod standalone;
