//! The command line: help texts and config errors.

use std::process::Command;

fn pgferry(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(args)
        .output()
        .expect("run pgferry");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_describes_the_commands() {
    let (ok, out, _) = pgferry(&["--help"]);
    assert!(ok);
    for word in ["run", "sandbox", "PostgreSQL"] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
    let (ok, out, _) = pgferry(&["run", "--help"]);
    assert!(ok);
    assert!(out.contains("--config"), "{out}");
    let (ok, out, _) = pgferry(&["sandbox", "--help"]);
    assert!(ok);
    for flag in ["--dir", "--port", "--admin-port", "--user", "--password"] {
        assert!(out.contains(flag), "sandbox --help lacks {flag}:\n{out}");
    }
}

#[test]
fn bad_config_names_file_key_and_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[proxy]\nlisten = \"127.0.0.1:6432\"\nmax_client_connections = \"many\"\n\
         [auth]\nuserlist = \"users.txt\"\n[[backend]]\nname = \"pg1\"\naddress = \"127.0.0.1:5432\"\n",
    )
    .expect("write");
    let (ok, _, err) = pgferry(&["run", "--config", path.to_str().expect("path")]);
    assert!(!ok);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("proxy.max_client_connections"), "{err}");
    assert!(err.contains("invalid type"), "{err}");

    let (ok, _, err) = pgferry(&["run", "--config", "/nonexistent/pgferry.toml"]);
    assert!(!ok);
    assert!(
        err.contains("/nonexistent/pgferry.toml") && err.contains("cannot read"),
        "{err}"
    );

    // A valid file naming a userlist that does not exist.
    std::fs::write(
        &path,
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[auth]\nuserlist = \"missing.txt\"\n\
         [[backend]]\nname = \"pg1\"\naddress = \"127.0.0.1:5432\"\n",
    )
    .expect("write");
    let (ok, _, err) = pgferry(&["run", "--config", path.to_str().expect("path")]);
    assert!(!ok);
    assert!(err.contains("missing.txt"), "{err}");
}
