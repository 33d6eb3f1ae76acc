//! AWS: database credentials from Secrets Manager, rotated under load in both orders, and
//! logins with IAM tokens, against moto's server on 127.0.0.1 standing in for AWS.

use proxy_tests::aws::Moto;
use proxy_tests::*;
use std::time::Duration;

const CLIENT_PW: [&str; 2] = ["aws-client-pw-5d1e", "aws-client-pw-e3b9"];

fn db_secret(user: &str, pw: &str) -> String {
    format!(r#"{{"engine":"mariadb","username":"{user}","password":"{pw}"}}"#)
}

/// The database user's password changes while 16 sysbench threads run through dbproxy, on
/// a pool whose connections live 300 ms (so new logins go on all the time): first the way
/// a Secrets Manager rotation function does it (new version as AWSPENDING, ALTER USER,
/// AWSCURRENT moved), then secret first (new AWSCURRENT, refreshed by dbproxy, ALTER USER
/// later). No client sees an error, nothing restarts, the client password follows its own
/// secret, and no secret appears in the log.
#[test]
fn a_secrets_manager_rotation_in_either_order_fails_no_client() {
    raise_fd_limit();
    let db = MariaDb::start();
    sysbench_prepare(db.port, DB_PASSWORD, "oltp_read_only");
    let moto = Moto::start();
    for (i, io) in DRIVERS.iter().enumerate() {
        let user = format!("rotator{i}");
        let pw = [
            format!("rot-pw-one-{i}-7f3a"),
            format!("rot-pw-two-{i}-91c2"),
            format!("rot-pw-three-{i}-c04e"),
        ];
        for s in pw.iter().map(String::as_str).chain(CLIENT_PW) {
            never_logged(s);
        }
        db.root_sql(&format!(
            "CREATE USER {user}@'%' IDENTIFIED BY '{}'; GRANT ALL ON shop.* TO {user}@'%';",
            pw[0]
        ));
        let (db_id, client_id) = (format!("app-db-{i}"), format!("app-client-{i}"));
        moto.secrets(&["create", &db_id, &db_secret(&user, &pw[0])]);
        moto.secrets(&["create", &client_id, CLIENT_PW[0]]);
        let sections = format!(
            r#"
[[users]]
name = "rotating"
password = {{ secret = "client" }}
backend_user = {{ secret = "db" }}
backend_password = {{ secret = "db" }}

[[secrets]]
name = "db"
provider = "aws_secrets_manager"
secret_id = "{db_id}"
region = "us-east-1"
endpoint_url = "{endpoint}"
refresh = "2s"

[[secrets]]
name = "client"
provider = "aws_secrets_manager"
secret_id = "{client_id}"
endpoint_url = "{endpoint}"
refresh = "2s"
"#,
            endpoint = moto.endpoint()
        );
        let proxy = Proxy::start_env(
            db.port,
            io,
            "",
            "max_connections = 16\nmax_idle_connections = 16\nmax_connection_lifetime = \"300ms\"",
            &sections,
            &moto.env(),
        );
        let whoami = |password: &str| {
            mariadb_cli(
                proxy.port,
                "rotating",
                password,
                &[],
                "SELECT CURRENT_USER()",
            )
        };
        let out = whoami(CLIENT_PW[0]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("{user}@%")),
            "[{io}] {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The load runs in short sysbench runs until both rotations are over, so that it
        // covers them however long moto and the refreshes take.
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let finished = std::sync::Arc::new(AtomicUsize::new(0));
        let load = {
            let (stop, finished, port) = (stop.clone(), finished.clone(), proxy.port);
            std::thread::spawn(move || {
                let mut runs = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut bench = sysbench_command(port, CLIENT_PW[0]);
                    bench
                        .args(["--mysql-user=rotating", "oltp_read_only", "run"])
                        .args(["--threads=16", "--time=2", "--db-ps-mode=auto"]);
                    runs.push(bench.output().unwrap());
                    finished.fetch_add(1, Ordering::Relaxed);
                }
                runs
            })
        };
        let pause = |s: u64| std::thread::sleep(Duration::from_secs(s));
        let alter = |p: &str| db.root_sql(&format!("ALTER USER {user}@'%' IDENTIFIED BY '{p}'"));
        let switched = || {
            proxy
                .log()
                .matches("the database accepted another version of the secret")
                .count()
        };
        pause(3);
        // A rotation function's order: AWSPENDING, the database, then AWSCURRENT.
        moto.secrets(&["put", &db_id, &db_secret(&user, &pw[1]), "pending"]);
        pause(1);
        alter(&pw[1]);
        wait_until(
            "a new login to meet the first rotation",
            Duration::from_secs(20),
            || switched() >= 1,
        );
        moto.secrets(&["promote", &db_id]);
        pause(3);
        let first = switched();
        // Secret first: AWSCURRENT moves, dbproxy refreshes it before the database has it.
        // (Staged and promoted: moto's put_secret_value after a stage move leaves two
        // versions labelled AWSCURRENT.)
        moto.secrets(&["put", &db_id, &db_secret(&user, &pw[2]), "pending"]);
        let changes = proxy.log().matches("secret changed").count();
        moto.secrets(&["promote", &db_id]);
        wait_until(
            "dbproxy to refresh the new value",
            Duration::from_secs(20),
            || proxy.log().matches("secret changed").count() > changes,
        );
        pause(1);
        alter(&pw[2]);
        wait_until(
            "a new login to meet the second rotation",
            Duration::from_secs(20),
            || switched() > first,
        );
        // One whole run after the database has the last password, then the load stops.
        let at_alter = finished.load(Ordering::Relaxed);
        wait_until(
            "a whole sysbench run after the second rotation",
            Duration::from_secs(30),
            || finished.load(Ordering::Relaxed) >= at_alter + 2,
        );
        stop.store(true, Ordering::Relaxed);
        let runs = load.join().unwrap();
        for (n, out) in runs.iter().enumerate() {
            let text = sysbench_report(&format!("[{io}] run {n}"), out);
            assert!(
                sysbench_field(&text, "ignored errors:")
                    .starts_with("ignored errors:                      0 "),
                "[{io}] {text}"
            );
        }
        let log = proxy.log();
        let refused = log.matches("the database refused the login").count();
        println!(
            "[{io}] sysbench runs: {}, logins refused then retried: {refused}, versions switched: {} then {}",
            runs.len(),
            first,
            switched()
        );
        assert!(refused >= 2, "[{io}] {log}");
        // After both: new logins use the last password.
        let out = whoami(CLIENT_PW[0]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("{user}@%")),
            "[{io}] {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The client password follows its secret (refreshed every 2 s).
        moto.secrets(&["put", &client_id, CLIENT_PW[1]]);
        wait_until(
            "the client password to rotate",
            Duration::from_secs(20),
            || whoami(CLIENT_PW[1]).status.success(),
        );
        let out = whoami(CLIENT_PW[0]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ERROR 1045"),
            "[{io}] the old client password still works"
        );

        let log = proxy.log();
        for secret in pw.iter().map(String::as_str).chain(CLIENT_PW) {
            assert!(!log.contains(secret), "[{io}] a secret in the log");
        }
    }
}
