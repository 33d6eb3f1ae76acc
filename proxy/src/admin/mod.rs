//! The admin side, off the data path on a runtime of its own: HTTP (`GET /` the status
//! page, `/metrics`, `/status`, `/healthz`) on axum, and the SQL console
//! ([`sql`], `[admin] sql_listen`).

pub mod metrics;
pub mod sql;
pub mod status;

use crate::config::HttpAuth;
use crate::shared::ProxyShared;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
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
        let app = router(shared.clone()).into_make_service_with_connect_info::<SocketAddr>();
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
        .layer(axum::middleware::from_fn_with_state(shared.clone(), login))
        .with_state(shared)
}

/// `[admin] http_auth = "basic"`: every path but `/healthz` (and `/metrics` with
/// `public_metrics`) asks for the admin user and its password (HTTP Basic), as HAProxy's
/// `stats auth` does. Wrong logins count towards the source address's login throttle.
async fn login(
    State(sh): State<Arc<ProxyShared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let (auth, public_metrics) = {
        let cfg = sh.config();
        (cfg.admin.http_auth, cfg.admin.public_metrics)
    };
    let path = req.uri().path();
    let open =
        auth == HttpAuth::None || path == "/healthz" || (public_metrics && path == "/metrics");
    if open {
        return next.run(req).await;
    }
    let Some((user, password)) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| basic_credentials(v.as_bytes()))
    else {
        return ask_for_login();
    };
    let ip = peer.ip();
    let wait = sh.throttle.delay(ip, std::time::Instant::now());
    if !wait.is_zero() {
        sh.throttle.waited(wait);
        tokio::time::sleep(wait).await;
    }
    let users = sql::admin_users(&sh.config().admin, sh.secrets.as_ref());
    let verdict = crate::auth::verify(
        users.get(&user).as_deref(),
        crate::mysql::auth::Plugin::Clear,
        &[],
        &crate::mysql::auth::clear_answer(&password),
    );
    if matches!(verdict, crate::auth::Decision::Accept(_)) {
        sh.throttle.succeeded(ip);
        next.run(req).await
    } else {
        sh.throttle.failed(ip, std::time::Instant::now());
        tracing::warn!(%peer, user = %String::from_utf8_lossy(&user), "admin HTTP login refused");
        ask_for_login()
    }
}

/// 401 with the challenge a browser answers with its login dialog.
fn ask_for_login() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"dbproxy\", charset=\"UTF-8\"",
        )],
        "a login is needed: the [admin] admin_user and its password\n",
    )
        .into_response()
}

/// The user and password of an `Authorization: Basic ...` header.
fn basic_credentials(header: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    use base64::Engine;
    let (scheme, encoded) = std::str::from_utf8(header).ok()?.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let password = decoded.get(colon + 1..)?.to_vec();
    let mut user = decoded;
    user.truncate(colon);
    Some((user, password))
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

/// Why `dbproxy status` could not read a running dbproxy.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot start a runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("the admin side asks for a login: give --user and DBPROXY_ADMIN_PASSWORD")]
    LoginNeeded,
    #[error("the admin login was refused")]
    LoginRefused,
    #[error("unexpected answer: {0}")]
    Status(reqwest::StatusCode),
}

/// GETs `path` from a running dbproxy's admin endpoint at `addr` (`dbproxy status`), with
/// `login` (user, password) when the endpoint asks for one.
pub fn fetch(addr: &str, path: &str, login: Option<(&str, &str)>) -> Result<String, FetchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut req = http.get(format!("http://{addr}{path}"));
        if let Some((user, password)) = login {
            req = req.basic_auth(user, Some(password));
        }
        let resp = req.send().await?;
        match resp.status() {
            reqwest::StatusCode::OK => Ok(resp.text().await?),
            reqwest::StatusCode::UNAUTHORIZED if login.is_some() => Err(FetchError::LoginRefused),
            reqwest::StatusCode::UNAUTHORIZED => Err(FetchError::LoginNeeded),
            other => Err(FetchError::Status(other)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_taken_apart() {
        // "admin:pa:ss" in base64.
        assert_eq!(
            basic_credentials(b"Basic YWRtaW46cGE6c3M="),
            Some((b"admin".to_vec(), b"pa:ss".to_vec()))
        );
        assert_eq!(
            basic_credentials(b"basic  YWRtaW46cGE6c3M= "),
            Some((b"admin".to_vec(), b"pa:ss".to_vec()))
        );
        for bad in [
            &b"Bearer YWRtaW46cGE6c3M="[..],
            b"Basic !!!",
            b"Basic YWRtaW4=",
            b"Basic",
            b"\xff\xfe",
        ] {
            assert_eq!(basic_credentials(bad), None, "{bad:?}");
        }
    }
}
