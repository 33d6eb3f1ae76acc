//! `cargo xtask fuzz`: every fuzz target in `fuzz/` built once, then each run for a while,
//! one after the other.
//!
//! Nightly Rust is not needed: cargo-fuzz asks rustc for AddressSanitizer and coverage
//! instrumentation with `-Z` flags, which the stable compiler accepts under
//! `RUSTC_BOOTSTRAP=1` (its sanitizer runtimes ship with the stable toolchain). New inputs
//! go to target/fuzz-corpus/<target> (the kept seeds in fuzz/corpus are read, not grown);
//! a crash's input is copied to fuzz/regressions/<target>/, which the proxy's unit tests
//! replay from then on; executions per target add up in target/fuzz-stats.tsv.

use crate::{cargo, root, Result};
use std::path::Path;

const CARGO_FUZZ: &str = "0.13.2";

/// The targets: one file each in fuzz/fuzz_targets.
fn targets(fuzz: &Path) -> Result<Vec<String>> {
    let dir = fuzz.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// A number libFuzzer printed with `-print_final_stats=1`, e.g. `number_of_executed_units`.
fn stat(log: &str, name: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.strip_prefix(&format!("stat::{name}:")))
        .filter_map(|v| v.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// Executions and seconds per target over every run so far (target/fuzz-stats.tsv).
fn add_totals(file: &Path, target: &str, execs: u64, secs: u64) -> (u64, u64) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut rows: Vec<(String, u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some((
                f.next()?.to_owned(),
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect();
    let total = match rows.iter_mut().find(|r| r.0 == target) {
        Some(r) => {
            r.1 += execs;
            r.2 += secs;
            (r.1, r.2)
        }
        None => {
            rows.push((target.to_owned(), execs, secs));
            (execs, secs)
        }
    };
    let out: String = rows
        .iter()
        .map(|(t, e, s)| format!("{t}\t{e}\t{s}\n"))
        .collect();
    if let Err(e) = std::fs::write(file, out) {
        eprintln!("xtask: {}: {e}", file.display());
    }
    total
}

/// The host's target triple (where `cargo fuzz build` puts its binaries).
fn host_triple() -> Result<String> {
    let out = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .map_err(|e| format!("rustc -vV: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "rustc -vV names no host".to_string())
}

/// Runs every target (or `only`) for `seconds` each.
pub fn fuzz(seconds: u64, only: Option<String>) -> Result {
    crate::ensure_cargo_tool("fuzz", CARGO_FUZZ)?;
    let fuzz = root().join("fuzz");
    let work = root().join("target");
    let mut names = targets(&fuzz)?;
    if let Some(o) = &only {
        names.retain(|n| n == o);
        if names.is_empty() {
            return Err(format!("no fuzz target named {o}"));
        }
    }
    // One build of every target (libFuzzer, AddressSanitizer, coverage), then each binary
    // runs on its own: `cargo fuzz run` per target would build again each time.
    let build = cargo()
        .current_dir(&fuzz)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "build", "-O"])
        .status()
        .map_err(|e| format!("cargo fuzz build: {e}"))?;
    if !build.success() {
        return Err(format!("cargo fuzz build: {build}"));
    }
    let bins = fuzz.join("target").join(host_triple()?).join("release");
    let stats = work.join("fuzz-stats.tsv");
    let mut crashed = Vec::new();
    let mut report = String::from("target\texecutions\tseconds\ttotal executions\ttotal seconds\n");
    for name in &names {
        let corpus = work.join("fuzz-corpus").join(name);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        let artifacts = fuzz.join("artifacts").join(name);
        std::fs::create_dir_all(&artifacts).map_err(|e| e.to_string())?;
        eprintln!("xtask: fuzzing {name} for {seconds} s");
        let out = std::process::Command::new(bins.join(name))
            .current_dir(&fuzz)
            .arg(&corpus)
            .arg(fuzz.join("corpus").join(name))
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .output()
            .map_err(|e| format!("cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let execs = stat(&log, "number_of_executed_units");
        // libFuzzer prints its rate, not its running time.
        let secs = match stat(&log, "average_exec_per_sec") {
            0 => seconds,
            rate => execs / rate,
        };
        let (te, ts) = add_totals(&stats, name, execs, secs);
        report.push_str(&format!("{name}\t{execs}\t{secs}\t{te}\t{ts}\n"));
        if !out.status.success() {
            // Every input libFuzzer saved as a crash becomes a regression input.
            let keep = fuzz.join("regressions").join(name);
            std::fs::create_dir_all(&keep).map_err(|e| e.to_string())?;
            for a in std::fs::read_dir(&artifacts)
                .into_iter()
                .flatten()
                .flatten()
            {
                let to = keep.join(a.file_name());
                std::fs::copy(a.path(), &to).map_err(|e| e.to_string())?;
                eprintln!("xtask: {name}: crash input kept as {}", to.display());
            }
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            crashed.push(name.clone());
        }
    }
    print!("{report}");
    if crashed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzz targets crashed: {} (inputs in fuzz/regressions: fix, then `cargo test -p proxy --lib fuzzing` replays them)",
            crashed.join(", ")
        ))
    }
}
