//! `mixserve run` as a user runs it: the binary, its stdout and stderr, its exit code.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn mixserve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mixserve"))
        .args(args)
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn reference_text(name: &str, i: usize) -> (String, String) {
    let path = root()
        .join("tests/fixtures")
        .join(name)
        .join("reference.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let p = &json["prompts"][i];
    (
        p["text"].as_str().unwrap().into(),
        p["greedy_text"].as_str().unwrap().into(),
    )
}

/// `mixserve run` of `prompt` on the shipped model `name`, greedy, 24 tokens, with `extra` flags.
fn greedy_run(name: &str, prompt: &str, extra: &[&str]) -> Output {
    let model = format!("models/{name}");
    let mut args = vec![
        "run",
        "--model",
        &model,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ];
    args.extend_from_slice(extra);
    mixserve(&args)
}

/// The run succeeded and printed the reference's greedy continuation. The reference decodes the
/// new ids alone; streamed in the prompt's context, a first token like "▁collections" keeps its
/// space, as OpenAI-style servers return it, so leading spaces are not compared.
fn assert_continuation(out: &Output, expected: &str, what: &str) {
    assert!(out.status.success(), "{what}: {}", stderr(out));
    assert_eq!(
        stdout(out).trim_end_matches('\n').trim_start(),
        expected.trim_start(),
        "{what}"
    );
}

#[test]
fn greedy_prompt_streams_the_reference_continuation() {
    for name in FAMILIES {
        let (prompt, expected) = reference_text(name, 0);
        let out = greedy_run(name, &prompt, &[]);
        assert_continuation(&out, &expected, name);
        assert!(stderr(&out).contains("tok/s"), "{}", stderr(&out));
    }
}

/// `--kv-cache-dtype f16` halves the cache and keeps the reference's greedy continuation on
/// the shipped model (its rounding moves no top-1 there); an unknown type is a clear error.
/// `--threads` sizes the pools; one thread gives the same greedy continuation as the default
/// (no kernel's arithmetic depends on how the work is split), and 0 is a clear error.
#[test]
fn thread_count_flag() {
    let (prompt, expected) = reference_text("tiny-dbrx", 0);
    for threads in ["1", "3"] {
        let out = greedy_run("tiny-dbrx", &prompt, &["--threads", threads]);
        assert_continuation(&out, &expected, &format!("--threads {threads}"));
    }
    let bad = greedy_run("tiny-dbrx", &prompt, &["--threads", "0"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--threads"), "{}", stderr(&bad));
}

#[test]
fn half_precision_kv_cache_keeps_the_greedy_continuation() {
    let (prompt, expected) = reference_text("tiny-mixtral", 0);
    let out = greedy_run("tiny-mixtral", &prompt, &["--kv-cache-dtype", "f16"]);
    assert_continuation(&out, &expected, "--kv-cache-dtype f16");
    let bad = greedy_run("tiny-mixtral", &prompt, &["--kv-cache-dtype", "f8"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--kv-cache-dtype"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn default_model_and_prompt_from_stdin() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mixserve"))
        .args(["run", "--temperature", "0", "--max-tokens", "24"])
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (prompt, expected) = reference_text("tiny-mixtral", 1);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(prompt.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim_end_matches('\n'), expected);
}

#[test]
fn chat_mode_and_template_errors() {
    let out = mixserve(&[
        "run",
        "-m",
        "models/tiny-dbrx",
        "--chat",
        "-p",
        "Hello! Who are you?",
        "--max-tokens",
        "5",
        "--seed",
        "7",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("33 prompt tokens"),
        "{}",
        stderr(&out)
    );
    // Mixtral's template raises on a system message; its message reaches the user.
    let out = mixserve(&["run", "--chat", "--system", "be brief", "-p", "hi"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Conversation roles must alternate"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = [
        "run",
        "-p",
        "Mixture of experts",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--seed",
        "1234",
        "--max-tokens",
        "16",
    ];
    let a = mixserve(&args);
    let b = mixserve(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn experts_per_token_override() {
    let (prompt, default_text) = reference_text("tiny-mixtral", 0);
    for k in ["1", "3"] {
        let out = greedy_run("tiny-mixtral", &prompt, &["--experts-per-token", k]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_ne!(
            stdout(&out).trim_end_matches('\n'),
            default_text,
            "k={k} routes differently"
        );
    }
    for k in ["0", "9"] {
        let out = mixserve(&["run", "-p", "hi", "--experts-per-token", k]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("between 1 and the model's 8 experts"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["run", "-m", "/nonexistent/model", "-p", "hi"],
            "/nonexistent/model",
        ),
        (
            &["run", "-p", "hi", "--max-tokens", "5000"],
            "maximum context length is 4096 tokens",
        ),
        (
            &["run", "-p", "hi", "--kv-cache-memory", "lots"],
            "not a size",
        ),
        (&["run", "-p", "hi", "--device", "tpu"], "unknown device"),
        (&["run", "-p", "hi", "--top-p", "0"], "--top-p"),
    ];
    for (args, needle) in cases {
        let out = mixserve(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
