//! The `cairn` binary's command line: help, and clear errors when no
//! cluster is running. Also makes `cargo test` build the binary that the
//! end-to-end suite in tests/ drives.

use std::process::Command;

fn cairn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
}

#[test]
fn help_lists_the_subcommands() {
    let out = cairn().arg("--help").output().expect("run cairn");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["dev", "node", "router", "admin"] {
        assert!(text.contains(sub), "help lacks {sub}: {text}");
    }
}

#[test]
fn admin_without_a_running_cluster_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = cairn()
        .args(["admin", "--data-dir"])
        .arg(dir.path())
        .args(["repo", "list"])
        .output()
        .expect("run cairn");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dev-cluster.json"), "unclear error: {err}");
}

#[test]
fn bad_repository_name_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = cairn()
        .args(["admin", "--data-dir"])
        .arg(dir.path())
        .args(["repo", "create", "no-slash"])
        .output()
        .expect("run cairn");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("WORKSPACE/REPO"));
}
