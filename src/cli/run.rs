//! `mixserve run`: a one-shot completion (`--prompt`) or an interactive chat on a terminal,
//! streaming tokens to stdout as they are made.

use super::ModelArgs;
use crate::engine::{Engine, Event, FinishReason, Request, SamplingParams, Usage};
use crate::text::ChatMessage;
use anyhow::{bail, Context, Result};
use rustyline::error::ReadlineError;
use std::io::{IsTerminal, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The prompt. Without it: an interactive chat on a terminal, or the prompt read from stdin.
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,

    /// Apply the model's chat template to --prompt (as one user message).
    #[arg(long)]
    pub chat: bool,

    /// A system message for chat mode (only if the model's template accepts one).
    #[arg(long)]
    pub system: Option<String>,

    /// Most tokens to generate per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,

    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,

    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl RunArgs {
    fn request(&self, prompt: Vec<u32>) -> Result<Request> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            ..SamplingParams::default()
        };
        if let Err(e) = sampling.validate() {
            bail!("--{}", e.replace('_', "-"));
        }
        Ok(Request {
            sampling,
            ..Request::greedy(prompt, self.max_tokens)
        })
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let interactive = args.prompt.is_none() && std::io::stdin().is_terminal();
    let (files, engine) = args.model.start_engine()?;
    if interactive {
        return chat_loop(&args, &files.name, &engine);
    }
    let prompt = match &args.prompt {
        Some(p) => p.clone(),
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            s
        }
    };
    let ids = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.as_str()));
        }
        messages.push(ChatMessage::new("user", prompt));
        chat_prompt(&engine, &messages)?
    } else {
        engine.tokenizer().encode(&prompt, true)?
    };
    let answer = stream_answer(&engine, args.request(ids)?, None)?;
    println!();
    answer.report();
    Ok(())
}

/// Renders a conversation with the chat template and tokenizes it without adding special
/// tokens again (the template writes its own BOS).
fn chat_prompt(engine: &Engine, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    let tokenizer = engine.tokenizer();
    let template = tokenizer
        .chat_template()
        .context("this model has no chat template (pass one with --chat-template)")?;
    let text = template.render(messages, true)?;
    Ok(tokenizer.encode(&text, false)?)
}

struct Answer {
    text: String,
    usage: Usage,
    finish: FinishReason,
    first_token: Duration,
    decode: Duration,
}

impl Answer {
    fn report(&self) {
        let rate = if self.usage.completion_tokens > 1 && !self.decode.is_zero() {
            (self.usage.completion_tokens - 1) as f64 / self.decode.as_secs_f64()
        } else {
            0.0
        };
        eprintln!(
            "[{} prompt tokens ({} cached), first token after {:.2}s, {} tokens at {:.1} tok/s, finish: {}]",
            self.usage.prompt_tokens,
            self.usage.cached_tokens,
            self.first_token.as_secs_f64(),
            self.usage.completion_tokens,
            rate,
            self.finish.as_str()
        );
    }
}

/// Submits `request` and prints its text as it streams in; `interrupt` cancels it.
fn stream_answer(
    engine: &Engine,
    request: Request,
    interrupt: Option<&AtomicBool>,
) -> Result<Answer> {
    let started = Instant::now();
    let mut stream = engine.submit(request)?;
    let mut out = std::io::stdout().lock();
    let mut answer = Answer {
        text: String::new(),
        usage: Usage::default(),
        finish: FinishReason::Abort,
        first_token: Duration::ZERO,
        decode: Duration::ZERO,
    };
    let mut first = None;
    let mut write = |text: &str, answer: &mut Answer| -> bool {
        answer.text.push_str(text);
        // A closed stdout (`| head`) ends the answer, not the program with a panic.
        out.write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_ok()
    };
    while let Some(event) = stream.blocking_recv() {
        if interrupt.is_some_and(|f| f.swap(false, Ordering::SeqCst)) {
            // Dropping the stream cancels the request and frees its KV blocks.
            answer.finish = FinishReason::Abort;
            return Ok(answer);
        }
        match event {
            Event::Token { text, .. } => {
                let now = Instant::now();
                first.get_or_insert(now);
                answer.first_token = first.map_or(Duration::ZERO, |f| f - started);
                if !write(&text, &mut answer) {
                    return Ok(answer);
                }
            }
            Event::Finished { text, reason, .. } => {
                write(&text, &mut answer);
                answer.finish = reason;
            }
            Event::Done(usage) => {
                answer.usage = usage;
                answer.decode = first.map_or(Duration::ZERO, |f| f.elapsed());
                return Ok(answer);
            }
            Event::Error(msg) => bail!("{msg}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    bail!("the engine stopped before the answer was complete")
}

fn chat_loop(args: &RunArgs, name: &str, engine: &Engine) -> Result<()> {
    // Ctrl-C while an answer streams stops that answer; at the prompt, the line editor takes
    // it (the terminal is in raw mode there) and we just show a new prompt.
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let mut editor = rustyline::DefaultEditor::new().context("opening the terminal")?;
    let base: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    let mut history = base.clone();
    eprintln!(
        "{name}: chat. /reset clears the conversation, Ctrl-C stops an answer, Ctrl-D exits."
    );
    loop {
        let line = match editor.readline(">>> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => return Ok(()),
            Err(e) => return Err(e).context("reading input"),
        };
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(input);
        if input == "/reset" {
            history = base.clone();
            eprintln!("(conversation cleared)");
            continue;
        }
        history.push(ChatMessage::new("user", input));
        let answer = chat_prompt(engine, &history)
            .and_then(|ids| args.request(ids))
            .and_then(|req| {
                interrupt.store(false, Ordering::SeqCst);
                stream_answer(engine, req, Some(&interrupt))
            });
        match answer {
            Ok(answer) => {
                println!();
                answer.report();
                history.push(ChatMessage::new("assistant", answer.text));
            }
            Err(e) => {
                eprintln!("\nerror: {e:#}");
                history.pop();
            }
        }
    }
}
