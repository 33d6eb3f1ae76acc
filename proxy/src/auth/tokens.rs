//! Token logins: a client sends a token as its clear-text password (over TLS, through
//! mysql_clear_password), dbproxy verifies it (an AWS IAM token through STS, or an OIDC
//! JWT against its JWKS) and maps the identity it proves to the user logging in. The
//! verification runs on the secrets runtime; the session waits for its verdict.

use super::{iam, jwt, User};
use crate::config::{AwsIamConfig, Config, JwtConfig};
use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::JwkSet;
use std::future::Future;
use std::sync::Arc;

/// Verifies tokens for the users that accept them.
pub struct TokenVerifier {
    handle: tokio::runtime::Handle,
    http: reqwest::Client,
    iam: Option<(AwsIamConfig, String)>,
    jwt: Option<JwtConfig>,
    jwks: ArcSwapOption<JwkSet>,
}

impl TokenVerifier {
    /// Reads the JWKS once (a problem stops the start) and keeps it fresh; `None` when no
    /// token login is configured.
    pub fn start(
        cfg: &Config,
        handle: &tokio::runtime::Handle,
    ) -> Result<Option<Arc<Self>>, String> {
        if cfg.aws_iam.is_none() && cfg.jwt.is_none() {
            return Ok(None);
        }
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        let v = Arc::new(TokenVerifier {
            handle: handle.clone(),
            http,
            iam: cfg.aws_iam.clone().map(|c| {
                let ep = iam::sts_endpoint(&c);
                (c, ep)
            }),
            jwt: cfg.jwt.clone(),
            jwks: ArcSwapOption::empty(),
        });
        if let Some(j) = &v.jwt {
            let keys = handle
                .block_on(jwt::fetch_jwks(j, &v.http))
                .map_err(|e| format!("jwt: {e}"))?;
            v.jwks.store(Some(Arc::new(keys)));
            let me = v.clone();
            let every = j.refresh;
            handle.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(j) = &me.jwt else { return };
                    match jwt::fetch_jwks(j, &me.http).await {
                        Ok(k) => me.jwks.store(Some(Arc::new(k))),
                        Err(e) => tracing::warn!(
                            "JWKS not refreshed, the keys read before stay in use: {e}"
                        ),
                    }
                }
            });
        }
        Ok(Some(v))
    }

    /// Verifies `token` for `user`: the identity it proves, or why not (for the log; the
    /// token itself is never in it).
    pub fn verify(
        self: &Arc<Self>,
        user: Arc<User>,
        token: String,
    ) -> impl Future<Output = Result<String, String>> + Send + 'static {
        let me = self.clone();
        let task = self
            .handle
            .spawn(async move { me.check(&user, &token).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(format!("the verification failed: {e}")))
        }
    }

    async fn check(&self, user: &User, token: &str) -> Result<String, String> {
        if jwt::looks_like_jwt(token) {
            let cfg = self.jwt.as_ref().ok_or("JWT logins are not configured")?;
            let keys = self.jwks.load_full().ok_or("no JWKS")?;
            let who = jwt::verify(token, &keys, cfg).map_err(|e| format!("JWT: {e}"))?;
            if user.jwt_subjects.iter().any(|p| iam::matches(p, &who)) {
                return Ok(who);
            }
            return Err(format!(
                "JWT: no jwt_subjects entry of this user matches {who}"
            ));
        }
        if iam::looks_like_token(token) {
            let (cfg, endpoint) = self.iam.as_ref().ok_or("IAM logins are not configured")?;
            let checked = iam::check_token(
                token,
                endpoint,
                &cfg.server_id,
                std::time::SystemTime::now(),
            )
            .map_err(|e| format!("IAM token: {e}"))?;
            let arn = iam::caller_arn(&self.http, endpoint, &checked, &user.name, &cfg.server_id)
                .await
                .map_err(|e| format!("IAM token: {e}"))?;
            if user.aws_iam_arns.iter().any(|p| iam::matches(p, &arn)) {
                return Ok(arn);
            }
            return Err(format!("IAM token: {}", iam::IamError::Unmapped(arn)));
        }
        Err("the password is neither the user's nor a token".into())
    }
}
