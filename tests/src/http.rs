//! A plain HTTP `GET` for the tests' servers (the daemon's endpoints,
//! Prometheus): HTTP/1.0, so the answer is never chunked.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::{Result, SandboxError};

/// `GET path` from `address`, waiting at most `timeout` for each read:
/// the status code (0 if unreadable) and the body.
pub fn get(address: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let fail = |e: std::io::Error| SandboxError::Process(format!("GET {path} from {address}: {e}"));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(fail)?;
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").map_err(fail)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(fail)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
