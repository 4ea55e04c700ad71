//! The command line teaches: every subcommand has help, and the binary exists for the
//! end-to-end tests in `tests/` (cargo builds it for this integration test).

use std::process::Command;

#[test]
fn export_help_names_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_nbdmirror"))
        .args(["export", "--help"])
        .output()
        .expect("run nbdmirror");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--image",
        "--name",
        "--listen",
        "--read-only",
        "--create",
        "--io-engine",
        "Examples",
    ] {
        assert!(text.contains(flag), "export --help lacks {flag}:\n{text}");
    }
}

#[test]
fn unknown_subcommand_fails_with_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_nbdmirror"))
        .arg("frobnicate")
        .output()
        .expect("run nbdmirror");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}
