//! What a reload (SIGHUP, `RELOAD`) may change while clients stay connected, decided
//! without I/O: the new configuration, with every setting that can only change at a
//! restart kept as it runs now (and named).
//!
//! Live: users and their passwords; each target group's `targets` (added ones are checked
//! and used once up, removed ones retired: see [`crate::topology::Topology::change_targets`]),
//! `max_connections`,
//! `max_idle_connections`, `max_connection_lifetime`, `connection_borrow_timeout`,
//! `connect_timeout`, `query_timeout`, `internal_query_timeout`, `session_pinning_filters`;
//! `[proxy]` `idle_client_timeout`, `idle_transaction_timeout`, `handshake_timeout`,
//! `net_read_timeout`, `net_write_timeout`,
//! `max_client_connections`, `max_allowed_packet`, `max_prepared_statements_per_client`,
//! `shutdown_timeout`; the admin login (console and HTTP), `[admin]` `http_auth` and
//! `public_metrics`; the TLS certificate's
//! content (re-read from the same files).

use crate::config::{Config, TargetGroupConfig, UserConfig};

/// The outcome of comparing the running configuration with the file's.
#[derive(Debug)]
pub struct Plan {
    /// What to run with from now on.
    pub config: Config,
    /// Live settings that changed (for the log and `RELOAD`'s answer).
    pub changed: Vec<String>,
    /// Settings that changed in the file but wait for a restart.
    pub restart_needed: Vec<String>,
}

impl Plan {
    /// One line: what changed, what waits for a restart.
    pub fn report(&self) -> String {
        let mut out = if self.changed.is_empty() {
            "nothing changed".to_string()
        } else {
            format!("changed: {}", self.changed.join(", "))
        };
        if !self.restart_needed.is_empty() {
            out += &format!(
                "; needs a restart (kept as running): {}",
                self.restart_needed.join(", ")
            );
        }
        out
    }
}

/// Whether two values differ, as configured (secret references by name and value).
fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

fn user_differs(a: &UserConfig, b: &UserConfig) -> bool {
    a.password != b.password
        || a.password.text() != b.password.text()
        || a.password_hash != b.password_hash
        || a.backend_user != b.backend_user
        || a.backend_user.as_ref().map(|v| v.text()) != b.backend_user.as_ref().map(|v| v.text())
        || a.backend_password != b.backend_password
        || a.backend_password.text() != b.backend_password.text()
        || a.auth_plugin != b.auth_plugin
        || a.aws_iam_arns != b.aws_iam_arns
        || a.jwt_subjects != b.jwt_subjects
}

/// Decides what of `new` applies now; see the module's documentation.
pub fn plan(old: &Config, mut new: Config) -> Plan {
    let mut changed = Vec::new();
    let mut restart = Vec::new();
    // Kept as running unless equal: (key, differs, restore).
    macro_rules! keep {
        ($key:expr, $($field:tt)+) => {
            if differs(&old.$($field)+, &new.$($field)+) {
                restart.push($key.to_string());
                new.$($field)+ = old.$($field)+.clone();
            }
        };
    }
    macro_rules! live {
        ($key:expr, $($field:tt)+) => {
            if differs(&old.$($field)+, &new.$($field)+) {
                changed.push(format!("{} {:?} -> {:?}", $key, old.$($field)+, new.$($field)+));
            }
        };
    }
    keep!("endpoints", endpoints);
    keep!("proxy.workers", proxy.workers);
    keep!("proxy.io", proxy.io);
    keep!("proxy.verify_checkin", proxy.verify_checkin);
    keep!("proxy.tls_cert", proxy.tls_cert);
    keep!("proxy.tls_key", proxy.tls_key);
    keep!(
        "proxy.login_failure_threshold",
        proxy.login_failure_threshold
    );
    keep!("proxy.login_max_delay", proxy.login_max_delay);
    keep!("guard", guard);
    keep!("admin.listen", admin.listen);
    keep!("admin.sql_listen", admin.sql_listen);
    keep!("secrets", secrets);
    keep!("aws_iam", aws_iam);
    keep!("jwt", jwt);
    live!("proxy.idle_client_timeout", proxy.idle_client_timeout);
    live!(
        "proxy.idle_transaction_timeout",
        proxy.idle_transaction_timeout
    );
    live!(
        "proxy.max_prepared_statements_per_client",
        proxy.max_prepared_statements_per_client
    );
    live!("proxy.handshake_timeout", proxy.handshake_timeout);
    live!("proxy.net_read_timeout", proxy.net_read_timeout);
    live!("proxy.net_write_timeout", proxy.net_write_timeout);
    live!("proxy.max_client_connections", proxy.max_client_connections);
    live!("proxy.max_allowed_packet", proxy.max_allowed_packet);
    live!("proxy.shutdown_timeout", proxy.shutdown_timeout);
    if old.admin.admin_user != new.admin.admin_user
        || old.admin.admin_password.text() != new.admin.admin_password.text()
        || old.admin.admin_password_hash != new.admin.admin_password_hash
    {
        changed.push("admin login".into());
    }
    live!("admin.http_auth", admin.http_auth);
    live!("admin.public_metrics", admin.public_metrics);
    // Users: added, removed, changed (passwords never named).
    for u in &new.users {
        match old.users.iter().find(|o| o.name == u.name) {
            None => changed.push(format!("user {} added", u.name)),
            Some(o) if user_differs(o, u) => changed.push(format!("user {} changed", u.name)),
            Some(_) => {}
        }
    }
    for o in &old.users {
        if !new.users.iter().any(|u| u.name == o.name) {
            changed.push(format!("user {} removed", o.name));
        }
    }
    // Target groups: the set and each group's targets and monitoring stay; pool settings
    // apply.
    let names = |c: &Config| {
        c.target_groups
            .iter()
            .map(|g| g.name.clone())
            .collect::<Vec<_>>()
    };
    if names(old) != names(&new) {
        restart.push("target_groups (added, removed or reordered)".into());
        new.target_groups = old.target_groups.clone();
    } else {
        for (o, n) in old.target_groups.iter().zip(new.target_groups.iter_mut()) {
            group(o, n, &mut changed, &mut restart);
        }
    }
    Plan {
        config: new,
        changed,
        restart_needed: restart,
    }
}

fn group(
    old: &TargetGroupConfig,
    new: &mut TargetGroupConfig,
    changed: &mut Vec<String>,
    restart: &mut Vec<String>,
) {
    let k = |f: &str| format!("target_groups[{}].{f}", old.name);
    macro_rules! keep {
        ($field:ident) => {
            if differs(&old.$field, &new.$field) {
                restart.push(k(stringify!($field)));
                new.$field = old.$field.clone();
            }
        };
    }
    macro_rules! live {
        ($field:ident) => {
            if differs(&old.$field, &new.$field) {
                changed.push(format!(
                    "{} {:?} -> {:?}",
                    k(stringify!($field)),
                    old.$field,
                    new.$field
                ));
            }
        };
    }
    live!(targets);
    keep!(init_query);
    keep!(health_check_interval);
    keep!(failure_threshold);
    keep!(max_replication_lag);
    keep!(reader_fallback);
    keep!(monitor_user);
    keep!(monitor_password);
    keep!(backend_tls);
    keep!(backend_tls_ca);
    live!(max_connections);
    live!(max_idle_connections);
    live!(max_connection_lifetime);
    live!(connection_borrow_timeout);
    live!(connect_timeout);
    live!(query_timeout);
    live!(internal_query_timeout);
    live!(session_pinning_filters);
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[proxy]
workers = 2
idle_client_timeout = "1h"

[[endpoints]]
name = "default"
listen = "127.0.0.1:6033"
target_group = "default"

[[target_groups]]
name = "default"
targets = ["127.0.0.1:3306"]
max_connections = 10
max_idle_connections = 4

[[users]]
name = "app"
password = "one"
backend_password = "db"
"#;

    fn cfg(text: &str) -> Config {
        Config::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn same_file_changes_nothing() {
        let p = plan(&cfg(BASE), cfg(BASE));
        assert!(p.changed.is_empty() && p.restart_needed.is_empty(), "{p:?}");
        assert_eq!(p.report(), "nothing changed");
    }

    #[test]
    fn pool_size_targets_and_password_apply_listen_waits() {
        let new = BASE
            .replace("max_connections = 10", "max_connections = 6")
            .replace("password = \"one\"", "password = \"two\"")
            .replace("127.0.0.1:6033", "127.0.0.1:7033")
            .replace("127.0.0.1:3306", "127.0.0.1:3307")
            .replace("workers = 2", "workers = 3");
        let p = plan(&cfg(BASE), cfg(&new));
        assert_eq!(p.config.target_groups[0].max_connections, 6);
        assert_eq!(p.config.users[0].password.text(), "two");
        assert_eq!(p.config.target_groups[0].targets, ["127.0.0.1:3307"]);
        // Kept as running:
        assert_eq!(p.config.endpoints[0].listen, "127.0.0.1:6033");
        assert_eq!(p.config.proxy.workers, 2);
        assert!(
            p.changed
                .iter()
                .any(|c| c.contains("max_connections 10 -> 6")),
            "{p:?}"
        );
        assert!(p.changed.iter().any(|c| c.contains("targets")), "{p:?}");
        assert!(p.changed.contains(&"user app changed".to_string()), "{p:?}");
        assert_eq!(p.restart_needed, ["endpoints", "proxy.workers"]);
        let r = p.report();
        assert!(
            !r.contains("two") && !r.contains("one"),
            "a password in {r}"
        );
    }

    #[test]
    fn users_added_and_removed_are_named() {
        let new = BASE.replace("name = \"app\"", "name = \"web\"");
        let p = plan(&cfg(BASE), cfg(&new));
        assert_eq!(p.changed, ["user web added", "user app removed"]);
    }
}
