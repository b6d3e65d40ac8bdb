//! The load generator's command line as the scripts call it. Being an integration test, it
//! also makes `cargo test --workspace --tests` build the `mqproxy-bench` binary itself, so the
//! benchmarks' debug smoke runs on the suite's one build (no second feature set).

use std::process::Command;

fn bench(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mqproxy-bench"))
        .args(args)
        .output()
        .expect("mqproxy-bench runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Every scenario `scripts/bench.sh` and `scripts/bench-apache.sh` run is a subcommand, and
/// the modes they pass exist.
#[test]
fn the_scripts_subcommands_and_modes_exist() {
    let (ok, help) = bench(&["--help"]);
    assert!(ok, "{help}");
    for command in [
        "all",
        "produce",
        "produce-batch",
        "consume",
        "stream",
        "e2e-latency",
        "backlog",
        "rocketmq",
        "apache",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "no `{command}` subcommand in:\n{help}"
        );
    }
    let (ok, all) = bench(&["all", "--help"]);
    assert!(ok, "{all}");
    for mode in [
        "--quick",
        "--full",
        "--smoke",
        "--server-bin",
        "--data-root",
        "--server-toml",
    ] {
        assert!(all.contains(mode), "`all` lacks {mode}:\n{all}");
    }
    let (ok, refused) = bench(&["all", "--quick", "--full"]);
    assert!(!ok && refused.contains("cannot be used with"), "{refused}");
}
