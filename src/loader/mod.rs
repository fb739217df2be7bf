//! Resolves a model (local directory or hub repo id) to its files and opens its weights.
//!
//! The loader finds and maps files; it builds no model. The model builds itself from the
//! [`WeightSource`] handed out here.

mod dtype;
pub mod hub;
mod weights;

pub use dtype::{select_dtype, DTypeArg};
pub use weights::{WeightError, WeightSource};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model {0:?} is neither a local directory nor a hub repo id of the form owner/name")]
    NotFound(String),
    #[error("{dir} has no {file}")]
    MissingFile { dir: String, file: String },
    #[error("hub: {0}")]
    Hub(String),
    #[error("cannot read {path}: {msg}")]
    Read { path: String, msg: String },
}

/// Every file a model is made of, resolved to local paths.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// Directory holding the files (the snapshot directory for hub models).
    pub dir: PathBuf,
    pub config: PathBuf,
    /// One or more safetensors files, in shard order.
    pub weights: Vec<PathBuf>,
    /// `model.safetensors.index.json` for sharded checkpoints.
    pub weight_index: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
    /// Name to report (`/v1/models`, logs): the repo id or the directory name.
    pub name: String,
}

/// Resolves `--model`: an existing local directory wins; otherwise it is taken as a hub repo id.
pub fn resolve(model: &str) -> Result<ModelFiles, LoadError> {
    let path = Path::new(model);
    if path.is_dir() {
        return from_dir(path);
    }
    if hub::looks_like_repo_id(model) {
        return hub::resolve_repo(model).map_err(|e| match e {
            LoadError::Hub(msg) => LoadError::Hub(format!(
                "{model:?} is not a local directory; as a hub repo id: {msg}"
            )),
            other => other,
        });
    }
    Err(LoadError::NotFound(model.to_string()))
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

/// Resolves the files of a model laid out in a local directory (also a hub snapshot dir).
pub fn from_dir(dir: &Path) -> Result<ModelFiles, LoadError> {
    let need = |file: &str| -> Result<PathBuf, LoadError> {
        let p = dir.join(file);
        if p.is_file() {
            Ok(p)
        } else {
            Err(LoadError::MissingFile {
                dir: dir.display().to_string(),
                file: file.to_string(),
            })
        }
    };
    let optional = |file: &str| Some(dir.join(file)).filter(|p| p.is_file());
    let config = need("config.json")?;
    let tokenizer = need("tokenizer.json")?;
    let (weights, weight_index) = match optional(INDEX_FILE) {
        Some(index) => {
            let shards = shard_files(&index)?;
            (shards.iter().map(|s| dir.join(s)).collect(), Some(index))
        }
        None => (vec![need(SINGLE_FILE)?], None),
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        config,
        weights,
        weight_index,
        tokenizer,
        tokenizer_config: optional("tokenizer_config.json"),
        generation_config: optional("generation_config.json"),
        name,
    })
}

/// The distinct shard file names listed in a `model.safetensors.index.json`, sorted.
pub fn shard_files(index: &Path) -> Result<Vec<String>, LoadError> {
    let read_err = |msg: String| LoadError::Read {
        path: index.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(index).map_err(|e| read_err(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| read_err(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| read_err("no \"weight_map\" object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| read_err(format!("weight_map entry {tensor:?} is not a file name")))?;
        if f.contains("..") || Path::new(f).is_absolute() {
            return Err(read_err(format!(
                "shard name {f:?} escapes the model directory"
            )));
        }
        files.push(f.to_string());
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(read_err("weight_map is empty".into()));
    }
    Ok(files)
}
