//! `mixserve run`: a one-shot completion (`--prompt`) or an interactive chat on a terminal,
//! streaming tokens to stdout as they are made.

use super::{stop_token_ids, Loaded, ModelArgs};
use crate::engine::{GenerateParams, GenerateStats, Generator, SamplingParams};
use crate::text::{ChatMessage, IncrementalDetokenizer};
use anyhow::{bail, Context, Result};
use rustyline::error::ReadlineError;
use std::io::{IsTerminal, Read, Write};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

    /// Largest prefill chunk, in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
}

impl RunArgs {
    fn params(&self, stop: Vec<u32>) -> Result<GenerateParams> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be a number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
        Ok(GenerateParams {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                min_p: 0.0,
                seed: self.seed,
            },
            max_tokens: self.max_tokens,
            stop_token_ids: stop,
        })
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let interactive = args.prompt.is_none() && std::io::stdin().is_terminal();
    let loaded = args.model.load()?;
    let params = args.params(stop_token_ids(&loaded))?;
    let mut generator = Generator::new(
        &loaded.model,
        loaded.num_blocks,
        args.model.block_size,
        args.max_num_batched_tokens,
    )?;
    if interactive {
        return chat_loop(&args, &loaded, &mut generator, &params);
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
        chat_prompt(&loaded, &messages)?
    } else {
        loaded.tokenizer.encode(&prompt, true)?
    };
    let (_, stats) = stream_answer(&loaded, &mut generator, &ids, &params, None)?;
    println!();
    report(&stats);
    Ok(())
}

/// Renders a conversation with the chat template and tokenizes it without adding special
/// tokens again (the template writes its own BOS).
fn chat_prompt(loaded: &Loaded, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    let template = loaded
        .tokenizer
        .chat_template()
        .context("this model has no chat template (pass one with --chat-template)")?;
    let text = template.render(messages, true)?;
    Ok(loaded.tokenizer.encode(&text, false)?)
}

/// Generates after `ids`, printing text deltas as they come; returns the answer's text.
fn stream_answer(
    loaded: &Loaded,
    generator: &mut Generator,
    ids: &[u32],
    params: &GenerateParams,
    interrupt: Option<&AtomicBool>,
) -> Result<(String, GenerateStats)> {
    let mut detok = IncrementalDetokenizer::new(loaded.tokenizer.clone(), ids, true);
    let mut text = String::new();
    let mut out = std::io::stdout().lock();
    let mut failure = None;
    let stats = generator.generate(ids, params, |token| {
        if interrupt.is_some_and(|f| f.swap(false, Ordering::SeqCst)) {
            return ControlFlow::Break(());
        }
        match detok.push(token) {
            Ok(delta) => {
                text.push_str(&delta);
                // A closed stdout (`| head`) ends the answer rather than the program with a panic.
                if out
                    .write_all(delta.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            }
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    let tail = detok.flush()?;
    text.push_str(&tail);
    let _ = out.write_all(tail.as_bytes()).and_then(|_| out.flush());
    Ok((text, stats))
}

fn report(stats: &GenerateStats) {
    eprintln!(
        "[{} prompt tokens ({} cached) in {:.2}s, {} tokens at {:.1} tok/s, finish: {}]",
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.prefill_time.as_secs_f64(),
        stats.generated_tokens,
        stats.decode_tokens_per_s(),
        stats.finish_reason.as_str()
    );
}

fn chat_loop(
    args: &RunArgs,
    loaded: &Loaded,
    generator: &mut Generator,
    params: &GenerateParams,
) -> Result<()> {
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
        "{}: chat. /reset clears the conversation, Ctrl-C stops an answer, Ctrl-D exits.",
        loaded.files.name
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
            generator.reset();
            eprintln!("(conversation cleared)");
            continue;
        }
        history.push(ChatMessage::new("user", input));
        let ids = match chat_prompt(loaded, &history) {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("error: {e:#}");
                history.pop();
                continue;
            }
        };
        interrupt.store(false, Ordering::SeqCst);
        match stream_answer(loaded, generator, &ids, params, Some(&interrupt)) {
            Ok((text, stats)) => {
                println!();
                report(&stats);
                history.push(ChatMessage::new("assistant", text));
            }
            Err(e) => {
                eprintln!("\nerror: {e:#}");
                history.pop();
            }
        }
    }
}
