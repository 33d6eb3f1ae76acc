//! OIDC JWT logins (Kubernetes service-account tokens, CI tokens): the token's signature
//! is checked against a JWKS (a file, or a URL read again every `refresh`), then `iss`,
//! `aud` and `exp`; a claim (`sub` by default) names the identity users map. Only
//! asymmetric algorithms are accepted, and only the one the key is for.

use crate::config::JwtConfig;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Why a JWT is refused (logged; the client gets 1045).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT")]
    Malformed,
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("no key of the JWKS verifies it")]
    NoKey,
    #[error("{0}")]
    Invalid(String),
    #[error("the claim {0:?} is missing or not a string")]
    Claim(String),
    #[error("the JWKS cannot be read: {0}")]
    Jwks(String),
}

/// Whether `token` looks like a JWT (three base64url parts, a JSON header).
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

/// Parses a JWKS document.
pub fn parse_jwks(text: &str) -> Result<JwkSet, JwtError> {
    serde_json::from_str(text).map_err(|e| JwtError::Jwks(format!("not a JWKS: {e}")))
}

/// Reads the JWKS from its file or URL.
pub async fn fetch_jwks(cfg: &JwtConfig, http: &reqwest::Client) -> Result<JwkSet, JwtError> {
    let text = if !cfg.jwks_file.is_empty() {
        tokio::fs::read_to_string(&cfg.jwks_file)
            .await
            .map_err(|e| JwtError::Jwks(format!("{}: {e}", cfg.jwks_file)))?
    } else {
        let resp = http
            .get(&cfg.jwks_url)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| JwtError::Jwks(format!("{}: {e}", cfg.jwks_url)))?;
        resp.text()
            .await
            .map_err(|e| JwtError::Jwks(format!("{}: {e}", cfg.jwks_url)))?
    };
    parse_jwks(&text)
}

const ACCEPTED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Verifies `token` against `keys` and `cfg`; the identity (the `user_claim`'s value).
pub fn verify(token: &str, keys: &JwkSet, cfg: &JwtConfig) -> Result<String, JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
    if !ACCEPTED.contains(&header.alg) {
        return Err(JwtError::Algorithm(header.alg));
    }
    let candidates: Vec<&Jwk> = keys
        .keys
        .iter()
        .filter(|k| match (&header.kid, &k.common.key_id) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        })
        .filter(|k| {
            k.common
                .key_algorithm
                .is_none_or(|a| format!("{a:?}") == format!("{:?}", header.alg))
        })
        .collect();
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[cfg.issuer.as_str()]);
    validation.set_audience(&[cfg.audience.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.leeway = 30;
    let mut last = JwtError::NoKey;
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
            Ok(data) => {
                return data
                    .claims
                    .get(&cfg.user_claim)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| JwtError::Claim(cfg.user_claim.clone()));
            }
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind;
                last = match e.kind() {
                    ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => JwtError::NoKey,
                    _ => JwtError::Invalid(e.to_string()),
                };
                if !matches!(last, JwtError::NoKey) {
                    break;
                }
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> JwtConfig {
        JwtConfig {
            jwks_file: "unused".into(),
            jwks_url: String::new(),
            issuer: "iss".into(),
            audience: "aud".into(),
            user_claim: "sub".into(),
            refresh: std::time::Duration::from_secs(300),
        }
    }

    /// An HMAC token would verify with a public key used as the secret (algorithm
    /// confusion); `none` verifies nothing. Neither is accepted.
    #[test]
    fn symmetric_and_unsigned_tokens_are_refused() {
        let keys = parse_jwks(r#"{"keys": []}"#).unwrap();
        let claims =
            serde_json::json!({"iss": "iss", "aud": "aud", "sub": "x", "exp": 4102444800u64});
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert!(looks_like_jwt(&hs));
        assert!(matches!(
            verify(&hs, &keys, &cfg()),
            Err(JwtError::Algorithm(Algorithm::HS256))
        ));
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.";
        assert!(matches!(
            verify(none, &keys, &cfg()),
            Err(JwtError::Malformed)
        ));
        assert!(!looks_like_jwt("dbproxy-iam-v1.abc"));
        assert!(parse_jwks("not json").is_err());
    }
}
