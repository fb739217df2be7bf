//! `POST /v1/chat/completions`.

use super::collect::{collect, new_id, sse_response, unix_now, ChunkWriter, Timing};
use super::error::ApiError;
use super::extract::JsonBody;
use super::openai::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessageOut, ChatRequest,
    ChatResponse, ChatTokenLogprob, MessageContent, TopLogprob, UsageOut,
};
use super::params::{build_request, Limits};
use super::tokens::token_strings;
use super::AppState;
use crate::engine::{Event, TokenLogprob, Usage};
use crate::text::{ChatMessage, TemplateError, Tokenizer};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    let engine = app.engine()?;
    app.check_model(req.common.model.as_deref())?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) || req.tool_choice.is_some() {
        return Err(ApiError::invalid_param(
            "tools",
            "tools and tool_choice are not supported yet",
        ));
    }
    if let Some(f) = &req.response_format {
        if f.kind != "text" {
            return Err(ApiError::invalid_param(
                "response_format",
                format!(
                    "response_format {:?} is not supported yet (only \"text\")",
                    f.kind
                ),
            ));
        }
    }
    req.common.check_stream_options()?;
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            "top_logprobs requires logprobs: true",
        ));
    }
    let messages = messages(&req)?;
    let tokenizer = engine.tokenizer().clone();
    // `--chat-template` replaced the model's own in the tokenizer at load time.
    let template = tokenizer.chat_template().ok_or_else(|| {
        ApiError::bad_request(
            "this model has no chat template; start the server with --chat-template",
        )
    })?;
    let text = template
        .render(&messages, req.add_generation_prompt.unwrap_or(true))
        .map_err(|e| match e {
            TemplateError::Raised(msg) => ApiError::invalid_param("messages", msg),
            other => ApiError::invalid_param("messages", other.to_string()),
        })?;
    // The template writes its own special tokens (BOS): don't add them again.
    let prompt = tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid_param("messages", format!("cannot tokenize: {e}")))?;
    let context = engine.max_context();
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(0) => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(m) => m,
        // Up to the context, as OpenAI does for chat.
        None => context.saturating_sub(prompt.len()).max(1),
    };
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let limits = Limits {
        vocab_size: engine.model().config().vocab_size,
    };
    let request = build_request(
        &req.common,
        prompt.clone(),
        max_tokens,
        logprobs,
        None,
        "top_logprobs",
        &limits,
    )?;
    let n = request.n;
    let ctx = Ctx {
        tokenizer,
        prompt,
        logprobs: logprobs.is_some(),
        as_ids: req.common.return_tokens_as_token_ids,
        id: new_id("chatcmpl"),
        created: unix_now(),
        model: app.served_name.clone(),
    };
    let rx = super::stream::launch(&engine, vec![request])?;
    let timing = Timing::new(app.metrics.clone());
    if req.common.stream {
        let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
        let writer = Writer {
            ctx,
            include_usage,
            started: vec![false; n],
            generated: vec![Vec::new(); n],
        };
        return Ok(sse_response(rx, 1, writer, timing));
    }
    let collected = collect(rx, 1, n, timing).await?;
    let choices = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| ChatChoice {
            index,
            logprobs: ctx
                .logprobs
                .then(|| ctx.render(&ctx.prompt, &c.tokens, &c.logprobs)),
            message: ChatMessageOut {
                role: "assistant",
                content: c.text,
            },
            finish_reason: c.finish.map(|f| f.as_str()),
        })
        .collect();
    Ok(axum::Json(ChatResponse {
        id: ctx.id,
        object: "chat.completion",
        created: ctx.created,
        model: ctx.model,
        choices,
        usage: UsageOut::from(collected.usage),
    })
    .into_response())
}

/// The request's messages as the template sees them (text parts joined).
fn messages(req: &ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty",
        ));
    }
    req.messages
        .iter()
        .map(|m| {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "developer"
            ) {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!(
                        "unsupported role {:?} (use system, user or assistant)",
                        m.role
                    ),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid_param(
                                    "messages",
                                    format!("content parts of type {kind:?} are not supported"),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

struct Ctx {
    tokenizer: Tokenizer,
    prompt: Vec<u32>,
    logprobs: bool,
    as_ids: bool,
    id: String,
    created: u64,
    model: String,
}

impl Ctx {
    fn render(&self, context: &[u32], ids: &[u32], entries: &[TokenLogprob]) -> ChatLogprobs {
        let strings = token_strings(&self.tokenizer, context, ids, self.as_ids);
        let alt = |t: u32| {
            token_strings(&self.tokenizer, &[], &[t], self.as_ids)
                .pop()
                .unwrap_or_default()
        };
        let content = strings
            .into_iter()
            .zip(entries)
            .map(|((token, bytes), e)| ChatTokenLogprob {
                token,
                logprob: e.logprob,
                bytes,
                top_logprobs: e
                    .top
                    .iter()
                    .map(|&(t, logprob)| {
                        let (token, bytes) = alt(t);
                        TopLogprob {
                            token,
                            logprob,
                            bytes,
                        }
                    })
                    .collect(),
            })
            .collect();
        ChatLogprobs { content }
    }

    fn chunk(&self, choice: ChatChunkChoice) -> String {
        serde_json::to_string(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![choice],
            usage: None,
        })
        .unwrap_or_default()
    }
}

struct Writer {
    ctx: Ctx,
    include_usage: bool,
    /// Whether each choice's first chunk (with the role) went out.
    started: Vec<bool>,
    generated: Vec<Vec<u32>>,
}

impl Writer {
    fn start(&mut self, index: usize, out: &mut Vec<String>) {
        if !self.started[index] {
            self.started[index] = true;
            out.push(self.ctx.chunk(ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            }));
        }
    }
}

impl ChunkWriter for Writer {
    fn on_event(&mut self, _prompt: usize, event: Event) -> Vec<String> {
        let mut out = Vec::new();
        match event {
            Event::Token {
                index,
                token,
                text,
                logprob,
                ..
            } => {
                self.start(index, &mut out);
                let mut context = self.ctx.prompt.clone();
                context.extend(&self.generated[index]);
                self.generated[index].push(token);
                let logprobs = match (self.ctx.logprobs, logprob) {
                    (true, Some(lp)) => Some(self.ctx.render(&context, &[token], &[lp])),
                    _ => None,
                };
                if !text.is_empty() || logprobs.is_some() {
                    out.push(self.ctx.chunk(ChatChunkChoice {
                        index,
                        delta: ChatDelta {
                            role: None,
                            content: Some(text),
                        },
                        logprobs,
                        finish_reason: None,
                    }));
                }
            }
            Event::Finished {
                index,
                reason,
                text,
                ..
            } => {
                self.start(index, &mut out);
                if !text.is_empty() {
                    out.push(self.ctx.chunk(ChatChunkChoice {
                        index,
                        delta: ChatDelta {
                            role: None,
                            content: Some(text),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }));
                }
                out.push(self.ctx.chunk(ChatChunkChoice {
                    index,
                    delta: ChatDelta::default(),
                    logprobs: None,
                    finish_reason: Some(reason.as_str()),
                }));
            }
            Event::PromptLogprobs(_) | Event::Done(_) | Event::Error(_) => {}
        }
        out
    }

    fn on_done(&mut self, u: Usage) -> Vec<String> {
        if !self.include_usage {
            return Vec::new();
        }
        vec![serde_json::to_string(&ChatChunk {
            id: self.ctx.id.clone(),
            object: "chat.completion.chunk",
            created: self.ctx.created,
            model: self.ctx.model.clone(),
            choices: Vec::new(),
            usage: Some(UsageOut::from(u)),
        })
        .unwrap_or_default()]
    }
}
