//! The admin side, off the data path on a runtime of its own: HTTP (`GET /` the status
//! page, `/metrics`, `/status`, `/healthz`) on axum, and the SQL console
//! ([`sql`], `[admin] sql_listen`).

pub mod metrics;
pub mod sql;
pub mod status;

use crate::runtime::ProxyShared;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// The status page: plain HTML and JavaScript, served from the binary.
const PAGE: &str = include_str!("page.html");

/// Binds the admin listeners (HTTP on `http`, SQL on `sql`) and serves them on a thread of
/// their own until the process ends. Returns the bound addresses.
pub fn start(
    http: Option<SocketAddr>,
    sql: Option<SocketAddr>,
    shared: Arc<ProxyShared>,
) -> std::io::Result<(Option<SocketAddr>, Option<SocketAddr>)> {
    let bind = |a: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(a)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let http = http.map(bind).transpose()?;
    let sql = sql.map(bind).transpose()?;
    let addrs = (
        http.as_ref().map(|l| l.local_addr()).transpose()?,
        sql.as_ref().map(|l| l.local_addr()).transpose()?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("dbproxy-admin")
        .enable_all()
        .build()?;
    if let Some(l) = http {
        let l = rt.block_on(async { tokio::net::TcpListener::from_std(l) })?;
        let app = router(shared.clone());
        rt.spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!("admin HTTP endpoint stopped: {e}");
            }
        });
    }
    if let Some(l) = sql {
        let l = rt.block_on(async { tokio::net::TcpListener::from_std(l) })?;
        rt.spawn(sql::serve(l, shared));
    }
    // The runtime lives as long as the process.
    std::mem::forget(rt);
    if let Some(a) = addrs.0 {
        tracing::info!(listen = %a, "admin HTTP: GET / (status page), /metrics, /status, /healthz");
    }
    if let Some(a) = addrs.1 {
        tracing::info!(listen = %a, "admin SQL console");
    }
    Ok(addrs)
}

fn router(shared: Arc<ProxyShared>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics_handler))
        .route("/status", get(status_handler))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(shared)
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page needs is in it: no outside fetch is allowed.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        PAGE,
    )
        .into_response()
}

async fn metrics_handler(State(sh): State<Arc<ProxyShared>>) -> Response {
    match metrics::render(&sh) {
        Ok(body) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be encoded\n",
        )
            .into_response(),
    }
}

async fn status_handler(State(sh): State<Arc<ProxyShared>>) -> Response {
    axum::Json(status::collect(&sh)).into_response()
}

/// 200 while dbproxy serves; 503 once it drains (load balancers stop sending clients).
async fn healthz(State(sh): State<Arc<ProxyShared>>) -> Response {
    if sh.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found: try GET /, /metrics, /status or /healthz\n",
    )
        .into_response()
}

/// GETs `path` from a running dbproxy's admin endpoint at `addr` (`dbproxy status`).
pub fn fetch(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => {
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                Ok(dechunk(body))
            } else {
                Ok(body.to_string())
            }
        }
        _ => Err(std::io::Error::other(format!(
            "unexpected answer from {addr}: {}",
            resp.lines().next().unwrap_or("")
        ))),
    }
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 {
            break;
        }
        let Some(chunk) = rest.get(..n) else {
            out.push_str(rest);
            break;
        };
        out.push_str(chunk);
        body = rest.get(n + 2..).unwrap_or("");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
