//! `POST /v1/completions`.

use super::collect::{collect, new_id, sse_response, unix_now, ChunkWriter, Timing};
use super::error::ApiError;
use super::extract::JsonBody;
use super::openai::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, PromptInput,
    UsageOut,
};
use super::params::{build_request, Limits};
use super::tokens::token_strings;
use super::AppState;
use crate::engine::{Event, TokenLogprob, Usage};
use crate::text::Tokenizer;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub async fn completions(
    State(app): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let engine = app.engine()?;
    app.check_model(req.common.model.as_deref())?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    let n = req.common.n.unwrap_or(1);
    if req.best_of.is_some_and(|b| b != n && b > 1) {
        return Err(ApiError::invalid_param(
            "best_of",
            "best_of other than n is not supported",
        ));
    }
    req.common.check_stream_options()?;
    let tokenizer = engine.tokenizer().clone();
    let (prompts, texts) = tokenize_prompts(&tokenizer, req.prompt)?;
    let max_tokens = req.max_tokens.unwrap_or(16);
    if max_tokens == 0 && !req.echo {
        return Err(ApiError::invalid_param(
            "max_tokens",
            "max_tokens must be at least 1 (0 only with echo)",
        ));
    }
    let limits = Limits {
        vocab_size: engine.model().config().vocab_size,
    };
    let prompt_logprobs = if req.echo { req.logprobs } else { None };
    let mut requests = Vec::with_capacity(prompts.len());
    for p in &prompts {
        requests.push(build_request(
            &req.common,
            p.clone(),
            max_tokens,
            req.logprobs,
            prompt_logprobs,
            "logprobs",
            &limits,
        )?);
    }
    let ctx = Ctx {
        tokenizer,
        prompts,
        texts,
        echo: req.echo,
        logprobs: req.logprobs.is_some(),
        as_ids: req.common.return_tokens_as_token_ids,
        n,
        id: new_id("cmpl"),
        created: unix_now(),
        model: app.served_name.clone(),
    };
    let rx = super::stream::launch(&engine, requests)?;
    let timing = Timing::new(app.metrics.clone());
    if req.common.stream {
        let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
        let num = ctx.prompts.len();
        let writer = Writer {
            ctx,
            include_usage,
            generated: vec![Vec::new(); num * n],
            offsets: vec![0; num * n],
        };
        return Ok(sse_response(rx, num, writer, timing));
    }
    let collected = collect(rx, ctx.prompts.len(), n, timing).await?;
    let mut choices = Vec::with_capacity(collected.choices.len());
    for (i, c) in collected.choices.into_iter().enumerate() {
        let p = i / n;
        let mut text = String::new();
        let mut logprobs = ctx.logprobs.then(CompletionLogprobs::default);
        if ctx.echo {
            text.push_str(&ctx.texts[p]);
            if let Some(lp) = logprobs.as_mut() {
                let plp = collected.prompt_logprobs[p].clone().unwrap_or_default();
                lp.extend(ctx.render(&[], &ctx.prompts[p], &plp, 0));
            }
        }
        if let Some(lp) = logprobs.as_mut() {
            let entries: Vec<Option<TokenLogprob>> = c.logprobs.iter().cloned().map(Some).collect();
            lp.extend(ctx.render(&ctx.prompts[p], &c.tokens, &entries, text.len()));
        }
        text.push_str(&c.text);
        choices.push(CompletionChoice {
            text,
            index: i,
            logprobs,
            finish_reason: c.finish.map(|f| f.as_str()),
        });
    }
    Ok(axum::Json(CompletionResponse {
        id: ctx.id,
        object: "text_completion",
        created: ctx.created,
        model: ctx.model,
        choices,
        usage: Some(UsageOut::from(collected.usage)),
    })
    .into_response())
}

/// Prompts as token ids, with their text (for `echo`).
fn tokenize_prompts(
    tokenizer: &Tokenizer,
    prompt: PromptInput,
) -> Result<(Vec<Vec<u32>>, Vec<String>), ApiError> {
    let encode = |t: &str| {
        tokenizer
            .encode(t, true)
            .map_err(|e| ApiError::invalid_param("prompt", format!("cannot tokenize: {e}")))
    };
    let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();
    let (ids, texts): (Vec<Vec<u32>>, Vec<String>) = match prompt {
        PromptInput::Text(t) => (vec![encode(&t)?], vec![t]),
        PromptInput::Texts(ts) => {
            let ids = ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?;
            (ids, ts)
        }
        PromptInput::Tokens(ids) => {
            let t = decode(&ids);
            (vec![ids], vec![t])
        }
        PromptInput::TokenLists(lists) => {
            let texts = lists.iter().map(|l| decode(l)).collect();
            (lists, texts)
        }
    };
    if ids.is_empty() || ids.iter().any(|p| p.is_empty()) {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    Ok((ids, texts))
}

struct Ctx {
    tokenizer: Tokenizer,
    prompts: Vec<Vec<u32>>,
    texts: Vec<String>,
    echo: bool,
    logprobs: bool,
    as_ids: bool,
    n: usize,
    id: String,
    created: u64,
    model: String,
}

impl Ctx {
    /// Completions-style logprobs for `ids` (after `context`), text offsets from `offset`.
    fn render(
        &self,
        context: &[u32],
        ids: &[u32],
        entries: &[Option<TokenLogprob>],
        mut offset: usize,
    ) -> CompletionLogprobs {
        let strings = token_strings(&self.tokenizer, context, ids, self.as_ids);
        let name = |t: u32| {
            token_strings(&self.tokenizer, &[], &[t], self.as_ids)
                .pop()
                .map(|s| s.0)
                .unwrap_or_default()
        };
        let mut out = CompletionLogprobs::default();
        for (i, (s, _)) in strings.into_iter().enumerate() {
            let entry = entries.get(i).cloned().flatten();
            out.text_offset.push(offset);
            offset += s.len();
            out.tokens.push(s);
            out.token_logprobs.push(entry.as_ref().map(|e| e.logprob));
            out.top_logprobs.push(entry.map(|e| {
                e.top
                    .iter()
                    .map(|&(t, lp)| (name(t), serde_json::Value::from(lp)))
                    .collect()
            }));
        }
        out
    }

    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&'static str>,
    ) -> String {
        let resp = CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![CompletionChoice {
                text,
                index,
                logprobs,
                finish_reason: finish,
            }],
            usage: None,
        };
        serde_json::to_string(&resp).unwrap_or_default()
    }
}

struct Writer {
    ctx: Ctx,
    include_usage: bool,
    /// Tokens generated so far per choice (context for token strings).
    generated: Vec<Vec<u32>>,
    /// Text offset per choice.
    offsets: Vec<usize>,
}

impl ChunkWriter for Writer {
    fn on_event(&mut self, p: usize, event: Event) -> Vec<String> {
        let n = self.ctx.n;
        match event {
            Event::PromptLogprobs(lp) => {
                // With echo, every choice of this prompt starts with the prompt and its logprobs.
                (0..n)
                    .map(|s| {
                        let i = p * n + s;
                        let logprobs = self.ctx.render(&[], &self.ctx.prompts[p], &lp, 0);
                        self.offsets[i] = self.ctx.texts[p].len();
                        self.ctx
                            .chunk(i, self.ctx.texts[p].clone(), Some(logprobs), None)
                    })
                    .collect()
            }
            Event::Token {
                index,
                token,
                text,
                logprob,
                ..
            } => {
                let i = p * n + index;
                let mut out = Vec::new();
                if self.ctx.echo
                    && !self.ctx.logprobs
                    && self.generated[i].is_empty()
                    && self.offsets[i] == 0
                {
                    // Echo without logprobs: the prompt text first.
                    self.offsets[i] = self.ctx.texts[p].len();
                    out.push(self.ctx.chunk(i, self.ctx.texts[p].clone(), None, None));
                }
                let mut context = self.ctx.prompts[p].clone();
                context.extend(&self.generated[i]);
                self.generated[i].push(token);
                let logprobs = self.ctx.logprobs.then(|| {
                    self.ctx
                        .render(&context, &[token], &[logprob], self.offsets[i])
                });
                self.offsets[i] += text.len();
                if !text.is_empty() || logprobs.is_some() {
                    out.push(self.ctx.chunk(i, text, logprobs, None));
                }
                out
            }
            Event::Finished {
                index,
                reason,
                text,
                ..
            } => {
                let i = p * n + index;
                let mut text = text;
                if self.ctx.echo && self.offsets[i] == 0 && self.generated[i].is_empty() {
                    // Nothing was generated (max_tokens 0): the echoed prompt is all there is.
                    text.insert_str(0, &self.ctx.texts[p]);
                }
                vec![self.ctx.chunk(i, text, None, Some(reason.as_str()))]
            }
            Event::Done(_) | Event::Error(_) => Vec::new(),
        }
    }

    fn on_done(&mut self, u: Usage) -> Vec<String> {
        if !self.include_usage {
            return Vec::new();
        }
        let resp = CompletionResponse {
            id: self.ctx.id.clone(),
            object: "text_completion",
            created: self.ctx.created,
            model: self.ctx.model.clone(),
            choices: Vec::new(),
            usage: Some(UsageOut::from(u)),
        };
        vec![serde_json::to_string(&resp).unwrap_or_default()]
    }
}
