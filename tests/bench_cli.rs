//! `mixserve bench` on the tiny model: the table, and JSON lines with every field positive.

mod common;

use common::root;
use std::process::Command;

#[test]
fn bench_writes_one_json_line_per_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_mixserve"))
        .args([
            "bench",
            "--model",
            "models/tiny-mixtral",
            "--concurrency",
            "1,2",
            "--prompt-tokens",
            "32",
            "--decode-tokens",
            "4",
            // Small enough for a debug build on CI; the default 1GiB is for real measurements.
            "--bandwidth-buffer",
            "64MiB",
            "--json",
        ])
        .arg(&json)
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("roofline"), "{stdout}");
    assert!(stdout.contains("GB/s"), "{stdout}");
    assert!(stdout.contains("matmul peak"), "{stdout}");

    let text = std::fs::read_to_string(&json).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    for (row, concurrency) in rows.iter().zip([1, 2]) {
        assert_eq!(row["model"], "tiny-mixtral", "{row}");
        assert_eq!(row["dtype"], "f32", "{row}");
        assert!(row["quant"].is_null(), "{row}");
        assert_eq!(row["kv_cache_dtype"], "f32", "{row}");
        assert_eq!(row["concurrency"], concurrency, "{row}");
        for field in [
            "decode_tok_s",
            "prefill_tok_s",
            "ttft_s",
            "roofline_tok_s",
            "roofline_fraction",
            "peak_rss_mb",
            "bandwidth_gb_s",
            "prefill_gflop",
            "prefill_gflop_s",
            "matmul_peak_gflop_s",
            "prefill_peak_fraction",
        ] {
            let v = row[field].as_f64();
            assert!(
                v.is_some_and(|v| v.is_finite() && v > 0.0),
                "{field}: {row}"
            );
        }
    }
}

#[test]
fn bench_rejects_a_model_and_a_synthetic_one_together() {
    let out = Command::new(env!("CARGO_BIN_EXE_mixserve"))
        .args([
            "bench",
            "--model",
            "models/tiny-mixtral",
            "--synthetic",
            "mixtral",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}
