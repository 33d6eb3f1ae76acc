//! The mariadb command-line client through dbproxy, compared with the same client
//! connected straight to MariaDB.

use proxy_tests::*;

fn both(
    db: &MariaDb,
    proxy: &Proxy,
    args: &[&str],
    sql: &str,
) -> (std::process::Output, std::process::Output) {
    let direct = mariadb_cli(db.port, "app", DB_PASSWORD, args, sql);
    let through = mariadb_cli(proxy.port, "app", APP_PASSWORD, args, sql);
    (direct, through)
}

#[test]
fn queries_use_and_errors_match_direct() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 10\nmax_idle_connections = 10");
        let sql =
            "SELECT 1+1 AS two, 'x' AS s, NULL AS n, 3.25 AS d, CAST('2024-02-29' AS DATE) AS dt; \
                   USE shop2; SELECT DATABASE(); SHOW TABLES";
        let (direct, through) = both(&db, &proxy, &["-B"], sql);
        assert!(
            through.status.success(),
            "[{io}] {}",
            String::from_utf8_lossy(&through.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&through.stdout),
            String::from_utf8_lossy(&direct.stdout),
            "[{io}]"
        );
        assert!(String::from_utf8_lossy(&through.stdout).contains("shop2"));

        // A syntax error arrives with the same code, SQLSTATE and message.
        let (direct, through) = both(&db, &proxy, &[], "SELEC x");
        assert!(!through.status.success());
        let e = String::from_utf8_lossy(&through.stderr);
        assert!(e.contains("ERROR 1064 (42000)"), "[{io}] {e}");
        assert_eq!(e, String::from_utf8_lossy(&direct.stderr), "[{io}]");

        // An unknown database at login is refused as MariaDB refuses it.
        let d = mariadb_cli(db.port, "app", DB_PASSWORD, &["nosuchdb"], "SELECT 1");
        let t = mariadb_cli(proxy.port, "app", APP_PASSWORD, &["nosuchdb"], "SELECT 1");
        assert_eq!(
            String::from_utf8_lossy(&t.stderr),
            String::from_utf8_lossy(&d.stderr),
            "[{io}]"
        );
        assert!(String::from_utf8_lossy(&t.stderr).contains("1049"));

        // The database given at login is used.
        let t = mariadb_cli(
            proxy.port,
            "app",
            APP_PASSWORD,
            &["-N", "shop"],
            "SELECT DATABASE()",
        );
        assert_eq!(String::from_utf8_lossy(&t.stdout).trim(), "shop", "[{io}]");
    }
}

#[test]
fn multi_statements_return_every_result_set() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.m (id INT PRIMARY KEY, v VARCHAR(10)); INSERT INTO shop.m VALUES (1,'a'),(2,'b')");
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "");
        let sql = "SELECT * FROM shop.m; SELECT COUNT(*) FROM shop.m; DO 1; SELECT 'last'; \
                   UPDATE shop.m SET v='a' WHERE id=1; SELECT ROW_COUNT()";
        let (direct, through) = both(&db, &proxy, &["-B", "-vvv"], sql);
        assert!(
            through.status.success(),
            "[{io}] {}",
            String::from_utf8_lossy(&through.stderr)
        );
        let strip = |o: &std::process::Output| {
            // -vvv prints timings; compare everything else.
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.split(" (").next().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&through), strip(&direct), "[{io}]");
        let out = String::from_utf8_lossy(&through.stdout);
        assert!(out.contains("last") && out.contains("ROW_COUNT()"), "{out}");
        // A statement failing in the middle stops the batch the same way.
        let (direct, through) = both(&db, &proxy, &["-B"], "SELECT 1; SELEC 2; SELECT 3");
        assert_eq!(through.stdout, direct.stdout, "[{io}]");
        assert_eq!(through.stderr, direct.stderr, "[{io}]");
    }
}

#[test]
fn blob_of_32_mib_round_trips() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.blobs (id INT PRIMARY KEY, b LONGBLOB)");
    let n = 32 * 1024 * 1024;
    let mut value = Vec::with_capacity(n);
    let mut x: u32 = 12345;
    for _ in 0..n {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        value.push(b'a' + ((x >> 16) % 26) as u8);
    }
    for (i, io) in DRIVERS.iter().enumerate() {
        let proxy = Proxy::start(&db, io, "");
        let mut sql = format!("INSERT INTO shop.blobs VALUES ({i}, '").into_bytes();
        sql.extend_from_slice(&value);
        sql.extend_from_slice(b"');\n");
        let ins = mariadb_cli_stdin(
            proxy.port,
            "app",
            APP_PASSWORD,
            &["--max-allowed-packet=64M"],
            &sql,
        );
        assert!(
            ins.status.success(),
            "[{io}] insert: {}",
            String::from_utf8_lossy(&ins.stderr)
        );
        let sel = format!("SELECT b FROM shop.blobs WHERE id={i}");
        let args = ["--max-allowed-packet=64M", "-N", "-B", "-r"];
        let through = mariadb_cli(proxy.port, "app", APP_PASSWORD, &args, &sel);
        assert!(
            through.status.success(),
            "[{io}] select: {}",
            String::from_utf8_lossy(&through.stderr)
        );
        assert_eq!(through.stdout.len(), n + 1, "[{io}]");
        assert!(
            through.stdout[..n] == value[..],
            "[{io}] the blob came back different"
        );
        let direct = mariadb_cli(db.port, "app", DB_PASSWORD, &args, &sel);
        assert!(direct.stdout == through.stdout);
    }
}

#[test]
fn load_data_local_infile() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.li (id INT PRIMARY KEY, v VARCHAR(20))");
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("rows.csv");
    let rows: String = (0..5000).map(|i| format!("{i},value-{i}\n")).collect();
    std::fs::write(&csv, rows).unwrap();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "");
        let sql = format!(
            "DELETE FROM shop.li; LOAD DATA LOCAL INFILE '{}' INTO TABLE shop.li FIELDS TERMINATED BY ','; \
             SELECT COUNT(*), SUM(id), MAX(v) FROM shop.li",
            csv.display()
        );
        let out = mariadb_cli(
            proxy.port,
            "app",
            APP_PASSWORD,
            &["--local-infile=1", "-N", "-B"],
            &sql,
        );
        assert!(
            out.status.success(),
            "[{io}] {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "5000\t12497500\tvalue-999",
            "[{io}]"
        );
        // A missing local file: the client sends an empty file and the error is the same.
        let sql = "LOAD DATA LOCAL INFILE '/nonexistent/x.csv' INTO TABLE shop.li";
        let (direct, through) = both(&db, &proxy, &["--local-infile=1"], sql);
        assert_eq!(through.stderr, direct.stderr, "[{io}]");
        // The session still works after the exchange.
        let batch = format!("{sql};\nSELECT 7;\n");
        let args = ["--local-infile=1", "-N", "--force"];
        let after = mariadb_cli_stdin(proxy.port, "app", APP_PASSWORD, &args, batch.as_bytes());
        let direct = mariadb_cli_stdin(db.port, "app", DB_PASSWORD, &args, batch.as_bytes());
        assert_eq!(String::from_utf8_lossy(&after.stdout).trim(), "7", "[{io}]");
        assert_eq!(after.stderr, direct.stderr, "[{io}]");
    }
}

#[test]
fn caching_sha2_client_and_wrong_password() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "");
        for plugin in ["mysql_native_password", "caching_sha2_password"] {
            let auth = format!("--default-auth={plugin}");
            let ok = mariadb_cli(
                proxy.port,
                "app",
                APP_PASSWORD,
                &[&auth, "-N"],
                "SELECT CURRENT_USER()",
            );
            assert!(
                ok.status.success(),
                "[{io}] {plugin}: {}",
                String::from_utf8_lossy(&ok.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "app@%");
            let bad = mariadb_cli(proxy.port, "app", "wrong", &[&auth], "SELECT 1");
            let e = String::from_utf8_lossy(&bad.stderr);
            assert!(e.contains("ERROR 1045 (28000): Access denied for user 'app'@'127.0.0.1' (using password: YES)"), "{e}");
        }
        // The user that requires caching_sha2_password gets the CLI switched to it.
        let ok = mariadb_cli(proxy.port, "sha2user", "sha2-secret", &["-N"], "SELECT 1");
        assert!(
            ok.status.success(),
            "[{io}] {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        // An unknown user gets exactly the same refusal as a wrong password.
        let bad = mariadb_cli(proxy.port, "nobody", "x", &[], "SELECT 1");
        let e = String::from_utf8_lossy(&bad.stderr);
        assert!(e.contains("ERROR 1045 (28000): Access denied for user 'nobody'@'127.0.0.1' (using password: YES)"), "{e}");
    }
}
