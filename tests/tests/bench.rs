//! The benchmark harness itself works, on tiny inputs (figures are `just bench`'s job, never a
//! test's: nothing here asserts a speed).

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ae-bench"))
        .args(args)
        .output()
        .expect("ae-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ae-bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn hashing_reports_every_field_beside_raw_sha256() {
    let out = bench(&["hashing", "--runs", "1", "--secs", "0.05"]);
    for field in ["email", "phone", "madid"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(field) && l.contains("raw SHA-256")),
            "{out}"
        );
    }
}

#[test]
fn emulator_capacity_and_one_worker_are_measured() {
    let out = bench(&[
        "emulator",
        "--runs",
        "1",
        "--secs",
        "0.2",
        "--shards",
        "2",
        "--clients",
        "2",
    ]);
    assert!(
        out.contains("median: emulator") && out.contains("ratio"),
        "{out}"
    );
}

#[test]
fn rate_limit_utilization_is_measured_with_and_without_a_halved_budget() {
    let out = bench(&[
        "ratelimit",
        "--rate",
        "50",
        "--shards",
        "6",
        "--latency-ms",
        "5",
        "--window-secs",
        "5",
    ]);
    assert!(
        out.contains("steady budget") && out.contains("budget halved mid-export"),
        "{out}"
    );
    assert!(out.contains("failed shards 0"), "{out}");
}
