//! The engine's events leave through an outbox that another worker of its pool empties.
//!
//! Sending an event wakes its receiver (a server task or a client thread): a futex call of
//! ~6 us on the 2-core CI VM, ~0.1 ms of a 16-sequence decode step spent on the engine's
//! thread while the pool's other worker waits for the next step. The engine queues a step's
//! events and hands them to the pool at the end of the step; the busy-polling worker (see
//! `warm_pool.rs`) takes the job at once and sends while the engine goes on.
//!
//! Order is kept: queued events are appended in the engine's order to one shared queue, and
//! only the holder of the `sending` lock takes from it, all it holds at a time. So no event
//! overtakes an earlier one, of its request or any other.

use super::request::Event;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::mpsc::UnboundedSender;

type Item = (UnboundedSender<Event>, Event);

/// Fewer events than this are sent on the engine's thread. The hand-off keeps the other worker
/// busy into the next step's first products; in one process, alternating every 8 steps
/// (q4k, synthetic Mixtral), handing off one sequence's event made its step 1% slower, and
/// 16 sequences' events made theirs 0.7% faster.
const MIN_HANDED_OFF: usize = 4;

#[derive(Default)]
struct Queue {
    pending: Mutex<VecDeque<Item>>,
    sending: Mutex<()>,
}

impl Queue {
    /// Sends everything queued, in order, until the queue is empty.
    fn drain(&self) {
        let _turn = self.sending.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let batch: Vec<Item> = {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                pending.drain(..).collect()
            };
            if batch.is_empty() {
                return;
            }
            for (to, event) in batch {
                // A receiver that is gone has cancelled; the engine drops its request.
                let _ = to.send(event);
            }
        }
    }
}

#[derive(Default)]
pub struct Outbox {
    step: Vec<Item>,
    queue: Arc<Queue>,
}

impl Outbox {
    /// Queues `event` for `to`.
    pub fn push(&mut self, to: &UnboundedSender<Event>, event: Event) {
        self.step.push((to.clone(), event));
    }

    /// Hands what was queued to the pool, where another worker sends it, if there are at
    /// least [`MIN_HANDED_OFF`] events; sends fewer here and now, as it does outside a pool or
    /// in a pool of one (where no other thread would take the job).
    pub fn flush(&mut self) {
        if self.step.is_empty() {
            return;
        }
        let pooled = rayon::current_thread_index().is_some() && rayon::current_num_threads() > 1;
        if !pooled || self.step.len() < MIN_HANDED_OFF {
            return self.flush_here();
        }
        self.hand_over();
        let queue = self.queue.clone();
        rayon::spawn(move || queue.drain());
    }

    /// Sends what was queued on this thread, once earlier hand-offs are through: before the
    /// engine waits for work or stops, so nothing sits in a queue while no step runs.
    pub fn flush_here(&mut self) {
        self.hand_over();
        self.queue.drain();
    }

    /// Moves this step's events to the end of the shared queue.
    fn hand_over(&mut self) {
        self.queue
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(self.step.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::Usage;

    fn done(n: usize) -> Event {
        Event::Done(Usage {
            prompt_tokens: n,
            completion_tokens: 0,
            cached_tokens: 0,
        })
    }

    /// Many steps' events for two receivers, handed off step after step inside a pool of
    /// two: each receiver gets all of its own, in order.
    #[test]
    fn events_arrive_in_order_across_hand_offs() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a pool of two");
        let (a_tx, mut a_rx) = tokio::sync::mpsc::unbounded_channel();
        let (b_tx, mut b_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut next = 0;
        pool.install(|| {
            let mut outbox = Outbox::default();
            for step in 0..500 {
                // 1 to 4 events a receiver: some steps sent here, most handed off.
                for _ in 0..1 + step % 4 {
                    outbox.push(&a_tx, done(next));
                    outbox.push(&b_tx, done(next));
                    next += 1;
                }
                outbox.flush();
            }
            outbox.flush_here();
        });
        for rx in [&mut a_rx, &mut b_rx] {
            let mut got = Vec::new();
            while let Ok(Event::Done(u)) = rx.try_recv() {
                got.push(u.prompt_tokens);
            }
            assert_eq!(got, (0..next).collect::<Vec<_>>());
        }
    }

    /// Without a pool the events go out at once.
    #[test]
    fn outside_a_pool_events_go_at_once() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut outbox = Outbox::default();
        outbox.push(&tx, done(7));
        assert!(rx.try_recv().is_err());
        outbox.flush();
        assert!(matches!(rx.try_recv(), Ok(Event::Done(u)) if u.prompt_tokens == 7));
    }
}
