//! OpenAI request parameters → an engine [`Request`], with the range rules well-known servers
//! apply; every refusal names the parameter.

use super::error::ApiError;
use super::openai::CommonParams;
use crate::engine::{Request, SamplingParams, MAX_LOGPROBS};

/// Most samples per prompt and stop strings per request: generous but bounded.
const MAX_N: usize = 128;
const MAX_STOP_STRINGS: usize = 16;

fn check(ok: bool, param: &str, msg: &str) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_param(param, format!("{param} {msg}")))
    }
}

pub struct Limits {
    pub vocab_size: usize,
}

/// Builds the engine request for one prompt.
pub fn build_request(
    p: &CommonParams,
    prompt: Vec<u32>,
    max_tokens: usize,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    logprobs_param: &str,
    limits: &Limits,
) -> Result<Request, ApiError> {
    let temperature = p.temperature.unwrap_or(1.0);
    check(
        temperature.is_finite() && (0.0..=2.0).contains(&temperature),
        "temperature",
        "must be between 0 and 2",
    )?;
    let top_p = p.top_p.unwrap_or(1.0);
    check(top_p > 0.0 && top_p <= 1.0, "top_p", "must be in (0, 1]")?;
    let top_k = p.top_k.unwrap_or(-1);
    check(
        top_k >= -1,
        "top_k",
        "must be -1 (off), 0 (off) or positive",
    )?;
    let min_p = p.min_p.unwrap_or(0.0);
    check((0.0..=1.0).contains(&min_p), "min_p", "must be in [0, 1]")?;
    let presence = p.presence_penalty.unwrap_or(0.0);
    check(
        (-2.0..=2.0).contains(&presence),
        "presence_penalty",
        "must be in [-2, 2]",
    )?;
    let frequency = p.frequency_penalty.unwrap_or(0.0);
    check(
        (-2.0..=2.0).contains(&frequency),
        "frequency_penalty",
        "must be in [-2, 2]",
    )?;
    let repetition = p.repetition_penalty.unwrap_or(1.0);
    check(
        repetition.is_finite() && repetition > 0.0,
        "repetition_penalty",
        "must be > 0",
    )?;
    let n = p.n.unwrap_or(1);
    check(
        (1..=MAX_N).contains(&n),
        "n",
        &format!("must be between 1 and {MAX_N}"),
    )?;
    // Chat's alternatives come from `top_logprobs`; prompt logprobs follow `logprobs` (echo).
    check(
        logprobs.is_none_or(|v| v <= MAX_LOGPROBS)
            && prompt_logprobs.is_none_or(|v| v <= MAX_LOGPROBS),
        logprobs_param,
        &format!("must be at most {MAX_LOGPROBS}"),
    )?;
    let stop = p.stop.as_ref().map(|s| s.to_vec()).unwrap_or_default();
    check(
        stop.len() <= MAX_STOP_STRINGS,
        "stop",
        &format!("may list at most {MAX_STOP_STRINGS} strings"),
    )?;
    let mut logit_bias = crate::engine::request::LogitBias::new();
    for (k, &v) in p.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid_param(
                "logit_bias",
                format!("logit_bias key {k:?} is not a token id"),
            )
        })?;
        check(
            (id as usize) < limits.vocab_size,
            "logit_bias",
            &format!("key {id} is outside the vocabulary"),
        )?;
        check(
            v.is_finite() && (-100.0..=100.0).contains(&v),
            "logit_bias",
            "values must be in [-100, 100]",
        )?;
        logit_bias.insert(id, v);
    }
    let stop_token_ids = p.stop_token_ids.clone().unwrap_or_default();
    check(
        stop_token_ids
            .iter()
            .all(|&t| (t as usize) < limits.vocab_size),
        "stop_token_ids",
        "must be token ids of the vocabulary",
    )?;
    let min_tokens = p.min_tokens.unwrap_or(0);
    check(
        min_tokens <= max_tokens,
        "min_tokens",
        "must not exceed max_tokens",
    )?;
    check(
        (prompt.iter()).all(|&t| (t as usize) < limits.vocab_size),
        "prompt",
        "contains token ids outside the vocabulary",
    )?;
    Ok(Request {
        prompt,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k: top_k.max(0) as usize,
            min_p,
            seed: p.seed.map(|s| s as u64),
            repetition_penalty: repetition,
            presence_penalty: presence,
            frequency_penalty: frequency,
            logit_bias,
        },
        max_tokens,
        min_tokens,
        stop,
        stop_token_ids,
        ignore_eos: p.ignore_eos,
        logprobs,
        prompt_logprobs,
        n,
        skip_special_tokens: p.skip_special_tokens.unwrap_or(true),
    })
}
