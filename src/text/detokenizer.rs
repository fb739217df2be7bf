//! Streaming detokenization.
//!
//! Decoding token by token is wrong for sentencepiece tokenizers: the decoder drops the leading
//! space of the first token it sees, and `<0xNN>` byte-fallback tokens only become text once the
//! whole UTF-8 sequence is there. We use the prefix-offset/read-offset technique of vLLM and
//! TGI: keep a short window of already emitted tokens as left context, decode the window with
//! and without the new tokens, and emit only the difference.
//!
//! We hold back in two cases, so that what we emit is never revised:
//! * the window's text ends with U+FFFD: an incomplete UTF-8 sequence (byte-level BPE) that the
//!   next tokens may complete;
//! * the last visible token is a `<0xNN>` byte-fallback token: the `ByteFallback` decoder turns a
//!   whole run of byte tokens into text if the run is valid UTF-8 and into one U+FFFD per byte
//!   otherwise, so even a complete character may still turn into U+FFFDs if the run goes on
//!   with bad bytes. Characters spelt in bytes are therefore emitted with the next ordinary
//!   token (or by `flush`).
//!
//! Invariant (tested): the deltas plus `flush` concatenate to exactly
//! `decode(prompt + generated)` with the `decode(prompt)` prefix removed, i.e. the generated
//! text as the user sees it after the prompt, leading space included.

use super::tokenizer::{TextError, Tokenizer};

/// Prompt tokens kept as left context (as in vLLM).
const INITIAL_CONTEXT_TOKENS: usize = 5;

pub struct IncrementalDetokenizer {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// Tokens from the prefix offset on: `window[..read]` is context already accounted for
    /// (emitted, or prompt), `window[read..]` is held back.
    window: Vec<u32>,
    read: usize,
    /// Cached `decode(window[..read])`; recomputed after the window moves.
    prefix_text: Option<String>,
    /// The last token the decoder sees is a byte-fallback token.
    in_byte_run: bool,
}

impl IncrementalDetokenizer {
    /// `prompt_ids` only provide left context; their text is not emitted.
    pub fn new(tokenizer: Tokenizer, prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let visible = |id: u32| !(skip_special_tokens && tokenizer.is_special(id));
        // At least a few tokens, and at least one the decoder sees: the decoder strips the
        // leading space of the first token it gets, which must not be a generated one.
        let mut start = prompt_ids.len().saturating_sub(INITIAL_CONTEXT_TOKENS);
        while start > 0 && !prompt_ids[start..].iter().any(|&id| visible(id)) {
            start -= 1;
        }
        let window = prompt_ids[start..].to_vec();
        Self {
            read: window.len(),
            window,
            tokenizer,
            skip_special_tokens,
            prefix_text: None,
            in_byte_run: false,
        }
    }

    /// Adds a generated token; returns the text that became final (often empty).
    pub fn push(&mut self, id: u32) -> Result<String, TextError> {
        self.window.push(id);
        if !(self.skip_special_tokens && self.tokenizer.is_special(id)) {
            self.in_byte_run = self.tokenizer.is_byte_fallback(id);
        }
        if self.in_byte_run {
            return Ok(String::new());
        }
        self.emit(false)
    }

    /// Emits everything still held back, e.g. a dangling incomplete UTF-8 sequence, which
    /// comes out as U+FFFD exactly as a full decode renders it. Call once generation ended.
    pub fn flush(&mut self) -> Result<String, TextError> {
        self.in_byte_run = false;
        self.emit(true)
    }

    fn emit(&mut self, force: bool) -> Result<String, TextError> {
        if self.read == self.window.len() {
            return Ok(String::new());
        }
        let prefix = match self.prefix_text.take() {
            Some(text) => text,
            None => self
                .tokenizer
                .decode(&self.window[..self.read], self.skip_special_tokens)?,
        };
        let text = self
            .tokenizer
            .decode(&self.window, self.skip_special_tokens)?;
        let start = if text.starts_with(&prefix) {
            prefix.len()
        } else {
            // Should not happen with sentencepiece/byte-level decoders (the window starts
            // where the previous emission ended); emit what changed rather than nothing.
            tracing::debug!(%prefix, %text, "window prefix was revised by later tokens");
            common_prefix_len(&prefix, &text)
        };
        // No new text (e.g. a skipped special token) or an unfinished character: keep the
        // window, so the context of the next token stays intact.
        if text.len() <= start || (!force && text.ends_with('\u{FFFD}')) {
            self.prefix_text = Some(prefix);
            return Ok(String::new());
        }
        let delta = text[start..].to_string();
        self.window.drain(..self.read);
        self.read = self.window.len();
        Ok(delta)
    }
}

/// Length in bytes of the longest common prefix, on a character boundary of both strings.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
        Tokenizer::from_files(&dir.join("tokenizer.json"), None, None).unwrap()
    }

    /// Id of the `<0xNN>` token for `byte`.
    fn byte(tok: &Tokenizer, byte: u8) -> u32 {
        let id = tok.token_to_id(&format!("<0x{byte:02X}>")).unwrap();
        assert!(tok.is_byte_fallback(id));
        id
    }

    fn stream(tok: &Tokenizer, prompt: &[u32], ids: &[u32]) -> Vec<String> {
        let mut d = IncrementalDetokenizer::new(tok.clone(), prompt, true);
        let mut deltas: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
        deltas.push(d.flush().unwrap());
        deltas
    }

    #[test]
    fn byte_run_is_held_until_the_run_ends() {
        let tok = fixture_tokenizer();
        let prompt = tok.encode("Say", true).unwrap();
        let ok = tok.encode("ok", false).unwrap();
        assert_eq!(ok.len(), 1);
        // 日 = E6 97 A5, 本 = E6 9C AC: nothing comes out while the run may still go on.
        let mut ids = [0xE6, 0x97, 0xA5, 0xE6, 0x9C, 0xAC]
            .map(|b| byte(&tok, b))
            .to_vec();
        ids.push(ok[0]);
        let deltas = stream(&tok, &prompt, &ids);
        assert_eq!(deltas, ["", "", "", "", "", "", "日本 ok", ""]);
    }

    #[test]
    fn complete_character_turns_into_replacements_when_the_run_goes_bad() {
        // The ByteFallback decoder renders an invalid run as one U+FFFD per byte, including
        // the bytes of the complete 日: emitting 日 early would have been wrong.
        let tok = fixture_tokenizer();
        let prompt = tok.encode("Say", true).unwrap();
        let mut ids = [0xE6, 0x97, 0xA5, 0xE6].map(|b| byte(&tok, b)).to_vec();
        ids.extend(tok.encode("ok", false).unwrap());
        let deltas = stream(&tok, &prompt, &ids);
        assert_eq!(deltas.concat(), "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD} ok");
        let mut all = prompt.clone();
        all.extend(&ids);
        let full = tok.decode(&all, true).unwrap();
        assert_eq!(full, format!("Say{}", deltas.concat()));
    }

    #[test]
    fn dangling_bytes_come_out_on_flush() {
        let tok = fixture_tokenizer();
        let prompt = tok.encode("Say", true).unwrap();
        let ids = [0xF0, 0x9F].map(|b| byte(&tok, b));
        let deltas = stream(&tok, &prompt, &ids);
        assert_eq!(deltas, ["", "", "\u{FFFD}\u{FFFD}"]);
    }

    #[test]
    fn skipped_special_token_inside_a_byte_run_keeps_it_open() {
        let tok = fixture_tokenizer();
        let prompt = tok.encode("Say", true).unwrap();
        let eos = tok.token_to_id("</s>").unwrap();
        let ids = [byte(&tok, 0xE6), eos, byte(&tok, 0x97), byte(&tok, 0xA5)];
        let deltas = stream(&tok, &prompt, &ids);
        assert_eq!(deltas, ["", "", "", "", "日"]);
    }

    #[test]
    fn leading_space_is_kept_after_context() {
        let tok = fixture_tokenizer();
        let prompt = tok.encode("The capital of France is", true).unwrap();
        let ids = tok.encode("Paris, of course", false).unwrap();
        assert_eq!(stream(&tok, &prompt, &ids).concat(), " Paris, of course");
        // Without context the decoder drops the first space, as a plain decode does.
        assert_eq!(stream(&tok, &[], &ids).concat(), "Paris, of course");
        // A prompt of special tokens only gives no context either.
        assert_eq!(stream(&tok, &[1], &ids).concat(), "Paris, of course");
    }

    #[test]
    fn common_prefix_is_char_aligned() {
        assert_eq!(common_prefix_len("abc", "abd"), 2);
        assert_eq!(common_prefix_len("日本", "日木"), 3);
        assert_eq!(common_prefix_len("ab", "abc"), 2);
        assert_eq!(common_prefix_len("", "x"), 0);
    }
}
