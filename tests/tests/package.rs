//! The Debian package (`cargo xtask deb`; `cargo xtask test` makes one of the debug build):
//! it installs with dpkg, its unit passes systemd's checks, its example configuration passes
//! `dbproxy check-config`; removed afterwards.

use proxy_tests::*;
use std::path::PathBuf;
use std::process::Command;

/// The newest package in target/debian, checked to be newer than the binary it carries.
fn package() -> PathBuf {
    let dir = workspace().join("target/debian");
    let deb = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: run `cargo xtask deb --debug` (cargo xtask test does)",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .expect("a .deb in target/debian: run `cargo xtask deb --debug`");
    let built = |p: &PathBuf| p.metadata().and_then(|m| m.modified()).unwrap();
    assert!(
        built(&deb) >= built(&dbproxy_bin()),
        "{} is older than {}: run `cargo xtask deb --debug`",
        deb.display(),
        dbproxy_bin().display()
    );
    deb
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Purges the package however the test ends.
struct Installed;
impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "dbproxy"]).output();
    }
}

#[test]
fn the_debian_package_installs_and_its_example_configuration_checks() {
    let deb = package();
    let _installed = Installed;
    run(Command::new("dpkg").arg("-i").arg(&deb));
    let unit = "/usr/lib/systemd/system/dbproxy.service";
    let config = "/etc/dbproxy/dbproxy.toml";
    for f in [
        "/usr/bin/dbproxy",
        unit,
        config,
        "/usr/share/doc/dbproxy/README.md",
    ] {
        assert!(std::path::Path::new(f).exists(), "{f} not installed");
    }
    // The example holds passwords: root's only.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640, "{config} mode {mode:o}");
    // The unit as systemd reads it, and the capabilities it keeps.
    run(Command::new("systemd-analyze").args(["verify", unit]));
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(
        text.contains("CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON"),
        "{text}"
    );
    let out = run(Command::new("/usr/bin/dbproxy").args(["check-config", "--config", config]));
    assert!(out.contains(": ok"), "{out}");
    // The installed binary is the one built here, with the guard in it (the example enables it).
    let help = run(Command::new("/usr/bin/dbproxy").arg("--help"));
    assert!(help.contains("check-config"), "{help}");
    println!("installed {} and checked {config}", deb.display());
}
