//! The engine thread: the one place that owns time (the step loop) and memory (the KV blocks).
//!
//! Each step: take in new requests and drop cancelled ones, schedule, run one forward pass,
//! then sample every sequence that reached its end and send its events.

use super::block_manager::BlockManager;
use super::outbox::Outbox;
use super::request::{Event, FinishReason, Request, TokenLogprob, Usage};
use super::runner::{self, SeqRows};
use super::sampler::{apply_penalties, Sampler};
use super::scheduler::{Plan, Scheduler};
use super::sequence::{RequestId, RequestState, SeqId, Sequence};
use super::warm_pool;
use super::{Command, Shared};
use crate::model::KvCache;
use crate::text::{IncrementalDetokenizer, StopMatcher, StopOutcome};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

pub(super) struct EngineCore {
    shared: Arc<Shared>,
    cache: KvCache,
    blocks: BlockManager,
    scheduler: Scheduler,
    seqs: HashMap<SeqId, Sequence>,
    requests: HashMap<RequestId, RequestState>,
    next_seq: SeqId,
    /// [`super::EngineConfig::busy_poll`].
    busy_poll: bool,
    /// Every event to a client goes through it, so they stay in order.
    outbox: Outbox,
}

impl EngineCore {
    pub fn new(
        shared: Arc<Shared>,
        cache: KvCache,
        blocks: BlockManager,
        scheduler: Scheduler,
        busy_poll: bool,
    ) -> Self {
        Self {
            busy_poll,
            shared,
            cache,
            blocks,
            scheduler,
            seqs: HashMap::new(),
            requests: HashMap::new(),
            next_seq: 0,
            outbox: Outbox::default(),
        }
    }

    /// Runs until shutdown is asked for and every request has ended.
    pub fn run(mut self, commands: Receiver<Command>) {
        let mut shutting_down = false;
        loop {
            // Block for work when idle; otherwise just pick up what arrived.
            if self.scheduler.is_idle() {
                self.outbox.flush_here();
                if shutting_down {
                    break;
                }
                match commands.recv() {
                    Ok(cmd) => shutting_down |= self.handle(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => shutting_down |= self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        shutting_down = true;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.step();
            self.publish();
        }
        self.outbox.flush_here();
        self.publish();
    }

    /// Returns true for a shutdown request.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit {
                id,
                request,
                events,
            } => {
                self.shared.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                self.add_request(id, *request, events);
                false
            }
            Command::Shutdown => true,
        }
    }

    fn add_request(
        &mut self,
        id: RequestId,
        mut request: Request,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
    ) {
        // An empty stop string matches nothing; dropping it here keeps the matcher's indices
        // and the request's list the same.
        request.stop.retain(|s| !s.is_empty());
        let mut stop_ids = request.stop_token_ids.clone();
        if !request.ignore_eos {
            stop_ids.extend(&self.shared.eos_token_ids);
        }
        let seq = self.new_sequence(id, &request, 0, request.prompt.clone(), Vec::new(), 0);
        self.scheduler.waiting.push_back(seq);
        self.requests.insert(
            id,
            RequestState {
                live: request.n,
                forked: request.n == 1,
                stop_ids,
                events,
                completion_tokens: 0,
                cached_tokens: 0,
                prompt_logprobs: Vec::new(),
                prompt_logprobs_sent: request.prompt_logprobs.is_none(),
                request,
            },
        );
        self.shared.metrics.prompt_tokens.fetch_add(
            self.requests[&id].request.prompt.len() as u64,
            Ordering::Relaxed,
        );
    }

    fn new_sequence(
        &mut self,
        request_id: RequestId,
        request: &Request,
        index: usize,
        tokens: Vec<u32>,
        block_table: Vec<u32>,
        num_computed: usize,
    ) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        let prompt_len = request.prompt.len();
        self.seqs.insert(
            id,
            Sequence {
                id,
                index,
                request: request_id,
                detok: IncrementalDetokenizer::new(
                    self.shared.tokenizer.clone(),
                    &request.prompt,
                    request.skip_special_tokens,
                ),
                stop: StopMatcher::new(request.stop.clone()),
                sampler: Sampler::for_sample(request.sampling.clone(), index),
                tokens,
                prompt_len,
                num_computed,
                block_hashes: Vec::new(),
                block_table,
                preempted_at_step: None,
                admitted_at: 0,
            },
        );
        id
    }

    /// Requests whose stream was dropped end now, and their blocks are freed.
    fn drop_cancelled(&mut self) {
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.remove_request(id);
            self.shared
                .metrics
                .aborted_requests
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes a request and every sample of it, freeing their blocks.
    fn remove_request(&mut self, id: RequestId) -> Option<RequestState> {
        let seq_ids: Vec<SeqId> = self
            .seqs
            .values()
            .filter(|s| s.request == id)
            .map(|s| s.id)
            .collect();
        for s in seq_ids {
            self.remove_sequence(s);
        }
        self.requests.remove(&id)
    }

    fn remove_sequence(&mut self, id: SeqId) -> Option<Sequence> {
        self.scheduler.remove(id);
        let mut seq = self.seqs.remove(&id)?;
        self.blocks.release(&mut seq.block_table);
        Some(seq)
    }

    fn step(&mut self) {
        let prefix_caching = self.blocks.prefix_caching();
        let requests = &self.requests;
        let plan: Plan = self
            .scheduler
            .schedule(&mut self.seqs, &mut self.blocks, |s| {
                prefix_caching
                    && requests
                        .get(&s.request)
                        .is_some_and(|r| r.prompt_logprobs_sent)
            });
        let m = &self.shared.metrics;
        m.preemptions
            .fetch_add(plan.preempted.len() as u64, Ordering::Relaxed);
        for id in &plan.preempted {
            // Prompt logprobs gathered so far will be gathered again by the recompute.
            if let Some(r) = self
                .seqs
                .get(id)
                .and_then(|s| self.requests.get_mut(&s.request))
            {
                if !r.prompt_logprobs_sent {
                    r.prompt_logprobs.clear();
                }
            }
        }
        for &(id, hits) in &plan.cache_hits {
            m.cached_prompt_tokens
                .fetch_add(hits as u64, Ordering::Relaxed);
            if let Some(seq) = self.seqs.get(&id) {
                if seq.num_generated() == 0 {
                    if let Some(r) = self.requests.get_mut(&seq.request) {
                        r.cached_tokens = r.cached_tokens.max(hits);
                    }
                }
            }
        }
        if plan.items.is_empty() {
            if plan.preempted.is_empty() && self.scheduler.running.is_empty() {
                self.unblock_queue();
            }
            return;
        }
        // The pool's other workers stay awake through the forward pass and the sampling.
        let _warm = self.busy_poll.then(warm_pool::Warm::start);
        let requests = &self.requests;
        let output = runner::run(
            &self.shared.model,
            &self.cache,
            &self.seqs,
            &plan.items,
            |s| {
                s.index == 0
                    && requests
                        .get(&s.request)
                        .is_some_and(|r| !r.prompt_logprobs_sent)
            },
        );
        m.steps.fetch_add(1, Ordering::Relaxed);
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("forward pass failed: {e}");
                for &(id, _) in &plan.items {
                    self.fail_request_of(id, "internal error in the forward pass");
                }
                return;
            }
        };
        let rows = output.rows;
        let done = with_logits(&output.logits, |logits, vocab| {
            for rows in rows {
                self.postprocess(rows, logits, vocab);
            }
        });
        if let Err(e) = done {
            tracing::error!("reading logits failed: {e}");
            for &(id, _) in &plan.items {
                self.fail_request_of(id, "internal error reading logits");
            }
        }
        // While the pool's other workers still poll: one of them takes the sending at once.
        self.outbox.flush();
    }

    /// Nothing runs and the head of the queue cannot be admitted: with submit-time checks and
    /// no blocks held by waiting sequences this cannot happen, but fail the request rather
    /// than spin if it ever does.
    fn unblock_queue(&mut self) {
        if let Some(&head) = self.scheduler.waiting.front() {
            self.fail_request_of(head, "the request does not fit in the KV cache");
        }
    }

    fn postprocess(&mut self, rows: SeqRows, logits: &[f32], vocab: usize) {
        let row_of = |r: usize| &logits[r * vocab..(r + 1) * vocab];
        let bs = self.blocks.block_size();
        let Some(seq) = self.seqs.get_mut(&rows.id) else {
            return;
        };
        let prompt_computed = (seq.prompt_len.min(rows.first_pos + rows.chunk))
            .saturating_sub(rows.first_pos.min(seq.prompt_len));
        self.shared
            .metrics
            .computed_prompt_tokens
            .fetch_add(prompt_computed as u64, Ordering::Relaxed);
        seq.num_computed += rows.chunk;
        for (j, h) in seq.new_full_blocks(bs) {
            let toks = &seq.tokens[j * bs..(j + 1) * bs];
            self.blocks.register(seq.block_table[j], h, toks);
        }
        let (seq_id, req_id, index, computed) = (seq.id, seq.request, seq.index, seq.num_computed);
        let prompt_len = seq.prompt_len;
        let Some(req) = self.requests.get_mut(&req_id) else {
            return;
        };

        // Prompt logprobs, gathered chunk by chunk, sent once the prompt is through.
        if index == 0 && !req.prompt_logprobs_sent {
            let top_n = req.request.prompt_logprobs.unwrap_or(0);
            for (k, row) in rows.prompt_rows.clone().enumerate() {
                let pos = rows.first_pos + k;
                let target = req.request.prompt[pos + 1];
                req.prompt_logprobs
                    .push(Some(token_logprob(row_of(row), target, top_n)));
            }
            if computed >= prompt_len {
                let mut all = vec![None];
                all.append(&mut req.prompt_logprobs);
                self.outbox.push(&req.events, Event::PromptLogprobs(all));
                req.prompt_logprobs_sent = true;
            }
        }
        // Samples 1.. share sample 0's full prompt blocks once they are computed.
        if index == 0 && !req.forked && computed >= prompt_len {
            req.forked = true;
            let request = req.request.clone();
            self.fork(req_id, seq_id, &request);
        }

        let Some(row) = rows.sample_row else {
            return;
        };
        self.sample(seq_id, row_of(row));
    }

    /// Creates samples 1.. of a request. Those that fit in the running set start right away,
    /// sharing sample 0's full prompt blocks; the others queue without blocks (to be
    /// recomputed, or found in the prefix cache). No waiting sequence ever holds blocks, so
    /// nothing idle can stand in the way of one that runs.
    fn fork(&mut self, req_id: RequestId, parent: SeqId, request: &Request) {
        let bs = self.blocks.block_size();
        let shared_blocks: Vec<u32> = match self.seqs.get(&parent) {
            Some(p) => p.block_table[..(p.prompt_len - 1) / bs].to_vec(),
            None => return,
        };
        for index in 1..request.n {
            let runs = self.scheduler.has_room();
            let (table, computed) = if runs {
                for &b in &shared_blocks {
                    self.blocks.share(b);
                }
                (shared_blocks.clone(), shared_blocks.len() * bs)
            } else {
                (Vec::new(), 0)
            };
            let id = self.new_sequence(
                req_id,
                request,
                index,
                request.prompt.clone(),
                table,
                computed,
            );
            match self.seqs.get_mut(&id) {
                Some(seq) if runs => self.scheduler.admit(seq),
                _ => self.scheduler.waiting.push_front(id),
            }
        }
    }

    fn sample(&mut self, seq_id: SeqId, raw: &[f32]) {
        match self.sample_one(seq_id, raw) {
            Ok(Some((reason, matched))) => self.finish(seq_id, reason, matched),
            Ok(None) => {}
            Err(msg) => self.fail_request_of(seq_id, &msg),
        }
    }

    /// Samples the next token of a sequence and sends it; returns how the sample ends, if
    /// it does.
    fn sample_one(
        &mut self,
        seq_id: SeqId,
        raw: &[f32],
    ) -> Result<Option<(FinishReason, Option<String>)>, String> {
        let outbox = &mut self.outbox;
        let (Some(seq), requests) = (self.seqs.get_mut(&seq_id), &mut self.requests) else {
            return Ok(None);
        };
        let Some(req) = requests.get_mut(&seq.request) else {
            return Ok(None);
        };
        let r = &req.request;
        if seq.num_generated() >= r.max_tokens {
            return Ok(Some((FinishReason::Length, None)));
        }
        let blocks_stops = seq.num_generated() < r.min_tokens && !req.stop_ids.is_empty();
        let token = if r.sampling.has_penalties() || blocks_stops {
            let mut logits = raw.to_vec();
            apply_penalties(&mut logits, &r.sampling, &r.prompt, seq.output());
            if blocks_stops {
                for &t in &req.stop_ids {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            seq.sampler.sample(&logits)
        } else {
            // Nothing rewrites the logits: sample from the row itself, no copy.
            seq.sampler.sample(raw)
        };
        let logprob = r.logprobs.map(|n| token_logprob(raw, token, n));
        seq.tokens.push(token);
        req.completion_tokens += 1;
        self.shared
            .metrics
            .generation_tokens
            .fetch_add(1, Ordering::Relaxed);
        let mut send = |text: String| {
            let event = Event::Token {
                index: seq.index,
                token,
                text,
                logprob: logprob.clone(),
                at: std::time::Instant::now(),
            };
            outbox.push(&req.events, event);
        };

        if req.stop_ids.contains(&token) {
            // A stop token ends the sample; its own text is not part of the output.
            send(String::new());
            return Ok(Some((
                FinishReason::Stop,
                self.shared.tokenizer.id_to_token(token),
            )));
        }
        let delta = seq
            .detok
            .push(token)
            .map_err(|e| format!("detokenizing failed: {e}"))?;
        match seq.stop.push(&delta) {
            StopOutcome::Stopped { text, stop } => {
                send(text);
                let matched = r.stop.get(stop).cloned();
                // The stop string and anything after it are not part of the output.
                seq.stop = StopMatcher::new(Vec::new());
                seq.detok = IncrementalDetokenizer::new(self.shared.tokenizer.clone(), &[], true);
                Ok(Some((FinishReason::Stop, matched)))
            }
            StopOutcome::Continue(text) => {
                send(text);
                let at_context_end = seq.tokens.len() >= self.shared.max_context;
                Ok((seq.num_generated() >= r.max_tokens || at_context_end)
                    .then_some((FinishReason::Length, None)))
            }
        }
    }

    /// Ends one sample: flushes held-back text, frees its blocks, and ends the request once
    /// all its samples are done.
    fn finish(&mut self, seq_id: SeqId, reason: FinishReason, matched_stop: Option<String>) {
        let Some(mut seq) = self.remove_sequence(seq_id) else {
            return;
        };
        // Text still held back (half a character, or what could have begun a stop string)
        // belongs to the output, unless it completes a stop string.
        let held = seq.detok.flush().unwrap_or_default();
        let text = match seq.stop.push(&held) {
            StopOutcome::Stopped { text, .. } => text,
            StopOutcome::Continue(t) => t + &seq.stop.flush(),
        };
        let Some(req) = self.requests.get_mut(&seq.request) else {
            return;
        };
        self.outbox.push(
            &req.events,
            Event::Finished {
                index: seq.index,
                reason,
                text,
                matched_stop,
            },
        );
        req.live = req.live.saturating_sub(1);
        if req.live == 0 {
            let usage = Usage {
                prompt_tokens: req.request.prompt.len(),
                completion_tokens: req.completion_tokens,
                cached_tokens: req.cached_tokens,
            };
            self.outbox.push(&req.events, Event::Done(usage));
            self.requests.remove(&seq.request);
            self.shared
                .metrics
                .finished_requests
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends the whole request a sequence belongs to with an error.
    fn fail_request_of(&mut self, seq_id: SeqId, msg: &str) {
        let Some(req_id) = self.seqs.get(&seq_id).map(|s| s.request) else {
            return;
        };
        if let Some(req) = self.remove_request(req_id) {
            self.outbox.push(&req.events, Event::Error(msg.to_string()));
        }
    }

    /// Publishes the gauges the handle and `/metrics` read.
    fn publish(&self) {
        let m = &self.shared.metrics;
        m.running
            .store(self.scheduler.running.len() as u64, Ordering::Relaxed);
        m.waiting
            .store(self.scheduler.waiting.len() as u64, Ordering::Relaxed);
        m.free_blocks
            .store(self.blocks.num_free() as u64, Ordering::Relaxed);
        m.live_sequences
            .store(self.seqs.len() as u64, Ordering::Relaxed);
        m.live_requests
            .store(self.requests.len() as u64, Ordering::Relaxed);
    }
}

/// Log-probability of `token` under `logits`, with the `top_n` most likely alternatives.
/// Runs `f` on the logits `[rows, vocab]` as one flat slice and the vocabulary size: borrowed
/// in place from a CPU tensor (a copy of rows x vocab floats per step was a tenth of a small
/// model's step), copied off any other device.
fn with_logits<R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(&[f32], usize) -> R,
) -> candle_core::Result<R> {
    use candle_core::{CpuStorage, Storage};
    let (_, vocab) = t.dims2()?;
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(d)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&d[a..b], vocab));
        }
    }
    let copy = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&copy, vocab))
}

pub fn token_logprob(logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let lp = |t: u32| {
        logits
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse)
    };
    let mut top = Vec::new();
    if top_n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let order = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = top_n.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, order);
            idx.truncate(k);
        }
        idx.sort_unstable_by(order);
        top = idx.into_iter().map(|t| (t, lp(t))).collect();
    }
    TokenLogprob {
        token,
        logprob: lp(token),
        top,
    }
}
