//! What the daemon tells: the attempts the kernel reports, as log records,
//! metrics and notices for pods ([`events`]); the metrics themselves
//! ([`metrics`]); the HTTP endpoints with health and readiness ([`http`]);
//! `imds-guard status`, read from the pins ([`status`]); why a pod
//! is blocked or allowed ([`explain`]); and whether a node can run
//! imds-guard ([`doctor`]).

pub mod doctor;
pub mod events;
pub mod explain;
pub mod http;
pub mod metrics;
pub mod status;
