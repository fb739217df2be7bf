//! The engine: turns many concurrent requests into one stream of batched forward passes and
//! hands each request its tokens as they are made. It knows nothing about HTTP.
//!
//! [`Engine::start`] moves the model onto an engine thread that owns the KV cache and the
//! block manager; [`Engine::submit`] returns a [`RequestStream`] of [`Event`]s. Dropping the
//! stream cancels the request at the next step and frees its blocks.

mod block_manager;
mod core;
mod outbox;
pub mod request;
mod runner;
pub mod sampler;
mod scheduler;
mod sequence;
mod warm_pool;

pub use block_manager::{block_hash, BlockError, BlockManager};
pub use request::{Event, FinishReason, Request, TokenLogprob, Usage, MAX_LOGPROBS};
pub use sampler::{Sampler, SamplingParams};
pub use scheduler::SchedulerConfig;

use crate::model::{ModelError, MoeModel};
use crate::text::Tokenizer;
use candle_core::DType;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub num_blocks: usize,
    pub block_size: usize,
    pub prefix_caching: bool,
    /// Requests queued but not yet started beyond which `submit` refuses (HTTP 429).
    pub max_waiting: Option<usize>,
    /// Element type of the KV cache; `None`: the model's compute dtype.
    pub kv_cache_dtype: Option<DType>,
    /// Keep the pool's other workers polling for work through each step instead of letting
    /// them sleep between its parallel parts (see `warm_pool.rs`): faster steps, at the price
    /// of those cores spinning while the engine thread runs serial code.
    pub busy_poll: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request can never be served as asked (HTTP 400); the message says why.
    #[error("{0}")]
    Invalid(String),
    /// Too many requests are already waiting (HTTP 429).
    #[error("the server is busy: {0} requests are already waiting")]
    QueueFull(usize),
    #[error("the engine has shut down")]
    ShutDown,
}

/// Counters and gauges of the engine, readable from any thread.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub free_blocks: AtomicU64,
    pub live_sequences: AtomicU64,
    pub live_requests: AtomicU64,
    /// Requests accepted by `submit` and not yet taken in by the engine thread.
    pub queued: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens that went through a forward pass (prefix-cache hits excluded).
    pub computed_prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    pub finished_requests: AtomicU64,
    pub aborted_requests: AtomicU64,
}

/// A point-in-time copy of [`EngineMetrics`] plus the cache's shape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub running: u64,
    pub waiting: u64,
    pub num_blocks: u64,
    pub free_blocks: u64,
    pub live_sequences: u64,
    pub live_requests: u64,
    pub prompt_tokens: u64,
    pub computed_prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
    pub finished_requests: u64,
    pub aborted_requests: u64,
}

impl EngineStats {
    /// Fraction of KV blocks held by sequences.
    pub fn kv_usage(&self) -> f64 {
        if self.num_blocks == 0 {
            0.0
        } else {
            1.0 - self.free_blocks as f64 / self.num_blocks as f64
        }
    }
}

/// What the handle and the engine thread share.
pub(crate) struct Shared {
    model: Arc<MoeModel>,
    tokenizer: Tokenizer,
    eos_token_ids: Vec<u32>,
    max_context: usize,
    metrics: EngineMetrics,
}

pub(crate) enum Command {
    Submit {
        id: u64,
        request: Box<Request>,
        events: UnboundedSender<Event>,
    },
    Shutdown,
}

/// The events of one request; dropping it cancels the request.
pub struct RequestStream {
    rx: UnboundedReceiver<Event>,
}

impl RequestStream {
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// For synchronous callers (the CLI); must not be called inside an async runtime.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

pub struct Engine {
    commands: Mutex<mpsc::Sender<Command>>,
    shared: Arc<Shared>,
    config: EngineConfig,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Allocates the KV cache and starts the engine thread.
    pub fn start(
        model: MoeModel,
        tokenizer: Tokenizer,
        config: EngineConfig,
    ) -> Result<Self, ModelError> {
        let cache =
            model.new_kv_cache(config.num_blocks, config.block_size, config.kv_cache_dtype)?;
        let mut eos: Vec<u32> = tokenizer.eos_token_ids().to_vec();
        eos.extend(&model.config().eos_token_ids);
        eos.sort_unstable();
        eos.dedup();
        let max_context = model.max_context();
        let shared = Arc::new(Shared {
            model: Arc::new(model),
            tokenizer,
            eos_token_ids: eos,
            max_context,
            metrics: EngineMetrics::default(),
        });
        let blocks = BlockManager::new(config.num_blocks, config.block_size, config.prefix_caching);
        let core = core::EngineCore::new(
            shared.clone(),
            cache,
            blocks,
            scheduler::Scheduler::new(config.scheduler),
            config.busy_poll,
        );
        let (tx, rx) = mpsc::channel();
        // The loop runs on a worker of the engine's own rayon pool (the spawned thread only
        // waits for it), and every parallel product inside it uses that pool. An engine
        // thread beside a full pool oversubscribed the cores: workers spinning between
        // products took CPU time from the engine's serial work (attention, routing), which
        // cost a quarter of the single-sequence decode speed on 2 cores. Its own pool (not
        // the global one) so that several engines in a process cannot starve each other.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("mixserve-worker-{i}"))
            .build()
            .map_err(|e| ModelError::Candle(Box::new(candle_core::Error::wrap(e))))?;
        let thread = std::thread::Builder::new()
            .name("mixserve-engine".into())
            .spawn(move || pool.install(|| core.run(rx)))
            .map_err(|e| ModelError::Candle(Box::new(candle_core::Error::wrap(e))))?;
        shared
            .metrics
            .free_blocks
            .store(config.num_blocks as u64, Ordering::Relaxed);
        Ok(Self {
            commands: Mutex::new(tx),
            shared,
            config,
            next_id: AtomicU64::new(0),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn model(&self) -> &MoeModel {
        &self.shared.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Longest prompt plus completion a single request may have.
    pub fn max_context(&self) -> usize {
        self.shared
            .max_context
            .min(self.config.num_blocks * self.config.block_size)
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.shared.eos_token_ids
    }

    pub fn stats(&self) -> EngineStats {
        let m = &self.shared.metrics;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            running: l(&m.running),
            waiting: l(&m.waiting) + l(&m.queued),
            num_blocks: self.config.num_blocks as u64,
            free_blocks: l(&m.free_blocks),
            live_sequences: l(&m.live_sequences),
            live_requests: l(&m.live_requests),
            prompt_tokens: l(&m.prompt_tokens),
            computed_prompt_tokens: l(&m.computed_prompt_tokens),
            cached_prompt_tokens: l(&m.cached_prompt_tokens),
            generation_tokens: l(&m.generation_tokens),
            preemptions: l(&m.preemptions),
            steps: l(&m.steps),
            finished_requests: l(&m.finished_requests),
            aborted_requests: l(&m.aborted_requests),
        }
    }

    /// Checks a request against the model and the KV budget, then queues it.
    pub fn submit(&self, request: Request) -> Result<RequestStream, SubmitError> {
        request
            .validate(
                self.shared.model.config().vocab_size,
                self.shared.max_context,
                self.config.num_blocks * self.config.block_size,
            )
            .map_err(SubmitError::Invalid)?;
        let m = &self.shared.metrics;
        if let Some(max) = self.config.max_waiting {
            let waiting =
                (m.waiting.load(Ordering::Relaxed) + m.queued.load(Ordering::Relaxed)) as usize;
            if waiting >= max {
                return Err(SubmitError::QueueFull(waiting));
            }
        }
        let (tx, rx) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        m.queued.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .commands
            .lock()
            .map_err(|_| SubmitError::ShutDown)?
            .send(Command::Submit {
                id,
                request: Box::new(request),
                events: tx,
            });
        if sent.is_err() {
            m.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::ShutDown);
        }
        Ok(RequestStream { rx })
    }

    /// False once the engine thread has stopped (after a shutdown, or if it died).
    pub fn is_alive(&self) -> bool {
        self.thread
            .lock()
            .map(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
            .unwrap_or(false)
    }

    /// Lets in-flight requests finish, then stops the engine thread.
    pub fn shutdown(&self) {
        if let Ok(tx) = self.commands.lock() {
            let _ = tx.send(Command::Shutdown);
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
