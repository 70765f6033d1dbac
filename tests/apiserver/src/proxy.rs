//! The pod proxy (`GET /api/v1/namespaces/NS/pods/NAME[:PORT]/proxy/PATH`)
//! with the authentication and authorisation the real server puts in front
//! of it: a bearer token names a user (an unknown one is 401), and only a
//! user granted `get` on `pods/proxy` is let through (403 otherwise, the
//! anonymous user too). The request goes on to the pod's IP and port
//! without the caller's credentials, as the real server sends it; only
//! loopback pod IPs are served, so a test can never send traffic off the
//! machine.

use std::{net::IpAddr, sync::Arc};

use hyper::{Request, Response, StatusCode, body::Incoming, header};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    ApiRequest, Shared, Verb, lock,
    serve::{Body, Failure, json_response},
    store::{ObjectKey, ResourceKind},
};

/// A user the server knows by bearer token.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    /// Granted `get` on `pods/proxy` (in every namespace).
    pub may_proxy: bool,
}

/// The parts of a pod proxy path.
struct ProxyPath<'a> {
    namespace: &'a str,
    pod: &'a str,
    port: Option<&'a str>,
    rest: String,
}

fn parse(path: &str) -> Option<ProxyPath<'_>> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        [
            "api",
            "v1",
            "namespaces",
            namespace,
            "pods",
            target,
            "proxy",
            rest @ ..,
        ] => {
            let (pod, port) = match target.split_once(':') {
                Some((pod, port)) => (pod, Some(port)),
                None => (*target, None),
            };
            Some(ProxyPath {
                namespace,
                pod,
                port,
                rest: format!("/{}", rest.join("/")),
            })
        }
        _ => None,
    }
}

fn forbidden(user: &str, path: &ProxyPath) -> Failure {
    Failure {
        code: StatusCode::FORBIDDEN,
        reason: "Forbidden",
        message: format!(
            "pods {:?} is forbidden: User {user:?} cannot get resource \"pods/proxy\" in API \
             group \"\" in the namespace {:?}",
            path.pod, path.namespace
        ),
    }
}

/// Who sent `request`: `Ok(None)` for no credentials, 401 for a token the
/// server does not know.
pub(crate) fn authenticate(
    shared: &Shared,
    request: &Request<Incoming>,
) -> Result<Option<User>, Failure> {
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    shared.users.get(token).cloned().map(Some).ok_or(Failure {
        code: StatusCode::UNAUTHORIZED,
        reason: "Unauthorized",
        message: "Unauthorized".to_owned(),
    })
}

/// Serves `request` if it is a pod proxy request; `None` if it is not one.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    request: &Request<Incoming>,
) -> Option<Result<Response<Body>, Failure>> {
    let path = parse(request.uri().path())?;
    Some(proxy(shared, request, &path).await)
}

async fn proxy(
    shared: &Arc<Shared>,
    request: &Request<Incoming>,
    path: &ProxyPath<'_>,
) -> Result<Response<Body>, Failure> {
    let user = authenticate(shared, request)?;
    lock(&shared.requests).push(ApiRequest {
        verb: Verb::Proxy,
        resource: ResourceKind::Pods,
        namespace: Some(path.namespace.to_owned()),
        name: Some(path.pod.to_owned()),
        query: Vec::new(),
        at: std::time::Instant::now(),
    });
    match &user {
        Some(user) if user.may_proxy => {}
        Some(user) => return Err(forbidden(&user.name, path)),
        None => return Err(forbidden("system:anonymous", path)),
    }
    let pod = lock(&shared.store)
        .get(
            ResourceKind::Pods,
            &ObjectKey {
                namespace: path.namespace.to_owned(),
                name: path.pod.to_owned(),
            },
        )
        .map(|object| Value::clone(object))
        .ok_or_else(|| Failure::not_found(format!("pods {:?} not found", path.pod)))?;
    let ip: IpAddr = pod["status"]["podIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| Failure::bad_request(format!("pod {:?} has no IP", path.pod)))?;
    if !ip.is_loopback() {
        return Err(Failure::bad_request(format!(
            "this test server proxies to loopback pod IPs only, not {ip}"
        )));
    }
    let port: u16 = match path.port {
        Some(port) => port.parse().ok(),
        None => pod["spec"]["containers"][0]["ports"][0]["containerPort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok()),
    }
    .ok_or_else(|| Failure::bad_request(format!("no port to proxy to in {:?}", path.pod)))?;
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    forward(ip, port, &format!("{}{query}", path.rest))
        .await
        .map_err(|err| Failure {
            code: StatusCode::SERVICE_UNAVAILABLE,
            reason: "ServiceUnavailable",
            message: format!("error trying to reach service: {err}"),
        })
}

/// `GET target` on the pod, answered as it answered.
async fn forward(ip: IpAddr, port: u16, target: &str) -> std::io::Result<Response<Body>> {
    let mut stream = TcpStream::connect((ip, port)).await?;
    stream
        .write_all(
            format!("GET {target} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    let malformed = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed answer");
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(malformed)?;
    let mut response = json_response(code, full_text(body));
    if !head
        .to_ascii_lowercase()
        .contains("content-type: application/json")
    {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
    }
    Ok(response)
}

fn full_text(body: &str) -> Body {
    use http_body_util::BodyExt as _;
    http_body_util::Full::new(bytes::Bytes::from(body.to_owned())).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_paths() {
        let p = parse("/api/v1/namespaces/imds-guard/pods/imds-guard-x1:9464/proxy/explain/u-1")
            .expect("proxy path");
        assert_eq!(
            (p.namespace, p.pod, p.port, p.rest.as_str()),
            ("imds-guard", "imds-guard-x1", Some("9464"), "/explain/u-1")
        );
        let p = parse("/api/v1/namespaces/a/pods/b/proxy/").expect("proxy path");
        assert_eq!((p.pod, p.port, p.rest.as_str()), ("b", None, "/"));
        assert!(parse("/api/v1/namespaces/a/pods/b").is_none());
        assert!(parse("/api/v1/namespaces/a/services/b/proxy/x").is_none());
    }
}
