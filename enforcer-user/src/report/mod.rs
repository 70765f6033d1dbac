//! What the daemon tells: the attempts the kernel reports, as log records,
//! metrics and notices for pods ([`events`]); the metrics themselves
//! ([`metrics`]); the HTTP endpoints with health and readiness ([`http`]);
//! and `imds-guard status`, read from the pins ([`status`]).

pub mod events;
pub mod http;
pub mod metrics;
pub mod status;
