//! AWS IAM logins, verified as HashiCorp Vault's AWS IAM method does it: the token carries
//! an STS GetCallerIdentity request signed (SigV4) with the caller's credentials. dbproxy
//! sends that request to STS itself (the endpoint it is configured with, never one the
//! token names) and reads the caller's ARN from the answer; STS checks the signature, and
//! refuses a request signed more than 15 minutes ago. The request signs a header naming
//! the dbproxy user (`x-dbproxy-user`) and, when configured, dbproxy's own id
//! (`x-dbproxy-server-id`); dbproxy sets both itself when it sends the request, so a token
//! made for another user, or for another service, does not verify.
//!
//! A token is `dbproxy-iam-v1.` and the base64url of `{"url", "body", "headers"}`.

use crate::config::AwsIamConfig;
use base64::Engine;
use std::time::{Duration, SystemTime};

/// The header naming the dbproxy user a token was made for.
pub const USER_HEADER: &str = "x-dbproxy-user";
/// The header carrying `[aws_iam] server_id`.
pub const SERVER_ID_HEADER: &str = "x-dbproxy-server-id";
/// A signed header with the token's end (UNIX seconds), when shorter than STS's 15 minutes.
pub const EXPIRES_HEADER: &str = "x-dbproxy-expires";
/// How long a token lives (STS refuses older signatures too).
pub const MAX_AGE: u64 = 900;
/// Clock skew tolerated on a token's signing time.
const SKEW: Duration = Duration::from_secs(300);
/// What every token asks STS.
pub const BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
const PREFIX: &str = "dbproxy-iam-v1.";
/// The headers of the token that are sent on (the others are dbproxy's to set).
const FORWARDED: [&str; 5] = [
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "content-type",
    EXPIRES_HEADER,
];

/// Why a token is refused (logged; the client gets 1045).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IamError {
    #[error("not a dbproxy IAM token")]
    Malformed,
    #[error("not an STS GetCallerIdentity request signed for {0}")]
    NotForUs(String),
    #[error("the token lacks {0}")]
    Missing(&'static str),
    #[error("the token does not sign the {0} header")]
    Unsigned(&'static str),
    #[error("the token expired")]
    Expired,
    #[error("the token's signing time is in the future")]
    BadTime,
    #[error("STS refused the token: {0}")]
    Refused(String),
    #[error("STS could not be asked: {0}")]
    Unreachable(String),
    #[error("no user maps the identity {0}")]
    Unmapped(String),
}

/// What a token carries.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Signed {
    url: String,
    body: String,
    headers: Vec<(String, String)>,
}

/// Whether `token` is (meant as) a dbproxy IAM token.
pub fn looks_like_token(token: &str) -> bool {
    token.starts_with(PREFIX)
}

/// The STS endpoint: configured, or the region's.
pub fn sts_endpoint(cfg: &AwsIamConfig) -> String {
    if !cfg.sts_endpoint.is_empty() {
        return cfg.sts_endpoint.trim_end_matches('/').to_string();
    }
    format!("https://sts.{}.amazonaws.com", region(cfg))
}

fn region(cfg: &AwsIamConfig) -> String {
    if !cfg.region.is_empty() {
        return cfg.region.clone();
    }
    std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|_| "us-east-1".into())
}

/// A request ready to be sent to STS.
#[derive(Debug)]
pub struct Checked {
    headers: Vec<(String, String)>,
}

/// Decodes `token` and checks it before anything is sent: signed for `endpoint`, for
/// GetCallerIdentity, with the dbproxy headers signed, and not expired at `now`.
pub fn check_token(
    token: &str,
    endpoint: &str,
    server_id: &str,
    now: SystemTime,
) -> Result<Checked, IamError> {
    let b64 = token.strip_prefix(PREFIX).ok_or(IamError::Malformed)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64.trim_end_matches('='))
        .map_err(|_| IamError::Malformed)?;
    let signed: Signed = serde_json::from_slice(&json).map_err(|_| IamError::Malformed)?;
    if signed.url != format!("{endpoint}/") || signed.body != BODY {
        return Err(IamError::NotForUs(endpoint.to_string()));
    }
    let header = |name: &'static str| {
        signed
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let auth = header("authorization").ok_or(IamError::Missing("Authorization"))?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| IamError::NotForUs(endpoint.to_string()))?;
    let field = |name: &str| {
        rest.split(',')
            .map(str::trim)
            .find_map(|f| f.strip_prefix(name))
    };
    let scope = field("Credential=").ok_or(IamError::Missing("Credential"))?;
    if scope.split('/').nth(3) != Some("sts") {
        return Err(IamError::NotForUs(endpoint.to_string()));
    }
    let signed_headers: Vec<&str> = field("SignedHeaders=")
        .ok_or(IamError::Missing("SignedHeaders"))?
        .split(';')
        .collect();
    if !signed_headers.contains(&USER_HEADER) {
        return Err(IamError::Unsigned(USER_HEADER));
    }
    if !server_id.is_empty() && !signed_headers.contains(&SERVER_ID_HEADER) {
        return Err(IamError::Unsigned(SERVER_ID_HEADER));
    }
    let date = header("x-amz-date").ok_or(IamError::Missing("X-Amz-Date"))?;
    let signed_at = parse_amz_date(date).ok_or(IamError::Missing("X-Amz-Date"))?;
    if signed_at > now + SKEW {
        return Err(IamError::BadTime);
    }
    if signed_at + Duration::from_secs(MAX_AGE) < now {
        return Err(IamError::Expired);
    }
    if let Some(end) = header(EXPIRES_HEADER) {
        if !signed_headers.contains(&EXPIRES_HEADER) {
            return Err(IamError::Unsigned(EXPIRES_HEADER));
        }
        let end: u64 = end.parse().map_err(|_| IamError::Malformed)?;
        if SystemTime::UNIX_EPOCH + Duration::from_secs(end) < now {
            return Err(IamError::Expired);
        }
    }
    let headers = signed
        .headers
        .into_iter()
        .filter(|(k, _)| FORWARDED.iter().any(|f| k.eq_ignore_ascii_case(f)))
        .collect();
    Ok(Checked { headers })
}

/// `YYYYMMDDTHHMMSSZ`.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b.get(8) != Some(&b'T') || b.get(15) != Some(&b'Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    u64::try_from(secs)
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// Sends a [`check_token`]ed request to STS for `user`; the caller's ARN.
pub async fn caller_arn(
    http: &reqwest::Client,
    endpoint: &str,
    checked: &Checked,
    user: &str,
    server_id: &str,
) -> Result<String, IamError> {
    let mut req = http
        .post(format!("{endpoint}/"))
        .header(USER_HEADER, user)
        .body(BODY)
        .timeout(Duration::from_secs(10));
    for (k, v) in &checked.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if !server_id.is_empty() {
        req = req.header(SERVER_ID_HEADER, server_id);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| IamError::Unreachable(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .map_err(|e| IamError::Unreachable(e.to_string()))?;
    if !status.is_success() {
        let code = xml_text(&body, "Code").unwrap_or_else(|| status.to_string());
        return Err(IamError::Refused(code));
    }
    xml_text(&body, "Arn").ok_or_else(|| IamError::Refused("no Arn in STS's answer".into()))
}

/// The text of the first `<tag>` element (STS's answers are small and flat).
fn xml_text(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let len = body.get(start..)?.find(&format!("</{tag}>"))?;
    let text = body.get(start..start + len)?.trim();
    Some(
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// Builds a token for `user` from the standard credential chain (`dbproxy token`), valid
/// for `expires_in` (at most STS's 15 minutes).
pub async fn make_token(
    cfg: &AwsIamConfig,
    user: &str,
    expires_in: Duration,
) -> Result<String, String> {
    use aws_credential_types::provider::ProvideCredentials;
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let region = region(cfg);
    let sdk = crate::aws::sdk_config(&region, "").await;
    let provider = sdk
        .credentials_provider()
        .ok_or("no AWS credentials found (environment, shared config, instance profile)")?;
    let creds = provider
        .provide_credentials()
        .await
        .map_err(|e| format!("no AWS credentials: {e}"))?;
    let url = format!("{}/", sts_endpoint(cfg));
    let now = SystemTime::now();
    let mut headers = vec![
        (
            "content-type".to_string(),
            "application/x-www-form-urlencoded; charset=utf-8".to_string(),
        ),
        (USER_HEADER.to_string(), user.to_string()),
    ];
    if !cfg.server_id.is_empty() {
        headers.push((SERVER_ID_HEADER.to_string(), cfg.server_id.clone()));
    }
    if expires_in < Duration::from_secs(MAX_AGE) {
        let end = now + expires_in;
        let secs = end
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        headers.push((EXPIRES_HEADER.to_string(), secs.to_string()));
    }
    let identity = creds.into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(&region)
        .name("sts")
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let request = SignableRequest::new(
        "POST",
        &url,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(BODY.as_bytes()),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    for (k, v) in instructions.headers() {
        headers.push((k.to_string(), v.to_string()));
    }
    // dbproxy sets these itself when it sends the request.
    headers.retain(|(k, _)| k != USER_HEADER && k != SERVER_ID_HEADER);
    let json = serde_json::to_vec(&Signed {
        url,
        body: BODY.into(),
        headers,
    })
    .map_err(|e| e.to_string())?;
    Ok(format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    ))
}

/// Whether `pattern` (`*` matches any run of characters) matches `s`.
pub fn matches(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = match parts.split_first() {
        Some(x) => x,
        None => return s.is_empty(),
    };
    let Some(mut tail) = s.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return tail.is_empty();
    };
    for m in middle {
        match tail.find(m) {
            Some(i) => tail = &tail[i + m.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: &str = "https://sts.us-east-1.amazonaws.com";

    fn token(date: &str, signed: &str, url: &str, extra: &[(&str, &str)]) -> String {
        let mut headers = vec![
            (
                "authorization".to_string(),
                format!(
                    "AWS4-HMAC-SHA256 Credential=AKID/20261127/us-east-1/sts/aws4_request, \
                     SignedHeaders={signed}, Signature=abcd"
                ),
            ),
            ("x-amz-date".to_string(), date.to_string()),
            ("x-forwarded-for".to_string(), "1.2.3.4".to_string()),
        ];
        headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let json = serde_json::to_vec(&Signed {
            url: url.into(),
            body: BODY.into(),
            headers,
        })
        .unwrap();
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    #[test]
    fn tokens_are_checked_before_anything_is_sent() {
        let now = parse_amz_date("20261127T120000Z").unwrap();
        let signed = "host;x-amz-date;x-dbproxy-user";
        let ep = format!("{EP}/");
        let ok = token("20261127T115500Z", signed, &ep, &[]);
        let c = check_token(&ok, EP, "", now).unwrap();
        // Only the headers STS needs are sent on.
        assert!(c.headers.iter().all(|(k, _)| k != "x-forwarded-for"));
        assert_eq!(
            check_token(&token("20261127T114000Z", signed, &ep, &[]), EP, "", now).unwrap_err(),
            IamError::Expired
        );
        assert_eq!(
            check_token(&token("20261127T121000Z", signed, &ep, &[]), EP, "", now).unwrap_err(),
            IamError::BadTime
        );
        assert_eq!(
            check_token(&token("20261127T115500Z", "host", &ep, &[]), EP, "", now).unwrap_err(),
            IamError::Unsigned(USER_HEADER)
        );
        assert_eq!(
            check_token(&ok, EP, "prod-proxy", now).unwrap_err(),
            IamError::Unsigned(SERVER_ID_HEADER)
        );
        let short = token(
            "20261127T115500Z",
            "host;x-amz-date;x-dbproxy-expires;x-dbproxy-user",
            &ep,
            &[(EXPIRES_HEADER, "1795780000")],
        );
        assert_eq!(
            check_token(&short, EP, "", now).unwrap_err(),
            IamError::Expired
        );
        // Signed for another host: never sent anywhere.
        let evil = token("20261127T115500Z", signed, "https://evil.example/", &[]);
        assert!(matches!(
            check_token(&evil, EP, "", now),
            Err(IamError::NotForUs(_))
        ));
        assert_eq!(
            check_token("dbproxy-iam-v1.!!!", EP, "", now).unwrap_err(),
            IamError::Malformed
        );
        assert_eq!(
            parse_amz_date("19700101T000001Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
        );
        assert_eq!(
            parse_amz_date("20000301T000000Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(951_868_800))
        );
        assert_eq!(parse_amz_date("2026-11-27"), None);
    }

    #[test]
    fn arn_patterns() {
        let arn = "arn:aws:sts::123456789012:assumed-role/app-role/i-0abc";
        assert!(matches(
            "arn:aws:sts::123456789012:assumed-role/app-*/*",
            arn
        ));
        assert!(matches(arn, arn));
        assert!(matches("*", arn));
        assert!(!matches(
            "arn:aws:sts::123456789012:assumed-role/other/*",
            arn
        ));
        assert!(!matches("arn:aws:iam::123456789012:user/app", arn));
        assert!(!matches("arn:*:user/app", "arn:aws:iam::1:user/app2"));
        assert!(matches("a*b*c", "abc") && !matches("a*b*c", "acb"));
    }

    #[test]
    fn sts_answers() {
        let body = "<GetCallerIdentityResponse><GetCallerIdentityResult>\
            <Arn>arn:aws:iam::123456789012:user/app</Arn><UserId>X</UserId>\
            </GetCallerIdentityResult></GetCallerIdentityResponse>";
        assert_eq!(
            xml_text(body, "Arn").as_deref(),
            Some("arn:aws:iam::123456789012:user/app")
        );
        assert_eq!(
            xml_text("<Error><Code>ExpiredToken</Code></Error>", "Code").as_deref(),
            Some("ExpiredToken")
        );
        assert_eq!(xml_text("<Arn>", "Arn"), None);
    }
}
