//! dbproxy: a MySQL/MariaDB connection proxy that authenticates clients itself and serves
//! them over a pool of warm backend connections.

pub mod admin;
pub mod auth;
pub mod aws;
pub mod backend_conn;
pub mod backend_script;
pub mod clients;
pub mod config;
pub mod conn;
pub mod event_loop;
pub mod fleet;
pub mod fuzzing;
pub mod guard;
pub mod io;
pub mod mysql;
pub mod pg_cancel;
pub mod pg_conn;
pub mod pg_pool;
pub mod pg_server;
pub mod pg_verify;
pub mod pool;
pub mod postgres;
pub mod relay;
pub mod reload;
pub mod routing;
pub mod rt;
pub mod runtime;
pub mod secrets;
pub mod serving;
pub mod session;
pub mod shared;
pub mod stats;
pub mod target;
pub mod tenants;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod tls;
pub mod topology;

#[cfg(test)]
mod layering {
    //! No module imports one that imports it back: the rooms form layers.

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The room a file belongs to: its top-level module, or `session::x` for the
    /// sans-IO session's parts (which must not import each other in a circle either).
    fn room(rel: &Path) -> Option<String> {
        let parts: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let last = parts.last()?;
        if last == "tests" || parts.len() == 1 && (last == "lib" || last == "main") {
            return None;
        }
        let parts: Vec<&str> = parts
            .iter()
            .map(String::as_str)
            .filter(|p| *p != "mod")
            .collect();
        match parts.as_slice() {
            ["session", sub, ..] => Some(format!("session::{sub}")),
            [top, ..] => Some(top.to_string()),
            [] => None,
        }
    }

    /// The rooms a file's code (comments and test modules left out) refers to.
    fn uses(src: &str, root: &Path) -> BTreeSet<String> {
        let code: String = src
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default()
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let mut out = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let path: Vec<&str> = code[i + 7..]
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or_default()
                .split("::")
                .collect();
            match path.as_slice() {
                ["session", sub, ..] if root.join("session").join(format!("{sub}.rs")).exists() => {
                    out.insert(format!("session::{sub}"));
                }
                [top, ..] if !top.is_empty() => {
                    out.insert(top.to_string());
                }
                _ => {}
            }
        }
        out
    }

    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn no_module_imports_one_that_imports_it() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&root, &mut all);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in all {
            let Some(from) = room(f.strip_prefix(&root).unwrap()) else {
                continue;
            };
            let src = std::fs::read_to_string(&f).unwrap();
            let deps = graph.entry(from.clone()).or_default();
            deps.extend(uses(&src, &root).into_iter().filter(|d| *d != from));
        }
        // A cycle shows as a room that reaches itself.
        for start in graph.keys() {
            let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
            let mut seen = BTreeSet::new();
            while let Some((at, path)) = stack.pop() {
                for next in graph.get(&at).into_iter().flatten() {
                    assert!(
                        next != start,
                        "import cycle: {} -> {start}",
                        path.join(" -> ")
                    );
                    if seen.insert(next.clone()) {
                        let mut p = path.clone();
                        p.push(next.clone());
                        stack.push((next.clone(), p));
                    }
                }
            }
        }
        assert!(graph.len() > 20, "the rooms were found: {:?}", graph.keys());
    }
}
