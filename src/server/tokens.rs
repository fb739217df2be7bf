//! Per-token strings for logprobs: each token's text in its context, so the strings of a
//! choice's tokens join to its text.

use crate::text::Tokenizer;

/// Tokens of left context used to decode a token's text (enough for sentencepiece spacing and
/// multi-byte characters).
const WINDOW: usize = 4;

/// The string and bytes of each of `ids` after `context`.
pub fn token_strings(
    tokenizer: &Tokenizer,
    context: &[u32],
    ids: &[u32],
    as_token_ids: bool,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(ids.len());
    let mut history: Vec<u32> = context[context.len().saturating_sub(WINDOW)..].to_vec();
    for &id in ids {
        if as_token_ids {
            let s = format!("token_id:{id}");
            out.push((s.clone(), s.into_bytes()));
            continue;
        }
        let window = &history[history.len().saturating_sub(WINDOW)..];
        let piece = match (
            tokenizer.decode(window, false),
            tokenizer.decode(&[window, &[id]].concat(), false),
        ) {
            (Ok(prefix), Ok(full)) if full.starts_with(&prefix) => full[prefix.len()..].to_string(),
            _ => tokenizer.decode(&[id], false).unwrap_or_default(),
        };
        let entry = match byte_fallback_value(tokenizer, id) {
            // Half a character: report the raw byte, as OpenAI does.
            Some(b) if piece.contains('\u{FFFD}') || piece.is_empty() => {
                (format!("bytes:\\x{b:02x}"), vec![b])
            }
            _ => {
                let bytes = piece.as_bytes().to_vec();
                (piece, bytes)
            }
        };
        out.push(entry);
        history.push(id);
    }
    out
}

fn byte_fallback_value(tokenizer: &Tokenizer, id: u32) -> Option<u8> {
    if !tokenizer.is_byte_fallback(id) {
        return None;
    }
    let t = tokenizer.id_to_token(id)?;
    u8::from_str_radix(t.get(3..5)?, 16).ok()
}
