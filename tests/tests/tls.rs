//! TLS on both legs, with a CA the tests make: clients (mariadb CLI, PyMySQL,
//! mysql-connector-python, Connector/J, the Rust mysql crate, sysbench) through an endpoint
//! that requires TLS; dbproxy to a MariaDB that requires secure transport; certificate
//! reload on SIGHUP; clients that misbehave during the TLS handshake.

use proxy_tests::tls::{peer_certificate, pem_der, ssl_request, TestCa};
use proxy_tests::*;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// How long a test waits for something that should happen at once (a deadline, not a pause).
const PATIENCE: Duration = Duration::from_secs(20);

/// dbproxy with a certificate from `ca` for localhost and 127.0.0.1: its default endpoint
/// is `optional`; the returned port is an endpoint with `tls = "required"`. A user `clear`
/// has its password checked in clear text.
fn tls_proxy(
    db: &MariaDb,
    io: &str,
    ca: &TestCa,
    proxy_extra: &str,
    group_extra: &str,
) -> (Proxy, u16) {
    let (cert, key) = ca.issue("proxy", &["localhost", "127.0.0.1"]);
    let required = free_port();
    let proxy = Proxy::start_custom(
        db,
        io,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n{proxy_extra}",
            cert.display(),
            key.display()
        ),
        group_extra,
        &format!(
            "[[endpoints]]\nname = \"required\"\nlisten = \"127.0.0.1:{required}\"\n\
             target_group = \"default\"\ntls = \"required\"\n\n\
             [[users]]\nname = \"clear\"\npassword = \"clear-secret\"\nbackend_user = \"app\"\n\
             backend_password = \"{DB_PASSWORD}\"\nauth_plugin = \"mysql_clear_password\"\n"
        ),
    );
    (proxy, required)
}

/// A mysql-crate connection over TLS, verifying the certificate against `ca`.
fn tls_conn(port: u16, user: &str, password: &str, ca: &Path) -> mysql::Result<mysql::Conn> {
    let ssl = mysql::SslOpts::default().with_root_cert_path(Some(ca.to_path_buf()));
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some("127.0.0.1"))
        .tcp_port(port)
        .user(Some(user))
        .pass(Some(password))
        .db_name(Some("shop"))
        .prefer_socket(false)
        .read_timeout(Some(PATIENCE))
        .ssl_opts(Some(ssl));
    mysql::Conn::new(opts)
}

#[test]
fn clients_log_in_and_query_over_tls() {
    let db = MariaDb::start();
    let ca = TestCa::new("clients");
    let ca_arg = format!("--ssl-ca={}", ca.ca.display());
    for io in DRIVERS {
        let (proxy, required) = tls_proxy(&db, io, &ca, "", "");
        let out = mariadb_cli(
            required,
            "app",
            APP_PASSWORD,
            &["--ssl", &ca_arg, "--ssl-verify-server-cert"],
            "SELECT CONCAT('tls-', 'ok')",
        );
        assert!(
            out.status.success(),
            "[{io}] {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("tls-ok"),
            "[{io}]"
        );
        // Without TLS, the required endpoint refuses as require_secure_transport does.
        let out = mariadb_cli(required, "app", APP_PASSWORD, &["--skip-ssl"], "SELECT 1");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "[{io}] a plain login got through");
        assert!(err.contains("ERROR 3159"), "[{io}] {err}");
        assert!(err.contains("insecure transport"), "[{io}] {err}");
        // The optional endpoint takes both.
        for args in [
            vec!["--skip-ssl"],
            vec!["--ssl", &ca_arg, "--ssl-verify-server-cert"],
        ] {
            let out = mariadb_cli(proxy.port, "app", APP_PASSWORD, &args, "SELECT 7");
            assert!(out.status.success(), "[{io}] {args:?}");
        }
        let py = run_python(
            "tls_clients.py",
            &[
                required.to_string(),
                proxy.port.to_string(),
                ca.ca.display().to_string(),
            ],
        );
        assert_eq!(py.trim(), "OK 5", "[{io}]");
        let java = run_java(
            "TlsClient",
            &[required.to_string(), ca.ca.display().to_string()],
        );
        assert_eq!(java.trim(), "OK 51", "[{io}]");
        let mut c = tls_conn(required, "app", APP_PASSWORD, &ca.ca).unwrap();
        let v: Option<String> = mysql::prelude::Queryable::query_first(
            &mut c,
            "SELECT CONCAT('rust-', @@version_comment IS NOT NULL)",
        )
        .unwrap();
        assert_eq!(v.as_deref(), Some("rust-1"), "[{io}]");
        assert_eq!(proxy.metric("dbproxy_client_connections_tls"), 1, "[{io}]");
        // CLI 2, Python 4 (one refused without TLS), Java 1, Rust 1.
        assert!(
            proxy.metric("dbproxy_client_tls_handshakes_total") >= 8,
            "[{io}] {}",
            proxy.metrics()
        );
        drop(c);
        wait_until("the TLS client to be gone", PATIENCE, || {
            proxy.metric("dbproxy_client_connections_tls") == 0
        });
    }
}

#[test]
fn a_32_mib_blob_and_sysbench_over_tls() {
    raise_fd_limit();
    let db = MariaDb::start();
    let ca = TestCa::new("load");
    db.root_sql("CREATE TABLE shop.blobs (id INT PRIMARY KEY, b LONGBLOB) ENGINE=InnoDB");
    sysbench_prepare(db.port, DB_PASSWORD, "oltp_read_write");
    let secs = std::env::var("DBPROXY_SYSBENCH_SECONDS").unwrap_or_else(|_| "5".into());
    for io in DRIVERS {
        db.root_sql("DELETE FROM shop.blobs");
        let (proxy, required) = tls_proxy(
            &db,
            io,
            &ca,
            "",
            "max_connections = 16\nmax_idle_connections = 16",
        );
        let mut c = tls_conn(required, "app", APP_PASSWORD, &ca.ca).unwrap();
        let blob: Vec<u8> = Rng(7).bytes(32 << 20);
        mysql::prelude::Queryable::exec_drop(
            &mut c,
            "INSERT INTO blobs VALUES (1, ?)",
            (blob.clone(),),
        )
        .unwrap();
        let back: Option<Vec<u8>> =
            mysql::prelude::Queryable::query_first(&mut c, "SELECT b FROM blobs WHERE id = 1")
                .unwrap();
        assert!(
            back.as_ref() == Some(&blob),
            "[{io}] the blob came back different"
        );
        let back: Option<Vec<u8>> =
            mysql::prelude::Queryable::exec_first(&mut c, "SELECT b FROM blobs WHERE id = ?", (1,))
                .unwrap();
        assert!(
            back.as_ref() == Some(&blob),
            "[{io}] the blob came back different (binary)"
        );
        drop(c);
        // sysbench 1.0 reads cacert.pem, client-cert.pem and client-key.pem from its
        // working directory when --mysql-ssl=on.
        let (cert, key) = ca.issue("client", &["sysbench"]);
        std::fs::copy(&ca.ca, ca.dir.path().join("cacert.pem")).unwrap();
        std::fs::copy(&cert, ca.dir.path().join("client-cert.pem")).unwrap();
        std::fs::copy(&key, ca.dir.path().join("client-key.pem")).unwrap();
        let out = sysbench_command(required, APP_PASSWORD)
            .current_dir(ca.dir.path())
            .args([
                "oltp_read_write",
                "run",
                "--threads=16",
                &format!("--time={secs}"),
                "--db-ps-mode=auto",
                "--mysql-ssl=on",
            ])
            .output()
            .expect("sysbench");
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "[{io}] sysbench over TLS: {err}\n{text}"
        );
        assert!(
            !text.contains("FATAL") && !err.contains("FATAL"),
            "[{io}] {err}"
        );
        let tx = text
            .lines()
            .find(|l| l.trim_start().starts_with("transactions:"))
            .unwrap_or_default()
            .to_string();
        println!("[{io}] sysbench oltp_read_write over TLS: {}", tx.trim());
        assert!(
            proxy.metric("dbproxy_client_tls_handshakes_total") >= 17,
            "[{io}] sysbench did not use TLS"
        );
    }
}

#[test]
fn dbproxy_speaks_tls_to_a_server_that_requires_it() {
    let ca = TestCa::new("database");
    let (cert, key) = ca.issue("db", &["localhost", "127.0.0.1"]);
    let db = MariaDb::start_with(&[
        &format!("--ssl-cert={}", cert.display()),
        &format!("--ssl-key={}", key.display()),
        &format!("--ssl-ca={}", ca.ca.display()),
        "--require-secure-transport=ON",
    ]);
    // The server refuses plain TCP logins.
    let out = mariadb_cli(db.port, "app", DB_PASSWORD, &["--skip-ssl"], "SELECT 1");
    assert!(!out.status.success(), "the server took a plain login");
    let client_ca = TestCa::new("clients");
    let ssl_version = "SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS \
                       WHERE VARIABLE_NAME = 'Ssl_version'";
    for io in DRIVERS {
        for (mode, target) in [
            ("verify_ca", format!("127.0.0.1:{}", db.port)),
            ("verify_full", format!("127.0.0.1:{}", db.port)),
            ("verify_full", format!("localhost:{}", db.port)),
            ("preferred", format!("127.0.0.1:{}", db.port)),
        ] {
            let group = format!(
                "targets = [\"{target}\"]\nbackend_tls = \"{mode}\"\nbackend_tls_ca = \"{}\"",
                ca.ca.display()
            );
            let (proxy, required) = tls_proxy(&db, io, &client_ca, "", &group);
            let mut c = tls_conn(required, "app", APP_PASSWORD, &client_ca.ca).unwrap();
            // The backend session's own status: dbproxy's connection to MariaDB is TLS.
            let v: Option<String> =
                mysql::prelude::Queryable::query_first(&mut c, ssl_version).unwrap();
            let v = v.unwrap_or_default();
            assert!(
                v.starts_with("TLSv1."),
                "[{io} {mode} {target}] backend leg: {v:?}"
            );
            assert!(
                proxy.metric("dbproxy_database_connections_tls") >= 1,
                "[{io} {mode} {target}] {}",
                proxy.metrics()
            );
            if mode == "verify_full" && target.starts_with("localhost") {
                // Load on pooled TLS connections: shared between clients, reset, moved
                // between cores, checked at every check-in (verify_checkin).
                if io == DRIVERS[0] {
                    sysbench_prepare(proxy.port, APP_PASSWORD, "oltp_read_write");
                }
                let out = sysbench_command(proxy.port, APP_PASSWORD)
                    .args([
                        "oltp_read_write",
                        "run",
                        "--threads=8",
                        "--time=3",
                        "--db-ps-mode=auto",
                    ])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success() && !text.contains("FATAL"),
                    "[{io}] {text}"
                );
                assert!(
                    proxy.metric("dbproxy_database_tls_handshake_failures_total") == 0,
                    "[{io}]"
                );
            }
        }
        // A CA that did not sign the server's certificate: refused with a log line that
        // says so, and clients get an error at once rather than waiting for a writer.
        let other = TestCa::new("other");
        let group = format!(
            "backend_tls = \"verify_ca\"\nbackend_tls_ca = \"{}\"\nconnection_borrow_timeout = \"120s\"",
            other.ca.display()
        );
        let (proxy, required) = tls_proxy(&db, io, &client_ca, "", &group);
        let err = match tls_conn(required, "app", APP_PASSWORD, &client_ca.ca) {
            Ok(mut c) => mysql::prelude::Queryable::query_drop(&mut c, "SELECT 1")
                .expect_err("a query went through to an untrusted server")
                .to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("certificate") || err.contains("Issuer"),
            "[{io}] {err}"
        );
        assert!(
            !err.contains("timed out") && !err.contains("connection_borrow_timeout"),
            "[{io}] {err}"
        );
        assert!(
            proxy.log().contains("UnknownIssuer"),
            "[{io}] {}",
            proxy.log()
        );
        assert!(
            proxy.metric("dbproxy_database_tls_handshake_failures_total") >= 1,
            "[{io}]"
        );
    }
    // A certificate for another name: verify_ca takes it, verify_full refuses it.
    let (cert2, key2) = ca.issue("db-elsewhere", &["db.example.internal"]);
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    db.root_sql("FLUSH SSL");
    for io in DRIVERS {
        for (mode, ok) in [("verify_ca", true), ("verify_full", false)] {
            let group = format!(
                "backend_tls = \"{mode}\"\nbackend_tls_ca = \"{}\"",
                ca.ca.display()
            );
            let (proxy, required) = tls_proxy(&db, io, &client_ca, "", &group);
            let r = tls_conn(required, "app", APP_PASSWORD, &client_ca.ca)
                .and_then(|mut c| mysql::prelude::Queryable::query_drop(&mut c, "SELECT 1"));
            match (ok, r) {
                (true, Ok(())) => {}
                (false, Err(e)) => {
                    let e = e.to_string();
                    assert!(e.contains("not valid for name"), "[{io} {mode}] {e}");
                }
                (_, r) => panic!("[{io} {mode}] {r:?}\n{}", proxy.log()),
            }
        }
    }
}

#[test]
fn the_certificate_is_reloaded_on_sighup() {
    let db = MariaDb::start();
    let ca = TestCa::new("reload");
    for io in DRIVERS {
        let (proxy, required) = tls_proxy(&db, io, &ca, "", "");
        let first = pem_der(&ca.dir.path().join("proxy.pem"));
        assert_eq!(peer_certificate(required, &ca.ca), first, "[{io}]");
        let mut old = tls_conn(required, "app", APP_PASSWORD, &ca.ca).unwrap();
        mysql::prelude::Queryable::query_drop(&mut old, "SET @kept = 'before'").unwrap();
        // A new pair in the same files, then SIGHUP: new clients see it.
        ca.issue("proxy", &["localhost", "127.0.0.1"]);
        let second = pem_der(&ca.dir.path().join("proxy.pem"));
        assert_ne!(first, second);
        proxy.sighup();
        wait_until("the new certificate", PATIENCE, || {
            peer_certificate(required, &ca.ca) == second
        });
        assert_eq!(
            proxy.metric("dbproxy_tls_certificate_loads_total"),
            2,
            "[{io}]"
        );
        // The client connected before keeps its session.
        let kept: Option<String> =
            mysql::prelude::Queryable::query_first(&mut old, "SELECT @kept").unwrap();
        assert_eq!(kept.as_deref(), Some("before"), "[{io}]");
        // A broken pair is refused and the one in use stays.
        std::fs::write(ca.dir.path().join("proxy.key"), "not a key").unwrap();
        proxy.sighup();
        wait_until("the reload to be refused", PATIENCE, || {
            proxy.log().contains("previous one stays in use")
        });
        assert_eq!(peer_certificate(required, &ca.ca), second, "[{io}]");
        let mut fresh = tls_conn(required, "app", APP_PASSWORD, &ca.ca).unwrap();
        mysql::prelude::Queryable::query_drop(&mut fresh, "SELECT 1").unwrap();
        mysql::prelude::Queryable::query_drop(&mut old, "SELECT 1").unwrap();
        assert_eq!(
            proxy.metric("dbproxy_tls_certificate_loads_total"),
            2,
            "[{io}]"
        );
    }
}

#[test]
fn misbehaving_tls_handshakes_are_closed_and_touch_no_one_else() {
    let db = MariaDb::start();
    let ca = TestCa::new("hostile");
    for io in DRIVERS {
        let (proxy, required) = tls_proxy(&db, io, &ca, "handshake_timeout = \"1s\"", "");
        let mut bystander = tls_conn(required, "app", APP_PASSWORD, &ca.ca).unwrap();
        mysql::prelude::Queryable::query_drop(&mut bystander, "SET @mine = 42").unwrap();
        // Silent after the SSLRequest; and silent halfway through a ClientHello: closed at
        // handshake_timeout.
        for partial in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
            let mut s = TcpStream::connect(("127.0.0.1", required)).unwrap();
            ssl_request(&mut s);
            s.write_all(partial).unwrap();
            let (got, closed) = read_some(&mut s, PATIENCE);
            assert!(
                closed,
                "[{io}] still open after handshake_timeout ({} bytes)",
                got.len()
            );
        }
        // Garbage where the ClientHello should be: an alert at most, then closed.
        let mut s = TcpStream::connect(("127.0.0.1", required)).unwrap();
        ssl_request(&mut s);
        s.write_all(&[b'G'; 300]).unwrap();
        let (got, closed) = read_some(&mut s, PATIENCE);
        assert!(closed, "[{io}] still open after garbage");
        assert!(
            got.is_empty() || got[0] == 0x15,
            "[{io}] answered garbage with {got:?}"
        );
        // A plain handshake response after an SSLRequest (a confused client): closed too.
        let mut s = TcpStream::connect(("127.0.0.1", required)).unwrap();
        ssl_request(&mut s);
        let mut p = vec![40, 0, 0, 2];
        p.extend_from_slice(&[0x85, 0xa6, 0x0f, 0x00]);
        p.extend_from_slice(&[0; 36]);
        s.write_all(&p).unwrap();
        let (_, closed) = read_some(&mut s, PATIENCE);
        assert!(
            closed,
            "[{io}] still open after a plain response inside TLS"
        );
        assert!(
            proxy.metric("dbproxy_client_tls_handshake_failures_total") >= 4,
            "[{io}] {}",
            proxy.metrics()
        );
        let mine: Option<i64> =
            mysql::prelude::Queryable::query_first(&mut bystander, "SELECT @mine").unwrap();
        assert_eq!(mine, Some(42), "[{io}] the bystander lost its session");
    }
}

/// A server config for the stand-in from a certificate the test CA issued.
fn stand_in_tls(cert: &Path, key: &Path) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let chain = vec![rustls::pki_types::CertificateDer::from_pem_file(cert).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap(),
    )
}

#[test]
fn a_server_that_wants_full_authentication_gets_it_over_tls_or_rsa() {
    use proxy_tests::raw::RawClient;
    use proxy_tests::standin::{Auth, StandIn};
    let ca = TestCa::new("mysql84");
    let (cert, key) = ca.issue("standin", &["localhost", "127.0.0.1"]);
    let rsa_key =
        std::sync::Arc::new(rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap());
    for (tls, mode, how) in [
        (Some(stand_in_tls(&cert, &key)), "verify_full", "tls"),
        (None, "disabled", "rsa"),
        // TLS offered but not used by dbproxy: the RSA exchange.
        (Some(stand_in_tls(&cert, &key)), "disabled", "rsa"),
    ] {
        let server = StandIn::start(Auth::Sha2Full {
            password: DB_PASSWORD.into(),
            key: rsa_key.clone(),
            tls,
        });
        for io in DRIVERS {
            server.logins.lock().unwrap().clear();
            let proxy = Proxy::start_at(
                server.port,
                io,
                "verify_checkin = false",
                &format!(
                    "backend_tls = \"{mode}\"\nbackend_tls_ca = \"{}\"",
                    ca.ca.display()
                ),
                "",
            );
            let mut c = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
            c.try_write(0, b"\x03DO 1").unwrap();
            let (_, reply) = c.try_read().unwrap();
            assert_eq!(
                reply.first(),
                Some(&0),
                "[{io} {mode}] {reply:?}\n{}",
                proxy.log()
            );
            let logins = server.logins.lock().unwrap().clone();
            assert!(
                !logins.is_empty(),
                "[{io} {mode}] no login reached the stand-in"
            );
            assert!(logins.iter().all(|l| *l == how), "[{io} {mode}] {logins:?}");
        }
    }
}

#[test]
fn check_config_loads_certificates_keys_and_cas() {
    let ca = TestCa::new("check");
    let (cert, key) = ca.issue("one", &["localhost"]);
    let (_, other_key) = ca.issue("two", &["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let check = |proxy: &str, endpoint: &str, group: &str| {
        let path = dir.path().join("dbproxy.toml");
        std::fs::write(
            &path,
            format!(
                "[proxy]\n{proxy}\n[[endpoints]]\nname = \"e\"\nlisten = \"127.0.0.1:6033\"\ntarget_group = \"g\"\n{endpoint}\n\
                 [[target_groups]]\nname = \"g\"\ntargets = [\"127.0.0.1:3306\"]\n{group}\n\
                 [[users]]\nname = \"app\"\npassword = \"p\"\nbackend_password = \"p\"\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(dbproxy_bin())
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let pair = |c: &Path, k: &Path| {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            c.display(),
            k.display()
        )
    };
    assert_eq!(check(&pair(&cert, &key), "", ""), (true, String::new()));
    let (ok, err) = check(&pair(&dir.path().join("missing.pem"), &key), "", "");
    assert!(
        !ok && err.contains("proxy.tls_cert") && err.contains("missing.pem"),
        "{err}"
    );
    let (ok, err) = check(&pair(&cert, &other_key), "", "");
    assert!(
        !ok && err.contains("do not fit"),
        "a key of another certificate: {err}"
    );
    let (ok, err) = check(&format!("tls_cert = \"{}\"", cert.display()), "", "");
    assert!(!ok && err.contains("tls_key"), "{err}");
    let (ok, err) = check(
        "",
        "",
        "backend_tls = \"verify_ca\"\nbackend_tls_ca = \"/nonexistent/ca.pem\"",
    );
    assert!(
        !ok && err.contains("target_groups[0].backend_tls_ca"),
        "{err}"
    );
    let (ok, err) = check(
        "",
        "",
        "backend_tls = \"verify_full\"\nbackend_tls_ca = \"/etc/hostname\"",
    );
    assert!(!ok && err.contains("/etc/hostname"), "{err}");
    // An endpoint that requires TLS without a certificate to offer.
    let (ok, err) = check("", "tls = \"required\"", "");
    assert!(!ok && err.contains("endpoints[0].tls"), "{err}");
    let (ok, err) = check(&pair(&cert, &key), "tls = \"required\"", "");
    assert!(ok, "{err}");
}
