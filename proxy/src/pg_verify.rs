//! The test-only check-in verifier for PostgreSQL (`[proxy] verify_checkin`): before a
//! server connection goes back to the pool, its session is compared with what dbproxy
//! believes it carries. Its settings must be the ones recorded; its prepared statements
//! the ones recorded; and it must hold no temporary objects, advisory locks, LISTEN
//! channels or open cursors. Any difference is a leak from one client to the next.

use crate::session::pg_statements::ServerStatements;
use crate::session::postgres::{read_back_sql, Settings};

/// The query whose rows [`differences`] reads: `(kind, name, value)`.
pub fn sql(recorded: &Settings) -> String {
    format!(
        "SELECT 'setting', s.name, s.setting FROM ({}) s(name, setting) \
         UNION ALL SELECT 'statement', name, NULL FROM pg_catalog.pg_prepared_statements \
         UNION ALL SELECT 'temporary object', relname::text, NULL FROM pg_catalog.pg_class \
           WHERE relnamespace = pg_catalog.pg_my_temp_schema() \
         UNION ALL SELECT 'advisory lock', objid::text, NULL FROM pg_catalog.pg_locks \
           WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() \
         UNION ALL SELECT 'LISTEN channel', c, NULL FROM pg_catalog.pg_listening_channels() c \
         UNION ALL SELECT 'cursor', name, NULL FROM pg_catalog.pg_cursors",
        read_back_sql(recorded.custom_names())
    )
}

/// What differs between the session the rows describe and the record (empty: clean).
pub fn differences(
    rows: &[Vec<Option<String>>],
    recorded: &Settings,
    statements: &ServerStatements,
    login_user: &str,
) -> Vec<String> {
    let mut found = Vec::new();
    let mut server_statements = 0;
    let settings = Settings::from_rows(
        rows.iter().filter_map(|r| match r.as_slice() {
            [Some(k), Some(n), v] if k == "setting" => Some((n.as_str(), v.as_deref())),
            _ => None,
        }),
        login_user,
    );
    if &settings != recorded {
        found.push(format!("settings {settings:?}, recorded {recorded:?}"));
    }
    let mut sql_on_server = Vec::new();
    for r in rows {
        match r.as_slice() {
            [Some(k), Some(name), _] if k == "statement" => {
                if statements.sql.may_hold(name.as_bytes()) {
                    sql_on_server.push(name.as_bytes());
                    continue;
                }
                server_statements += 1;
                if !statements.contains(name.as_bytes()) {
                    found.push(format!("a prepared statement not recorded: {name}"));
                }
            }
            [Some(k), ..] if k == "setting" => {}
            [Some(k), Some(name), _] => found.push(format!("a {k}: {name}")),
            other => found.push(format!("an unexpected row: {other:?}")),
        }
    }
    if server_statements != statements.len() {
        found.push(format!(
            "{} prepared statements recorded, {server_statements} on the server",
            statements.len()
        ));
    }
    for name in statements.sql.known_names() {
        if !sql_on_server.contains(&name) {
            found.push(format!(
                "an SQL prepared statement recorded but not on the server: {}",
                String::from_utf8_lossy(name)
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(k: &str, n: &str, v: Option<&str>) -> Vec<Option<String>> {
        vec![Some(k.into()), Some(n.into()), v.map(String::from)]
    }

    #[test]
    fn a_clean_session_has_no_differences_and_each_leak_is_named() {
        let recorded = Settings::from_rows([("search_path", Some("a"))], "app");
        let mut clean = vec![
            row("setting", "search_path", Some("a")),
            row("setting", "role", Some("none")),
            row("setting", "session_authorization", Some("app")),
        ];
        let none = ServerStatements::default();
        assert!(differences(&clean, &recorded, &none, "app").is_empty());
        assert!(sql(&recorded).contains("pg_prepared_statements"));

        let mut leaked = clean.clone();
        leaked.push(row("setting", "work_mem", Some("64MB")));
        let d = differences(&leaked, &recorded, &none, "app");
        assert!(d.len() == 1 && d[0].contains("work_mem"), "{d:?}");

        for (kind, name) in [
            ("temporary object", "t1"),
            ("advisory lock", "7"),
            ("LISTEN channel", "jobs"),
            ("cursor", "c"),
        ] {
            let mut dirty = clean.clone();
            dirty.push(row(kind, name, None));
            let d = differences(&dirty, &recorded, &none, "app");
            assert_eq!(d, vec![format!("a {kind}: {name}")]);
        }
        let mut sql = ServerStatements::default();
        sql.sql.holds(
            b"q1",
            Some(std::sync::Arc::from(&b"PREPARE q1 AS SELECT 1"[..])),
        );
        let d = differences(&clean, &recorded, &sql, "app");
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("recorded but not on the server: q1"), "{d:?}");
        clean.push(row("statement", "q1", None));
        assert!(differences(&clean, &recorded, &sql, "app").is_empty());
        clean.push(row("statement", "__dbp1_s1", None));
        let d = differences(&clean, &recorded, &none, "app");
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("not recorded: q1"), "{d:?}");
        assert!(d[1].contains("not recorded: __dbp1_s1"), "{d:?}");
    }
}
