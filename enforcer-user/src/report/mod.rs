//! What the daemon tells: the attempts the kernel reports, as log records,
//! metrics and notices for pods ([`events`]); the metrics themselves
//! ([`metrics`]); the HTTP endpoints with health and readiness ([`http`]);
//! `imds-guard status`, read from the pins ([`status`]); and why a pod
//! is blocked or allowed ([`explain`]).

pub mod events;
pub mod explain;
pub mod http;
pub mod metrics;
pub mod status;
