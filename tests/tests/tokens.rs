//! Token logins: AWS IAM tokens (`dbproxy token`, verified through moto's STS on
//! 127.0.0.1) and OIDC JWTs (signed by a test key, checked against a JWKS file), with the
//! mariadb CLI over TLS and mysql_clear_password.

use base64::Engine;
use proxy_tests::aws::Moto;
use proxy_tests::tls::TestCa;
use proxy_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ISSUER: &str = "https://issuer.dbproxy.test";

/// The `[aws_iam]` (STS at `endpoint`) and `[jwt]` (keys in `jwks`) sections, with a user
/// for each kind of token: `iamuser` (IAM) and `k8s` (JWT).
fn token_sections(endpoint: &str, jwks: &Path) -> String {
    format!(
        r#"
[aws_iam]
sts_endpoint = "{endpoint}"
region = "us-east-1"
server_id = "dbproxy-test"

[jwt]
jwks_file = "{}"
issuer = "{ISSUER}"
audience = "dbproxy"

[[users]]
name = "iamuser"
backend_user = "app"
backend_password = "{DB_PASSWORD}"
aws_iam_arns = ["arn:aws:iam::123456789012:user/app-*"]

[[users]]
name = "k8s"
backend_user = "app"
backend_password = "{DB_PASSWORD}"
jwt_subjects = ["system:serviceaccount:prod:*"]
"#,
        jwks.display()
    )
}

/// `dbproxy token` with `key`'s credentials; the token.
fn token(config: &Path, user: &str, key: &(String, String), extra: &[&str]) -> String {
    let out = Command::new(dbproxy_bin())
        .args(["token", "--user", user, "--config"])
        .arg(config)
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", &key.0)
        .env("AWS_SECRET_ACCESS_KEY", &key.1)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dbproxy token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A P-256 key that signs the test JWTs, and the JWKS that publishes it.
struct Issuer {
    key: jsonwebtoken::EncodingKey,
    jwks: String,
}

impl Issuer {
    fn new() -> Issuer {
        let pair = rcgen::KeyPair::generate().unwrap();
        let raw = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "test-1", "alg": "ES256", "use": "sig",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]});
        Issuer {
            key: jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwks: jwks.to_string(),
        }
    }

    /// A JWT for `sub`, for `aud`, expiring `ttl` seconds from now (negative: expired).
    fn jwt(&self, sub: &str, aud: &str, ttl: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("test-1".into());
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": aud, "sub": sub, "iat": now, "exp": now + ttl,
        });
        jsonwebtoken::encode(&h, &claims, &self.key).unwrap()
    }
}

#[test]
fn iam_and_jwt_tokens_log_in_over_tls_and_nothing_else_does() {
    let db = MariaDb::start();
    let moto = Moto::start();
    let runner = moto.iam_user("app-runner");
    let stranger = moto.iam_user("stranger");
    let ca = TestCa::new("tokens");
    let (cert, key) = ca.issue("proxy", &["localhost", "127.0.0.1"]);
    let issuer = Issuer::new();
    let jwks = ca.dir.path().join("jwks.json");
    std::fs::write(&jwks, &issuer.jwks).unwrap();
    let sections = token_sections(&moto.endpoint(), &jwks);
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert.display(),
        key.display()
    );
    let ca_arg = ca.ca.display().to_string();
    let mut seen_secrets: Vec<String> = vec![never_logged(&runner.1), never_logged(&stranger.1)];
    // The JWKS from a URL too (one driver reads the file, the other the URL).
    let web_port = free_port();
    let mut web = Command::new(python());
    web.args([
        "-m",
        "http.server",
        &web_port.to_string(),
        "--bind",
        "127.0.0.1",
    ])
    .arg("--directory")
    .arg(ca.dir.path())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut web = spawn(web);
    wait_until("the JWKS server", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", web_port)).is_ok()
    });
    for io in DRIVERS {
        let sections = if io == "epoll" {
            sections.replace(
                &format!("jwks_file = \"{}\"", jwks.display()),
                &format!("jwks_url = \"http://127.0.0.1:{web_port}/jwks.json\""),
            )
        } else {
            sections.clone()
        };
        assert_eq!(sections.contains("jwks_url"), io == "epoll");
        let proxy = Proxy::start_env(db.port, io, &tls, "", &sections, &moto.env());
        let login = |user: &str, password: &str, tls: bool| {
            let mut args = vec!["--enable-cleartext-plugin"];
            if tls {
                args.extend(["--ssl", "--ssl-ca", &ca_arg]);
            } else {
                args.push("--skip-ssl");
            }
            let out = mariadb_cli(proxy.port, user, password, &args, "SELECT CURRENT_USER()");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let denied = |what: &str, (ok, text): (bool, String)| {
            assert!(!ok && text.contains("ERROR 1045"), "[{io}] {what}: {text}");
        };

        // IAM: a token of app-runner, whose ARN the user maps.
        let good = token(&proxy.config, "iamuser", &runner, &[]);
        assert!(good.len() > 200, "{good}");
        let (ok, text) = login("iamuser", &good, true);
        assert!(ok && text.contains("app@"), "[{io}] IAM login: {text}");
        // Without TLS, a clear-text password is not taken.
        let (ok, text) = login("iamuser", &good, false);
        assert!(!ok && text.contains("ERROR 3159"), "[{io}] {text}");
        // Made for another user.
        denied("a token for another user", login("k8s", &good, true));
        // An identity no user maps (moto answers with the stranger's ARN).
        denied(
            "an unmapped identity",
            login(
                "iamuser",
                &token(&proxy.config, "iamuser", &stranger, &[]),
                true,
            ),
        );
        // Expired.
        let short = token(&proxy.config, "iamuser", &runner, &["--expires-in", "1"]);
        std::thread::sleep(Duration::from_secs(2));
        denied("an expired token", login("iamuser", &short, true));
        // Signed for another service (no server_id header signed).
        let foreign = Proxy::start_env(
            db.port,
            io,
            &tls,
            "",
            &sections.replace("server_id = \"dbproxy-test\"", ""),
            &moto.env(),
        );
        let other = token(&foreign.config, "iamuser", &runner, &[]);
        drop(foreign);
        denied(
            "a token without the server id",
            login("iamuser", &other, true),
        );
        // Garbage that looks like a token.
        denied("garbage", login("iamuser", "dbproxy-iam-v1.AAAA", true));

        // JWT.
        let jwt = issuer.jwt("system:serviceaccount:prod:api", "dbproxy", 300);
        let (ok, text) = login("k8s", &jwt, true);
        assert!(ok && text.contains("app@"), "[{io}] JWT login: {text}");
        let mut tampered = jwt.clone().into_bytes();
        // Flip a character of the payload (the claims), keeping it base64url.
        let dot = jwt.find('.').unwrap() + 5;
        tampered[dot] = if tampered[dot] == b'A' { b'B' } else { b'A' };
        denied(
            "a tampered JWT",
            login("k8s", &String::from_utf8(tampered).unwrap(), true),
        );
        denied(
            "an expired JWT",
            login(
                "k8s",
                &issuer.jwt("system:serviceaccount:prod:api", "dbproxy", -120),
                true,
            ),
        );
        denied(
            "a JWT for another audience",
            login(
                "k8s",
                &issuer.jwt("system:serviceaccount:prod:api", "other", 300),
                true,
            ),
        );
        denied(
            "an unmapped subject",
            login(
                "k8s",
                &issuer.jwt("system:serviceaccount:dev:api", "dbproxy", 300),
                true,
            ),
        );
        denied(
            "a JWT for a user that takes IAM only",
            login("iamuser", &jwt, true),
        );
        // Signed by another key.
        let forged = Issuer::new().jwt("system:serviceaccount:prod:api", "dbproxy", 300);
        denied("a JWT of another key", login("k8s", &forged, true));

        let log = proxy.log();
        for l in log.lines().filter(|l| l.contains("token")) {
            println!("[{io}] {l}");
        }
        assert!(log.contains("token login"), "[{io}] {log}");
        seen_secrets.extend([good, short, other, jwt].map(|t| never_logged(&t)));
        for s in &seen_secrets {
            assert!(
                !log.contains(s.as_str()),
                "[{io}] a token or key in the log"
            );
        }
    }
    let _ = web.kill();
    let _ = web.wait();

    // check-config reads the JWKS as the start does, and names the problem.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("dbproxy.toml");
    std::fs::write(
        &bad,
        format!(
            "[[endpoints]]\nname = \"e\"\nlisten = \"127.0.0.1:1\"\ntarget_group = \"g\"\n\
             [[target_groups]]\nname = \"g\"\ntargets = [\"127.0.0.1:1\"]\n\
             [[users]]\nname = \"u\"\nbackend_password = \"x\"\njwt_subjects = [\"*\"]\n\
             [jwt]\njwks_file = \"{}/missing.json\"\nissuer = \"i\"\naudience = \"a\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(dbproxy_bin())
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.json"),
        "{err}"
    );
}

/// The first authentication request dbproxy sends a PostgreSQL client logging in as
/// `user` without TLS: 3 clear text, 5 md5, 10 SASL; or the ErrorResponse's text.
fn pg_auth_request(port: u16, user: &str) -> Result<i32, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut body = 196608i32.to_be_bytes().to_vec();
    for kv in ["user", user, "database", "shop", ""] {
        body.extend_from_slice(kv.as_bytes());
        body.push(0);
    }
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg).unwrap();
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).unwrap();
    match head[0] {
        b'R' => Ok(i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]])),
        _ => Err(String::from_utf8_lossy(&rest).into_owned()),
    }
}

/// PostgreSQL clients log in with each method a user can be given: md5, clear text
/// (over TLS only), and IAM and JWT tokens sent as the clear-text password by psql.
#[test]
fn postgresql_clients_log_in_with_md5_clear_text_and_tokens() {
    let db = proxy_tests::pg::PgDb::start(&[]);
    let moto = Moto::start();
    let runner = moto.iam_user("app-runner");
    let ca = TestCa::new("pg-tokens");
    let (cert, key) = ca.issue("proxy", &["localhost", "127.0.0.1"]);
    let issuer = Issuer::new();
    let jwks = ca.dir.path().join("jwks.json");
    std::fs::write(&jwks, &issuer.jwks).unwrap();
    let sections = token_sections(&moto.endpoint(), &jwks)
        + &format!(
            r#"
[[users]]
name = "md5user"
password = "md5-secret"
postgres_auth = "md5"
backend_user = "app"
backend_password = "{DB_PASSWORD}"

[[users]]
name = "plain"
password = "plain-secret"
postgres_auth = "password"
backend_user = "app"
backend_password = "{DB_PASSWORD}"

"#
        );
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert.display(),
        key.display()
    );
    for io in DRIVERS {
        let proxy = Proxy::start_env(
            db.port,
            io,
            &tls,
            &proxy_tests::pg::group(&db, "max_connections = 2"),
            &sections,
            &moto.env(),
        );
        let psql = |user: &str, password: &str, sslmode: &str| {
            let out = proxy_tests::pg::program("psql")
                .arg(format!(
                    "host=127.0.0.1 port={} user={user} dbname=shop sslmode={sslmode} sslrootcert={}",
                    proxy.port,
                    ca.ca.display()
                ))
                .args(["-At", "-c", "SELECT current_user, (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()) IS NOT NULL"])
                .env("PGPASSWORD", password)
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let refused = |what: &str, (ok, text): (bool, String)| {
            assert!(
                !ok && text.contains("password authentication failed"),
                "[{io}] {what}: {text}"
            );
        };
        // Each user is asked for the method it is given; an unknown name for SCRAM.
        assert_eq!(pg_auth_request(proxy.port, "md5user"), Ok(5), "[{io}]");
        assert_eq!(pg_auth_request(proxy.port, "app"), Ok(10), "[{io}]");
        assert_eq!(pg_auth_request(proxy.port, "nobody"), Ok(10), "[{io}]");
        // Clear text is never asked for without TLS.
        for user in ["plain", "iamuser"] {
            let e = pg_auth_request(proxy.port, user).unwrap_err();
            assert!(e.contains("needs TLS"), "[{io}] {user}: {e}");
        }

        let (ok, text) = psql("md5user", "md5-secret", "disable");
        assert!(ok && text.starts_with("app|"), "[{io}] md5: {text}");
        refused(
            "a wrong md5 password",
            psql("md5user", "md5-secreT", "disable"),
        );

        let (ok, text) = psql("plain", "plain-secret", "verify-full");
        assert!(ok && text.starts_with("app|"), "[{io}] clear text: {text}");
        refused(
            "a wrong clear-text password",
            psql("plain", "plain", "verify-full"),
        );
        let (ok, text) = psql("plain", "plain-secret", "disable");
        assert!(!ok && text.contains("needs TLS"), "[{io}] {text}");

        let good = token(&proxy.config, "iamuser", &runner, &[]);
        never_logged(&good);
        let (ok, text) = psql("iamuser", &good, "verify-full");
        assert!(ok && text.starts_with("app|"), "[{io}] IAM token: {text}");
        refused(
            "an IAM token for another user",
            psql("k8s", &good, "verify-full"),
        );
        refused(
            "garbage",
            psql("iamuser", "dbproxy-iam-v1.AAAA", "verify-full"),
        );

        let jwt = issuer.jwt("system:serviceaccount:prod:api", "dbproxy", 300);
        never_logged(&jwt);
        let (ok, text) = psql("k8s", &jwt, "verify-full");
        assert!(ok && text.starts_with("app|"), "[{io}] JWT: {text}");
        refused(
            "an expired JWT",
            psql(
                "k8s",
                &issuer.jwt("system:serviceaccount:prod:api", "dbproxy", -120),
                "verify-full",
            ),
        );
        refused(
            "an unmapped subject",
            psql(
                "k8s",
                &issuer.jwt("system:serviceaccount:dev:api", "dbproxy", 300),
                "verify-full",
            ),
        );
        let log = proxy.log();
        assert!(log.contains("token login"), "[{io}] {log}");
        for t in [&good, &jwt] {
            assert!(!log.contains(t.as_str()), "[{io}] a token in the log");
        }
    }
}
