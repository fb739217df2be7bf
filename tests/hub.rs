//! Hub repo resolution against caches laid out exactly as `huggingface_hub` / `hf-hub`
//! write them, with no network: offline mode, `HF_HOME`, sharded weights, and an
//! unreachable endpoint with the repo already cached.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mixserve::loader::{self, hub::resolve_repo, ModelFiles};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-mixtral");
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const ALL_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "model.safetensors",
];
/// Everything that steers hub resolution; cleared before each case.
const HUB_VARS: [&str; 11] = [
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DISABLE_PROGRESS_BARS",
];

/// Writes `files` (name, content) into `cache` as the hub does: content-named blobs,
/// a snapshot of relative symlinks into `blobs/`, and `refs/main` naming the commit.
fn cache_repo(cache: &Path, id: &str, commit: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for (i, (name, content)) in files.iter().enumerate() {
        let blob = format!("{:064x}", 0xb10b_0000 + i);
        std::fs::write(repo.join("blobs").join(&blob), content).unwrap();
        symlink(&format!("../../blobs/{blob}"), &snapshot.join(name));
    }
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    snapshot
}

#[cfg(unix)]
fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

#[cfg(windows)]
fn symlink(target: &str, link: &Path) {
    std::os::windows::fs::symlink_file(target, link).unwrap();
}

/// The tiny Mixtral's files, or the subset named.
fn fixture_files(names: &[&'static str]) -> Vec<(&'static str, Vec<u8>)> {
    names
        .iter()
        .map(|&n| (n, std::fs::read(Path::new(FIXTURE).join(n)).unwrap()))
        .collect()
}

fn reset_env(home: &Path) {
    for v in HUB_VARS {
        std::env::remove_var(v);
    }
    // Never fall back to the real ~/.cache of whoever runs the tests.
    std::env::set_var("HF_HOME", home);
}

fn assert_single_file(files: &ModelFiles, snapshot: &Path) {
    assert_eq!(files.name, "acme/tiny-mixtral");
    assert_eq!(files.dir, snapshot);
    assert_eq!(files.config, snapshot.join("config.json"));
    assert_eq!(files.tokenizer, snapshot.join("tokenizer.json"));
    assert_eq!(files.weights, vec![snapshot.join("model.safetensors")]);
    assert_eq!(files.weight_index, None);
    assert_eq!(
        files.tokenizer_config,
        Some(snapshot.join("tokenizer_config.json"))
    );
    assert_eq!(
        files.generation_config,
        Some(snapshot.join("generation_config.json"))
    );
    // The symlinks lead to the real content.
    let config = std::fs::read(&files.config).unwrap();
    assert_eq!(
        config,
        std::fs::read(Path::new(FIXTURE).join("config.json")).unwrap()
    );
}

fn err_text(r: Result<ModelFiles, loader::LoadError>) -> String {
    match r {
        Ok(files) => panic!("expected an error, resolved to {files:?}"),
        Err(e) => e.to_string(),
    }
}

/// Env vars are process-wide: tests that set them hold this lock.
static ENV: Mutex<()> = Mutex::new(());

fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn resolves_repos_from_the_hub_cache() {
    let _env = env_lock();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    let cache = tmp.path().join("cache");
    let snapshot = cache_repo(
        &cache,
        "acme/tiny-mixtral",
        COMMIT,
        &fixture_files(&ALL_FILES),
    );

    // (1) Offline, HF_HUB_CACHE: resolved inside the snapshot, named by the repo id.
    reset_env(&home);
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_single_file(&loader::resolve("acme/tiny-mixtral").unwrap(), &snapshot);
    // An explicit branch or the commit itself pick the same snapshot.
    assert_single_file(&resolve_repo("acme/tiny-mixtral@main").unwrap(), &snapshot);
    let by_commit = resolve_repo(&format!("acme/tiny-mixtral@{COMMIT}")).unwrap();
    assert_single_file(&by_commit, &snapshot);

    // (2) HF_HOME layout: `$HF_HOME/hub/models--...`; "true" also means offline.
    let home2 = tmp.path().join("home2");
    let snapshot2 = cache_repo(
        &home2.join("hub"),
        "acme/tiny-mixtral",
        COMMIT,
        &fixture_files(&ALL_FILES),
    );
    reset_env(&home2);
    std::env::set_var("HF_HUB_OFFLINE", "true");
    assert_single_file(&loader::resolve("acme/tiny-mixtral").unwrap(), &snapshot2);

    // (3) Offline and not cached: the error names the repo, the file, the cache, offline mode.
    reset_env(&home);
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "yes");
    let msg = err_text(loader::resolve("acme/absent-model"));
    assert!(msg.contains("acme/absent-model"), "{msg}");
    assert!(msg.contains("offline"), "{msg}");
    assert!(msg.contains(&cache.display().to_string()), "{msg}");
    // A cached repo that lacks a required file names that file.
    cache_repo(
        &cache,
        "acme/no-tokenizer",
        COMMIT,
        &fixture_files(&["config.json", "model.safetensors"]),
    );
    let msg = err_text(loader::resolve("acme/no-tokenizer"));
    assert!(msg.contains("acme/no-tokenizer"), "{msg}");
    assert!(msg.contains("tokenizer.json"), "{msg}");
    assert!(msg.contains("offline"), "{msg}");
    // Optional files may be missing.
    let bare = cache_repo(
        &cache,
        "acme/bare",
        COMMIT,
        &fixture_files(&["config.json", "tokenizer.json", "model.safetensors"]),
    );
    let files = loader::resolve("acme/bare").unwrap();
    assert_eq!(files.weights, vec![bare.join("model.safetensors")]);
    assert_eq!(files.tokenizer_config, None);
    assert_eq!(files.generation_config, None);

    // (4) Sharded: the index's shards, in order (resolution reads no safetensors).
    let index = serde_json::json!({
        "metadata": {"total_size": 8},
        "weight_map": {
            "lm_head.weight": "model-00002-of-00002.safetensors",
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
        }
    });
    let mut sharded = fixture_files(&["config.json", "tokenizer.json"]);
    sharded.push((
        "model.safetensors.index.json",
        serde_json::to_vec(&index).unwrap(),
    ));
    sharded.push(("model-00001-of-00002.safetensors", b"shard one".to_vec()));
    sharded.push(("model-00002-of-00002.safetensors", b"shard two".to_vec()));
    let snap_sharded = cache_repo(&cache, "acme/sharded-mixtral", COMMIT, &sharded);
    let files = loader::resolve("acme/sharded-mixtral").unwrap();
    assert_eq!(files.name, "acme/sharded-mixtral");
    assert_eq!(
        files.weights,
        vec![
            snap_sharded.join("model-00001-of-00002.safetensors"),
            snap_sharded.join("model-00002-of-00002.safetensors"),
        ]
    );
    assert_eq!(
        files.weight_index,
        Some(snap_sharded.join("model.safetensors.index.json"))
    );
    // A shard missing from the cache is named.
    std::fs::remove_file(snap_sharded.join("model-00002-of-00002.safetensors")).unwrap();
    let msg = err_text(loader::resolve("acme/sharded-mixtral"));
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");

    // (5) Online, hub unreachable: a fully cached repo still loads, without waiting.
    reset_env(&home);
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let start = Instant::now();
    assert_single_file(&loader::resolve("acme/tiny-mixtral").unwrap(), &snapshot);
    // Missing optional files make it ask the hub; the failure falls back to the cache.
    let files = loader::resolve("acme/bare").unwrap();
    assert_eq!(files.dir, bare);
    assert_eq!(files.generation_config, None);
    // Missing required files cannot be had: the error says which and why.
    let msg = err_text(loader::resolve("acme/no-tokenizer"));
    assert!(msg.contains("acme/no-tokenizer"), "{msg}");
    assert!(msg.contains("tokenizer.json"), "{msg}");
    assert!(!msg.contains("offline"), "{msg}");
    let msg = err_text(loader::resolve("acme/absent-model"));
    assert!(msg.contains("acme/absent-model"), "{msg}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );

    reset_env(&home);
}

#[test]
fn rejects_malformed_repo_ids() {
    // Parsing fails before any env or cache lookup, so this cannot race the test above.
    for bad in ["acme/x@", "acme/x@../../etc", "acme/../x", "acme/x--y"] {
        let msg = err_text(resolve_repo(bad));
        assert!(msg.contains("not a valid repo id"), "{bad}: {msg}");
    }
}

/// A repo served by [`MockHub`]: its commit and files.
struct MockRepo {
    sha: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
}

/// The few hub endpoints `hf-hub` uses (repo info, ranged file downloads), over plain
/// HTTP on localhost, recording each request path.
struct MockHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl MockHub {
    fn start(repos: HashMap<&'static str, MockRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut range_start = 0usize;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                    let lower = header.to_ascii_lowercase();
                    if let Some(r) = lower.strip_prefix("range: bytes=") {
                        range_start = r.split('-').next().unwrap().trim().parse().unwrap();
                    }
                }
                log.lock().unwrap().push(path.clone());
                let (status, headers, body) = respond(&repos, &path, range_start);
                let mut head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for h in headers {
                    head.push_str(&h);
                    head.push_str("\r\n");
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        Self { endpoint, requests }
    }

    fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

fn respond(
    repos: &HashMap<&str, MockRepo>,
    path: &str,
    range_start: usize,
) -> (&'static str, Vec<String>, Vec<u8>) {
    let not_found = (
        "404 Not Found",
        vec![],
        b"{\"error\":\"not found\"}".to_vec(),
    );
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((id, _revision)) = rest.split_once("/revision/") else {
            return not_found;
        };
        let Some(repo) = repos.get(id) else {
            return not_found;
        };
        let siblings: Vec<_> = repo
            .files
            .iter()
            .map(|(n, _)| serde_json::json!({ "rfilename": n }))
            .collect();
        let body = serde_json::json!({ "sha": repo.sha, "siblings": siblings });
        return ("200 OK", vec![], serde_json::to_vec(&body).unwrap());
    }
    // /{owner}/{name}/resolve/{revision}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let [owner, name, "resolve", _revision, file] = parts[..] else {
        return not_found;
    };
    let Some(repo) = repos.get(format!("{owner}/{name}").as_str()) else {
        return not_found;
    };
    let Some((_, content)) = repo.files.iter().find(|(n, _)| *n == file) else {
        return (
            "404 Not Found",
            vec!["X-Error-Code: EntryNotFound".into()],
            vec![],
        );
    };
    let etag = format!("{:064x}", content.len() * 7919 + file.len());
    let body = content[range_start.min(content.len())..].to_vec();
    let end = content.len().saturating_sub(1);
    (
        "206 Partial Content",
        vec![
            format!("ETag: \"{etag}\""),
            format!("X-Repo-Commit: {}", repo.sha),
            format!("Content-Range: bytes {range_start}-{end}/{}", content.len()),
        ],
        body,
    )
}

#[test]
fn downloads_what_the_cache_lacks() {
    let _env = env_lock();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    const SHA: &str = "fedcba9876543210fedcba9876543210fedcba98";
    let index = serde_json::json!({
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
        }
    });
    let mut sharded = fixture_files(&["config.json", "tokenizer.json", "generation_config.json"]);
    sharded.push((
        "model.safetensors.index.json",
        serde_json::to_vec(&index).unwrap(),
    ));
    sharded.push(("model-00001-of-00002.safetensors", b"shard one".to_vec()));
    sharded.push(("model-00002-of-00002.safetensors", b"shard two".to_vec()));
    let mut repos = HashMap::new();
    repos.insert(
        "acme/tiny-mixtral",
        MockRepo {
            sha: SHA,
            files: fixture_files(&ALL_FILES),
        },
    );
    repos.insert(
        "acme/sharded",
        MockRepo {
            sha: SHA,
            files: sharded,
        },
    );
    let hub = MockHub::start(repos);
    reset_env(tmp.path());
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_ENDPOINT", &hub.endpoint);

    // Single file: everything lands in snapshots/<sha>, refs/main records the commit.
    let files = loader::resolve("acme/tiny-mixtral").unwrap();
    let repo_dir = cache.join("models--acme--tiny-mixtral");
    assert_single_file(&files, &repo_dir.join("snapshots").join(SHA));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        SHA
    );
    let refs: Vec<_> = std::fs::read_dir(repo_dir.join("refs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(refs, ["main"]);
    assert!(!hub.take_requests().is_empty());
    // Now cached: no request at all.
    assert_single_file(
        &loader::resolve("acme/tiny-mixtral").unwrap(),
        &repo_dir.join("snapshots").join(SHA),
    );
    assert_eq!(hub.take_requests(), Vec::<String>::new());

    // Sharded: the index, then its shards; the absent tokenizer_config.json is recorded
    // as `huggingface_hub` does, so it is not asked for again.
    let files = loader::resolve("acme/sharded").unwrap();
    let snap = cache.join("models--acme--sharded/snapshots").join(SHA);
    assert_eq!(files.name, "acme/sharded");
    assert_eq!(
        files.weights,
        vec![
            snap.join("model-00001-of-00002.safetensors"),
            snap.join("model-00002-of-00002.safetensors"),
        ]
    );
    assert_eq!(std::fs::read(&files.weights[1]).unwrap(), b"shard two");
    assert_eq!(files.tokenizer_config, None);
    assert!(files.generation_config.is_some());
    let no_exist = cache.join("models--acme--sharded/.no_exist").join(SHA);
    assert!(no_exist.join("tokenizer_config.json").exists());
    assert!(!no_exist.join("model.safetensors").exists());
    hub.take_requests();
    loader::resolve("acme/sharded").unwrap();
    assert_eq!(hub.take_requests(), Vec::<String>::new());

    // Unknown repo: the hub's refusal is reported with the repo.
    let msg = err_text(loader::resolve("acme/unknown"));
    assert!(msg.contains("acme/unknown") && msg.contains("404"), "{msg}");

    reset_env(tmp.path());
}
