//! Hub repo ids, resolved through `hf-hub` and the standard Hugging Face cache.
//!
//! The cache layout (`models--owner--name/{refs,snapshots,blobs,.no_exist}`), the
//! environment variables and the offline rules follow Python `huggingface_hub`, so a
//! model downloaded by either tool is found by the other. Files already in the cache are
//! used as they are: a fully cached repo loads without touching the network, and the hub
//! is asked only for what the cache lacks. If the hub cannot be reached, whatever the
//! cache holds is used when it is enough.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo, RepoType};

use super::{from_dir, shard_files, LoadError, ModelFiles, INDEX_FILE, SINGLE_FILE};

/// `owner/name` (optionally `owner/name@revision`) and not an existing path.
pub fn looks_like_repo_id(s: &str) -> bool {
    let base = s.split('@').next().unwrap_or(s);
    let mut parts = base.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty())
}

/// Resolves `owner/name[@revision]` to local files, downloading what the cache lacks
/// (unless `HF_HUB_OFFLINE` is set). `name` is the repo id without the revision.
pub fn resolve_repo(repo: &str) -> Result<ModelFiles, LoadError> {
    let spec = RepoSpec::parse(repo)?;
    let env = HubEnv::from_env()?;
    resolve_with(&spec, &env)
}

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Python's default `HF_HUB_ETAG_TIMEOUT`: how long to wait for the hub's answer about a repo.
const DEFAULT_TIMEOUT_S: f64 = 10.0;
const OPTIONAL_FILES: [&str; 2] = ["tokenizer_config.json", "generation_config.json"];

/// A parsed `owner/name[@revision]`.
#[derive(Debug, PartialEq)]
struct RepoSpec {
    id: String,
    revision: String,
}

impl RepoSpec {
    /// Validates like `huggingface_hub` does, and also keeps ids and revisions from
    /// escaping the cache directory once they become path components.
    fn parse(repo: &str) -> Result<Self, LoadError> {
        let bad = |why: &str| LoadError::Hub(format!("{repo:?} is not a valid repo id: {why}"));
        let (id, revision) = repo.split_once('@').unwrap_or((repo, "main"));
        let (owner, name) = id
            .split_once('/')
            .ok_or_else(|| bad("expected owner/name"))?;
        for part in [owner, name] {
            let ok_chars = part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            let ok_ends = !part.starts_with(['-', '.']) && !part.ends_with(['-', '.']);
            if part.is_empty() || part.len() > 96 || !ok_chars || !ok_ends {
                return Err(bad(
                    "owner and name must be 1-96 letters, digits, '-', '_' or '.', \
                     starting and ending with a letter or digit",
                ));
            }
        }
        if id.contains("--") || id.contains("..") {
            return Err(bad("'--' and '..' are not allowed"));
        }
        let revision_ok = !revision.is_empty()
            && !revision.starts_with('/')
            && !revision.contains('\\')
            && !revision.chars().any(char::is_control)
            && revision
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if !revision_ok {
            return Err(bad(
                "the revision after '@' must be a branch, tag or commit",
            ));
        }
        Ok(Self {
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// The hub settings, read from the environment with `huggingface_hub`'s names and defaults.
struct HubEnv {
    cache: PathBuf,
    offline: bool,
    endpoint: String,
    token: Option<String>,
    /// Bound on asking the hub about a repo, so an unreachable hub fails fast.
    timeout: Duration,
    progress: bool,
}

impl HubEnv {
    fn from_env() -> Result<Self, LoadError> {
        let home = hf_home();
        let cache = match var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
            Some(dir) => expand_home(&dir),
            None => hf_home()?.join("hub"),
        };
        let token = var("HF_TOKEN")
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(|p| expand_home(&p))
                    .or_else(|| home.as_ref().ok().map(|h| h.join("token")))?;
                let token = std::fs::read_to_string(path).ok()?;
                Some(token.trim().to_string()).filter(|t| !t.is_empty())
            });
        let offline = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
            .iter()
            .any(|v| var(v).is_some_and(|v| is_true(&v)));
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let timeout_s = var("HF_HUB_ETAG_TIMEOUT")
            .and_then(|t| t.trim().parse::<f64>().ok())
            .filter(|t| t.is_finite() && *t > 0.0)
            .unwrap_or(DEFAULT_TIMEOUT_S);
        let progress = std::io::stderr().is_terminal()
            && !var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_true(&v));
        Ok(Self {
            cache,
            offline,
            endpoint,
            token,
            timeout: Duration::from_secs_f64(timeout_s.min(3600.0)),
            progress,
        })
    }
}

/// A set, non-empty environment variable.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `huggingface_hub`'s truthy values for boolean variables.
fn is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

fn home_dir() -> Option<PathBuf> {
    var("HOME")
        .or_else(|| var("USERPROFILE"))
        .map(PathBuf::from)
}

/// Python expands `~` in these variables; do the same for the common `~/...` form.
fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), home_dir()) {
        (Some(rest), Some(home)) => home.join(rest),
        _ => PathBuf::from(p),
    }
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Result<PathBuf, LoadError> {
    if let Some(home) = var("HF_HOME") {
        return Ok(expand_home(&home));
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return Ok(expand_home(&xdg).join("huggingface"));
    }
    home_dir()
        .map(|h| h.join(".cache").join("huggingface"))
        .ok_or_else(|| {
            LoadError::Hub(
                "cannot locate the hub cache: no home directory; set HF_HUB_CACHE or HF_HOME"
                    .into(),
            )
        })
}

/// One repo's directory in the cache.
struct CachedRepo {
    dir: PathBuf,
}

impl CachedRepo {
    fn new(cache: &Path, id: &str) -> Self {
        Self {
            dir: cache.join(format!("models--{}", id.replace('/', "--"))),
        }
    }

    /// The cached commit for `revision`: a commit hash names its snapshot directly,
    /// a branch or tag goes through `refs/`.
    fn commit(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) && self.snapshot(revision).is_dir() {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        let hash = text.trim();
        is_plain_component(hash).then(|| hash.to_string())
    }

    fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// `huggingface_hub` records files the repo lacks, so they are not asked for again.
    fn known_absent(&self, commit: &str, file: &str) -> bool {
        self.dir.join(".no_exist").join(commit).join(file).exists()
    }

    /// Best effort: a read-only cache only costs a later question to the hub.
    fn mark_absent(&self, commit: &str, file: &str) {
        let marker = self.dir.join(".no_exist").join(commit).join(file);
        let made = marker
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&marker, b""));
        if let Err(e) = made {
            tracing::debug!("cannot write {}: {e}", marker.display());
        }
    }

    fn set_ref(&self, revision: &str, commit: &str) -> std::io::Result<()> {
        let path = self.dir.join("refs").join(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, commit)
    }
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A name that stays one path component (commit hashes read from the cache or the hub).
fn is_plain_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.contains(['/', '\\'])
        && !s.contains(char::is_control)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Required,
    Optional,
    /// `model.safetensors.index.json` while neither weights file is known: whether the
    /// repo has it decides between sharded and single-file weights.
    WeightsIndex,
}

/// A file the snapshot lacks.
#[derive(Debug)]
struct Need {
    file: String,
    kind: Kind,
}

impl Need {
    fn describe(&self) -> String {
        match self.kind {
            Kind::WeightsIndex => format!("{SINGLE_FILE} (or {INDEX_FILE})"),
            _ => self.file.clone(),
        }
    }
}

/// What `snap` still lacks, in the order files are fetched; files `absent` says the repo
/// does not have are not asked for. A present index contributes its shards.
fn missing(snap: &Path, absent: impl Fn(&str) -> bool) -> Result<Vec<Need>, LoadError> {
    let has = |f: &str| snap.join(f).is_file();
    let mut out = Vec::new();
    let mut need = |file: &str, kind| {
        out.push(Need {
            file: file.to_string(),
            kind,
        })
    };
    for f in ["config.json", "tokenizer.json"] {
        if !has(f) {
            need(f, Kind::Required);
        }
    }
    if has(INDEX_FILE) {
        for shard in shard_files(&snap.join(INDEX_FILE))? {
            if !has(&shard) {
                need(&shard, Kind::Required);
            }
        }
    } else if !has(SINGLE_FILE) {
        if absent(INDEX_FILE) {
            need(SINGLE_FILE, Kind::Required);
        } else {
            need(INDEX_FILE, Kind::WeightsIndex);
        }
    }
    for f in OPTIONAL_FILES {
        if !has(f) && !absent(f) {
            need(f, Kind::Optional);
        }
    }
    Ok(out)
}

fn resolve_with(spec: &RepoSpec, env: &HubEnv) -> Result<ModelFiles, LoadError> {
    let cache = CachedRepo::new(&env.cache, &spec.id);
    let cached = cache.commit(&spec.revision);
    // What the cached snapshot lacks beyond optional files, if there is a snapshot.
    let mut cached_gap: Option<Need> = None;
    if let Some(commit) = &cached {
        let snap = cache.snapshot(commit);
        let gaps = missing(&snap, |f| cache.known_absent(commit, f))?;
        if gaps.is_empty() {
            return finish(spec, &snap);
        }
        cached_gap = gaps.into_iter().find(|n| n.kind != Kind::Optional);
        if cached_gap.is_none() && env.offline {
            return finish(spec, &snap);
        }
    }
    let not_cached = |why: &str| {
        let file = cached_gap
            .as_ref()
            .map_or_else(|| "config.json".to_string(), Need::describe);
        let revision = match &cached {
            Some(_) => String::new(),
            None => format!(" (revision {} was never downloaded)", spec.revision),
        };
        LoadError::Hub(format!(
            "{}: {file} is not in the hub cache {}{revision} and {why}",
            spec.id,
            env.cache.display(),
        ))
    };
    if env.offline {
        return Err(not_cached(
            "offline mode is on (HF_HUB_OFFLINE): download the model first or unset it",
        ));
    }

    // Complete the cached commit rather than move to a newer one, so files already
    // downloaded stay valid and nothing is fetched twice.
    let pinned = cached.clone().unwrap_or_else(|| spec.revision.clone());
    let listing = build_api(env)
        .and_then(|api| fetch_info(&api, &spec.id, &pinned, env.timeout).map(|info| (api, info)));
    let (api, info) = match listing {
        Ok(found) => found,
        Err(e) => {
            if let (Some(commit), None) = (&cached, &cached_gap) {
                tracing::warn!(
                    "{}: hub unreachable ({e}); using the cached snapshot {commit}",
                    spec.id
                );
                return finish(spec, &cache.snapshot(commit));
            }
            return Err(not_cached(&format!(
                "the hub could not be asked for it: {e}"
            )));
        }
    };
    let sha = info.sha.trim().to_string();
    if !is_plain_component(&sha) {
        return Err(LoadError::Hub(format!(
            "{}: the hub answered an invalid commit {sha:?} for revision {pinned}",
            spec.id
        )));
    }
    let listed: HashSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let repo = api.repo(Repo::with_revision(
        spec.id.clone(),
        RepoType::Model,
        sha.clone(),
    ));
    let snap = cache.snapshot(&sha);
    // Downloads pinned to the commit make `hf-hub` write `refs/<sha>`, a ref Python never
    // writes; drop it afterwards unless it was there before.
    let sha_ref = cache.dir.join("refs").join(&sha);
    let sha_ref_existed = sha_ref.exists();
    // Files the repo lacks, or optional ones that failed to download.
    let mut skip: HashSet<String> = HashSet::new();
    // Each pass fetches what the previous one revealed (the index, then its shards);
    // every need is either fetched or skipped, so this ends in a few passes.
    for _ in 0..4 {
        let gaps = missing(&snap, |f| skip.contains(f) || cache.known_absent(&sha, f))?;
        if gaps.is_empty() {
            break;
        }
        for need in gaps {
            if !listed.contains(need.file.as_str()) {
                if need.kind == Kind::Required {
                    return Err(LoadError::Hub(format!(
                        "{}: the repo has no {} at revision {} ({sha})",
                        spec.id, need.file, spec.revision
                    )));
                }
                cache.mark_absent(&sha, &need.file);
                skip.insert(need.file);
                continue;
            }
            tracing::info!("downloading {} from {}", need.file, spec.id);
            if let Err(e) = repo.download(&need.file) {
                let msg = format!(
                    "{}: downloading {} (revision {sha}) into {} failed: {e}",
                    spec.id,
                    need.file,
                    env.cache.display()
                );
                if need.kind == Kind::Optional {
                    tracing::warn!("{msg}");
                    skip.insert(need.file);
                } else {
                    return Err(LoadError::Hub(msg));
                }
            }
        }
    }
    if spec.revision != sha {
        if let Err(e) = cache.set_ref(&spec.revision, &sha) {
            tracing::warn!("{}: cannot record revision {}: {e}", spec.id, spec.revision);
        }
        if !sha_ref_existed {
            let _ = std::fs::remove_file(&sha_ref);
        }
    }
    finish(spec, &snap)
}

/// The snapshot directory holds every file (as a link into `blobs/`), so it loads like a
/// local model directory; only the reported name differs.
fn finish(spec: &RepoSpec, snap: &Path) -> Result<ModelFiles, LoadError> {
    let mut files = from_dir(snap)?;
    files.name = spec.id.clone();
    Ok(files)
}

fn build_api(env: &HubEnv) -> Result<Api, String> {
    ApiBuilder::from_cache(Cache::new(env.cache.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_progress(env.progress)
        .with_retries(3)
        .with_user_agent(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| format!("cannot set up the hub client: {e}"))
}

/// The repo's commit and file list at `revision`, within `timeout`.
fn fetch_info(api: &Api, id: &str, revision: &str, timeout: Duration) -> Result<RepoInfo, String> {
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    match repo.info_request().timeout(timeout).call() {
        Ok(response) => response
            .into_json::<RepoInfo>()
            .map_err(|e| format!("unreadable answer about revision {revision}: {e}")),
        Err(e) => {
            let msg = e.to_string();
            Err(match e.into_response().map(|r| r.status()) {
                Some(401 | 403 | 404) => format!(
                    "{msg}: no such repo or revision {revision}, or access denied \
                     (gated and private repos need HF_TOKEN)"
                ),
                _ => msg,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_revisions() {
        let spec = RepoSpec::parse("mistralai/Mixtral-8x7B-v0.1").unwrap();
        assert_eq!(
            (spec.id.as_str(), spec.revision.as_str()),
            ("mistralai/Mixtral-8x7B-v0.1", "main")
        );
        let spec = RepoSpec::parse("a/b@refs/pr/1").unwrap();
        assert_eq!(spec.revision, "refs/pr/1");
        for bad in [
            "a/b@", "a/b@../x", "a/b@/etc", "a/../b", "a/b--c", "-a/b", "a/b.", "a b/c", "a/b/c",
        ] {
            assert!(RepoSpec::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn truthy_values() {
        for v in ["1", "true", "YES", "On "] {
            assert!(is_true(v), "{v}");
        }
        for v in ["0", "false", "no", "off", ""] {
            assert!(!is_true(v), "{v}");
        }
    }
}
