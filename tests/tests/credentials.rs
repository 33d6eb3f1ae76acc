//! Credentials: users known by their password hashes only (`password_hash`, from
//! `dbproxy hash-password`).

use proxy_tests::*;
use std::io::Write;
use std::process::{Command, Stdio};

/// `dbproxy hash-password` with `password` on standard input.
fn hash_password(password: &str) -> String {
    let mut child = Command::new(dbproxy_bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn users_known_by_their_password_hash_log_in_with_every_plugin() {
    let db = MariaDb::start();
    let hash = hash_password(&never_logged("hashed-secret"));
    // The first part is what MariaDB's PASSWORD() computes.
    let native = db.root_sql("SELECT PASSWORD('hashed-secret')");
    assert_eq!(hash.split(' ').next(), Some(native.trim()), "{hash}");
    for io in DRIVERS {
        let proxy = Proxy::start_custom(
            &db,
            io,
            "",
            "",
            &format!(
                "[[users]]\nname = \"hashed\"\npassword_hash = \"{hash}\"\nbackend_user = \"app\"\n\
                 backend_password = \"{DB_PASSWORD}\"\n\n\
                 [[users]]\nname = \"hashed_sha2\"\npassword_hash = \"{hash}\"\nbackend_user = \"app\"\n\
                 backend_password = \"{DB_PASSWORD}\"\nauth_plugin = \"caching_sha2_password\"\n\n\
                 [[users]]\nname = \"native_only\"\npassword_hash = \"{}\"\nbackend_user = \"app\"\n\
                 backend_password = \"{DB_PASSWORD}\"\n",
                native.trim()
            ),
        );
        let config = std::fs::read_to_string(&proxy.config).unwrap();
        assert!(!config.contains("hashed-secret"));
        for user in ["hashed", "hashed_sha2", "native_only"] {
            let out = mariadb_cli(
                proxy.port,
                user,
                "hashed-secret",
                &[],
                "SELECT CURRENT_USER()",
            );
            assert!(
                out.status.success(),
                "[{io}] {user}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = mariadb_cli(proxy.port, user, "wrong", &[], "SELECT 1");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("ERROR 1045"), "[{io}] {user}: {err}");
        }
        // caching_sha2_password answers (the Rust mysql crate offers the plugin the server
        // names; dbproxy switches hashed_sha2 to it) and the mysql crate's native login.
        for user in ["hashed", "hashed_sha2", "native_only"] {
            let mut c = connect(proxy.port, user, "hashed-secret", "shop")
                .unwrap_or_else(|e| panic!("[{io}] {user}: {e}"));
            let v: Option<i64> =
                mysql::prelude::Queryable::query_first(&mut c, "SELECT 41 + 1").unwrap();
            assert_eq!(v, Some(42), "[{io}] {user}");
        }
        assert!(
            !proxy.log().contains("hashed-secret"),
            "[{io}] a password in the log"
        );
    }
}

#[test]
fn a_change_of_user_is_throttled_and_logged_as_a_login_is() {
    use mysql::prelude::Queryable;
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start_full(
            &db,
            io,
            "login_failure_threshold = 1\nlogin_max_delay = \"200ms\"",
            "",
        );
        let mut a = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let mut b = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        // A wrong password in COM_CHANGE_USER: refused, logged, counted against the address.
        let wrong = mysql::ChangeUserOpts::default()
            .with_user(Some("app".into()))
            .with_pass(Some("wrong".into()));
        match a.change_user(wrong) {
            Err(mysql::Error::MySqlError(e)) => assert_eq!(e.code, 1045, "[{io}] {e}"),
            other => panic!("[{io}] a wrong password must get 1045: {other:?}"),
        }
        assert!(
            proxy.log().contains("access denied for app"),
            "[{io}] the refusal is logged: {}",
            proxy.log()
        );
        // The address is over the threshold now: a right password waits for its verdict
        // too (time does not tell the two apart), and then clears the address.
        let before = proxy.metric("dbproxy_client_logins_delayed_total");
        let right = mysql::ChangeUserOpts::default()
            .with_user(Some("nativeuser".into()))
            .with_pass(Some("native-secret".into()))
            .with_db_name(Some("shop2".into()));
        b.change_user(right.clone()).unwrap();
        assert_eq!(
            proxy.metric("dbproxy_client_logins_delayed_total"),
            before + 1,
            "[{io}] the change of user waited"
        );
        let d: Option<String> = b.query_first("SELECT DATABASE()").unwrap().flatten();
        assert_eq!(d.as_deref(), Some("shop2"), "[{io}]");
        b.change_user(right).unwrap();
        assert_eq!(
            proxy.metric("dbproxy_client_logins_delayed_total"),
            before + 1,
            "[{io}] a success cleared the address"
        );
    }
}

#[test]
fn repeated_failures_slow_their_address_down_and_no_other() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start_full(
            &db,
            io,
            "login_failure_threshold = 3\nlogin_max_delay = \"200ms\"",
            "",
        );
        // 1,000 wrong passwords from 127.0.0.1, 20 at a time.
        let port = proxy.port;
        let attackers: Vec<_> = (0..20)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| {
                            proxy_tests::raw::RawClient::login(port, "app", "guess")
                                .err()
                                .is_some_and(|e| e.to_string().contains("Access denied"))
                        })
                        .count()
                })
            })
            .collect();
        // Meanwhile a client from another address logs in and is not made to wait.
        wait_until(
            "the throttle to start",
            std::time::Duration::from_secs(30),
            || proxy.metric("dbproxy_client_logins_delayed_total") > 0,
        );
        let opts = mysql::OptsBuilder::new()
            .ip_or_hostname(Some("127.0.0.1"))
            .tcp_port(port)
            .user(Some("app"))
            .pass(Some(APP_PASSWORD))
            .prefer_socket(false)
            .bind_address(Some("127.0.0.2:0".parse::<std::net::SocketAddr>().unwrap()));
        let mut other = mysql::Conn::new(opts).unwrap();
        let v: Option<i64> =
            mysql::prelude::Queryable::query_first(&mut other, "SELECT 1").unwrap();
        assert_eq!(v, Some(1), "[{io}]");
        let refused: usize = attackers.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(refused, 1000, "[{io}] every guess gets 1045");
        assert_eq!(
            proxy.metric("dbproxy_client_login_failures_total"),
            1000,
            "[{io}]"
        );
        // All but the first few (and those already past their wait when the threshold was
        // reached) waited, each up to 200 ms.
        let delayed = proxy.metric("dbproxy_client_logins_delayed_total");
        assert!(delayed >= 1000 - 3 - 20, "[{io}] {delayed} logins waited");
        let log = proxy.log();
        assert!(
            !log.lines()
                .any(|l| l.contains("waits") && l.contains("127.0.0.2")),
            "[{io}] the other address was made to wait"
        );
        // A successful login from the throttled address clears it (after its own wait).
        proxy_tests::raw::RawClient::login(port, "app", APP_PASSWORD).unwrap();
        let before = proxy.metric("dbproxy_client_logins_delayed_total");
        proxy_tests::raw::RawClient::login(port, "app", APP_PASSWORD).unwrap();
        assert_eq!(
            proxy.metric("dbproxy_client_logins_delayed_total"),
            before,
            "[{io}]"
        );
    }
}

#[test]
fn secrets_from_files_environment_and_programs() {
    use std::os::unix::fs::PermissionsExt;
    let db = MariaDb::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.json");
    std::fs::write(
        &file,
        format!(
            "{{\"username\": \"app\", \"password\": \"{DB_PASSWORD}\", \"engine\": \"mariadb\"}}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The harness spawns dbproxy with this process's environment.
    never_logged("exec-client-secret");
    std::env::set_var(
        "DBPROXY_TEST_CLIENT_SECRET",
        never_logged("env-client-secret"),
    );
    let secrets = format!(
        "[[secrets]]\nname = \"db\"\nprovider = \"file\"\npath = \"{}\"\n\n\
         [[secrets]]\nname = \"client\"\nprovider = \"env\"\nvar = \"DBPROXY_TEST_CLIENT_SECRET\"\n\n\
         [[secrets]]\nname = \"program\"\nprovider = \"exec\"\ncommand = [\"printf\", \"%s\", \"exec-client-secret\"]\n\n\
         [[secrets]]\nname = \"program_db\"\nprovider = \"exec\"\ncommand = [\"printf\", \"%s\", \"{DB_PASSWORD}\"]\n\n\
         [[users]]\nname = \"from_env\"\npassword = {{ secret = \"client\" }}\n\
         backend_user = {{ secret = \"db\" }}\nbackend_password = {{ secret = \"db\" }}\n\n\
         [[users]]\nname = \"from_exec\"\npassword = {{ secret = \"program\" }}\n\
         backend_user = \"app\"\nbackend_password = {{ secret = \"program_db\" }}\n",
        file.display()
    );
    for io in DRIVERS {
        let proxy = Proxy::start_custom(&db, io, "", "", &secrets);
        for (user, password) in [
            ("from_env", "env-client-secret"),
            ("from_exec", "exec-client-secret"),
        ] {
            let out = mariadb_cli(proxy.port, user, password, &[], "SELECT CURRENT_USER()");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("app@"),
                "[{io}] {user}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let log = proxy.log();
        for secret in ["env-client-secret", "exec-client-secret", DB_PASSWORD] {
            assert!(!log.contains(secret), "[{io}] a secret in the log");
        }
    }
    // A secret file others may read is refused, by check-config and at start, naming it.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("dbproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[[endpoints]]\nname = \"e\"\nlisten = \"127.0.0.1:{}\"\ntarget_group = \"g\"\n\
             [[target_groups]]\nname = \"g\"\ntargets = [\"127.0.0.1:{}\"]\n\n{secrets}",
            free_port(),
            db.port
        ),
    )
    .unwrap();
    for cmd in ["check-config", "run"] {
        let out = Command::new(dbproxy_bin())
            .args([cmd, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{cmd} accepted a readable secret file"
        );
        assert!(
            err.contains(&file.display().to_string()) && err.contains("chmod 600"),
            "{cmd}: {err}"
        );
        assert!(
            !err.contains(DB_PASSWORD),
            "{cmd}: the secret in the message"
        );
    }
}
