//! The model's tokenizer: `tokenizer.json` plus what `transformers` reads from
//! `tokenizer_config.json` (special tokens, BOS/EOS policy, chat template) and
//! `generation_config.json` (the ids that end generation).

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::chat_template::{template_source_from_config, ChatTemplate};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("failed to read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("invalid {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

/// The tokenizer shared by the engine and the server. Cloning is cheap.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
    /// Outside the `Arc` so that a `--chat-template` override does not copy the vocabulary.
    chat_template: Option<ChatTemplate>,
}

struct Inner {
    tokenizer: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    special_ids: HashSet<u32>,
    /// Ids of `<0xNN>` tokens when the decoder fuses them into UTF-8 (sentencepiece byte
    /// fallback); empty otherwise. The incremental detokenizer must hold these back.
    byte_fallback_ids: HashSet<u32>,
    /// How `encode(.., true)` must differ from the `tokenizer.json` post-processor so that
    /// `add_bos_token`/`add_eos_token` from `tokenizer_config.json` win, as in transformers.
    bos_fix: Fix,
    eos_fix: Fix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    None,
    Add(u32),
    Strip(u32),
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.inner.bos_token)
            .field("eos_token", &self.inner.eos_token)
            .field("bos_token_id", &self.inner.bos_token_id)
            .field("eos_token_ids", &self.inner.eos_token_ids)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Value, TextError> {
    let text = std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TextError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_field(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(obj) => obj.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `bos_token_id`/`eos_token_id` in `generation_config.json`: an int, a list of ints or null.
fn id_field(config: &Value, key: &str, path: &Path) -> Result<Vec<u32>, TextError> {
    let invalid = || TextError::Config {
        path: path.to_path_buf(),
        message: format!("\"{key}\" must be a token id or a list of token ids"),
    };
    let to_id = |v: &Value| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(invalid)
    };
    match config.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(ids)) => ids.iter().map(to_id).collect(),
        Some(v) => Ok(vec![to_id(v)?]),
    }
}

fn contains_byte_fallback_decoder(decoder: &Value) -> bool {
    match decoder {
        Value::Object(obj) => {
            obj.get("type").and_then(Value::as_str) == Some("ByteFallback")
                || obj.values().any(contains_byte_fallback_decoder)
        }
        Value::Array(items) => items.iter().any(contains_byte_fallback_decoder),
        _ => false,
    }
}

/// Same test as the `ByteFallback` decoder applies to a token string.
fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && u8::from_str_radix(&token[3..5], 16).is_ok()
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and if given `tokenizer_config.json` (special tokens, chat
    /// template, BOS/EOS policy) and `generation_config.json` (BOS/EOS ids).
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        generation_config: Option<&Path>,
    ) -> Result<Self, TextError> {
        let tokenizer =
            tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| TextError::Load {
                path: tokenizer_json.to_path_buf(),
                message: e.to_string(),
            })?;
        let tok_cfg = tokenizer_config.map(read_json).transpose()?;
        let gen_cfg = generation_config
            .map(|p| read_json(p).map(|v| (v, p)))
            .transpose()?;

        let (gen_bos, gen_eos) = match &gen_cfg {
            Some((cfg, path)) => (
                id_field(cfg, "bos_token_id", path)?.first().copied(),
                id_field(cfg, "eos_token_id", path)?,
            ),
            None => (None, Vec::new()),
        };
        let cfg_token = |key| tok_cfg.as_ref().and_then(|c| token_field(c, key));
        let bos_token =
            cfg_token("bos_token").or_else(|| gen_bos.and_then(|id| tokenizer.id_to_token(id)));
        let eos_token = cfg_token("eos_token")
            .or_else(|| gen_eos.first().and_then(|&id| tokenizer.id_to_token(id)));
        // The id the tokenizer itself uses for its BOS string wins: it is what encode() adds.
        let bos_token_id = bos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            .or(gen_bos);
        let tok_eos_id = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let mut eos_token_ids = Vec::new();
        for id in gen_eos.iter().copied().chain(tok_eos_id) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }

        let special_ids = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, tok)| tok.special)
            .map(|(id, _)| id)
            .collect();
        let decoder_json = tokenizer
            .get_decoder()
            .and_then(|d| serde_json::to_value(d).ok())
            .unwrap_or(Value::Null);
        let byte_fallback_ids = if contains_byte_fallback_decoder(&decoder_json) {
            tokenizer
                .get_vocab(true)
                .into_iter()
                .filter(|(tok, _)| is_byte_token(tok))
                .map(|(_, id)| id)
                .collect()
        } else {
            HashSet::new()
        };

        let flag = |key| tok_cfg.as_ref().and_then(|c| c.get(key)?.as_bool());
        let (bos_fix, eos_fix) = special_token_fixes(
            &tokenizer,
            flag("add_bos_token"),
            bos_token_id,
            flag("add_eos_token"),
            tok_eos_id,
        );

        let chat_template = match (&tok_cfg, tokenizer_config) {
            (Some(cfg), Some(cfg_path)) => {
                load_chat_template(cfg, cfg_path, bos_token.clone(), eos_token.clone())?
            }
            _ => None,
        };

        Ok(Self {
            inner: Arc::new(Inner {
                tokenizer,
                bos_token,
                eos_token,
                bos_token_id,
                eos_token_ids,
                special_ids,
                byte_fallback_ids,
                bos_fix,
                eos_fix,
            }),
            chat_template,
        })
    }

    /// The same tokenizer with another chat template (`--chat-template`).
    pub fn with_chat_template(mut self, template: Option<ChatTemplate>) -> Self {
        self.chat_template = template;
        self
    }

    /// Token ids of `text`. With `add_special_tokens` the BOS (and EOS where configured) are
    /// added as transformers does; special-token strings inside `text` (e.g. `<s>` emitted by a
    /// chat template) always map to their ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        let encoding = self
            .inner
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens {
            match self.inner.bos_fix {
                Fix::Add(id) => ids.insert(0, id),
                Fix::Strip(id) if ids.first() == Some(&id) => {
                    ids.remove(0);
                }
                _ => {}
            }
            match self.inner.eos_fix {
                Fix::Add(id) => ids.push(id),
                Fix::Strip(id) if ids.last() == Some(&id) => {
                    ids.pop();
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.inner
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.tokenizer.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos_token.as_deref()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id
    }

    /// Every id that ends generation: `generation_config.json`'s `eos_token_id` (int or list)
    /// and the id of `tokenizer_config.json`'s `eos_token`, deduplicated, in that order.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.eos_token_ids
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(tok)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tokenizer.id_to_token(id)
    }

    /// Whether `id` is an added token flagged special (dropped by `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.special_ids.contains(&id)
    }

    /// Whether `id` is a `<0xNN>` byte-fallback token that the decoder merges with its
    /// neighbours into UTF-8 (so its text is not final until the byte run ends).
    pub fn is_byte_fallback(&self, id: u32) -> bool {
        self.inner.byte_fallback_ids.contains(&id)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner.tokenizer
    }
}

/// The chat template from `tokenizer_config.json`, else from `chat_template.jinja` /
/// `chat_template.json` beside it (where newer transformers versions save it). A template that
/// does not compile is logged and dropped: plain completions must keep working.
fn load_chat_template(
    config: &Value,
    config_path: &Path,
    bos_token: Option<String>,
    eos_token: Option<String>,
) -> Result<Option<ChatTemplate>, TextError> {
    let source = template_source_from_config(config).map_err(|message| TextError::Config {
        path: config_path.to_path_buf(),
        message,
    })?;
    let result = match source {
        Some(source) => ChatTemplate::new(source, bos_token, eos_token),
        None => {
            let dir = config_path.parent().unwrap_or(Path::new("."));
            let candidates = [
                dir.join("chat_template.jinja"),
                dir.join("chat_template.json"),
            ];
            match candidates.into_iter().find(|p| p.is_file()) {
                Some(path) => ChatTemplate::from_file(&path, bos_token, eos_token),
                None => return Ok(None),
            }
        }
    };
    match result {
        Ok(template) => Ok(Some(template)),
        Err(err) => {
            tracing::warn!("ignoring the model's chat template: {err}");
            Ok(None)
        }
    }
}

/// Compares what the `tokenizer.json` post-processor adds with the `add_bos_token` /
/// `add_eos_token` flags; transformers rebuilds the post-processor from those flags, so they win.
fn special_token_fixes(
    tokenizer: &tokenizers::Tokenizer,
    add_bos: Option<bool>,
    bos_id: Option<u32>,
    add_eos: Option<bool>,
    eos_id: Option<u32>,
) -> (Fix, Fix) {
    let probe = |special| {
        tokenizer
            .encode("a", special)
            .map(|e| e.get_ids().to_vec())
            .ok()
    };
    let (Some(with), Some(without)) = (probe(true), probe(false)) else {
        return (Fix::None, Fix::None);
    };
    let fix =
        |wanted: Option<bool>, id: Option<u32>, added: &dyn Fn(u32) -> bool| match (wanted, id) {
            (Some(true), Some(id)) if !added(id) => Fix::Add(id),
            (Some(false), Some(id)) if added(id) => Fix::Strip(id),
            _ => Fix::None,
        };
    let bos_fix = fix(add_bos, bos_id, &|id| {
        with.first() == Some(&id) && without.first() != Some(&id)
    });
    let eos_fix = fix(add_eos, eos_id, &|id| {
        with.last() == Some(&id) && without.last() != Some(&id)
    });
    if bos_fix != Fix::None || eos_fix != Fix::None {
        tracing::debug!(
            ?bos_fix,
            ?eos_fix,
            "tokenizer_config.json overrides the post-processor"
        );
    }
    (bos_fix, eos_fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_token_pattern() {
        assert!(is_byte_token("<0xE6>"));
        assert!(is_byte_token("<0x0a>"));
        assert!(!is_byte_token("<0xG6>"));
        assert!(!is_byte_token("<0xE6"));
        assert!(!is_byte_token("▁<0xE6>"));
    }

    #[test]
    fn special_token_fields() {
        let cfg = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "pad_token": null,
        });
        assert_eq!(token_field(&cfg, "bos_token").as_deref(), Some("<s>"));
        assert_eq!(token_field(&cfg, "eos_token").as_deref(), Some("</s>"));
        assert_eq!(token_field(&cfg, "pad_token"), None);
        let p = Path::new("generation_config.json");
        let gen = serde_json::json!({"eos_token_id": [2, 32000], "bos_token_id": 1, "pad": null});
        assert_eq!(id_field(&gen, "eos_token_id", p).unwrap(), vec![2, 32000]);
        assert_eq!(id_field(&gen, "bos_token_id", p).unwrap(), vec![1]);
        assert_eq!(id_field(&gen, "pad", p).unwrap(), Vec::<u32>::new());
        assert!(id_field(&serde_json::json!({"x": "two"}), "x", p).is_err());
    }
}
