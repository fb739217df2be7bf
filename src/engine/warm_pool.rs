//! Keeps the engine pool's other workers awake while a step runs.
//!
//! A step forks the pool dozens of times (every product, the decode attention, the experts)
//! with short serial stretches between (norms, routing, rotary, sampling). An idle rayon worker
//! spins briefly, then sleeps, and waking a sleeping vCPU took 17-28 us a fork on the 2-core
//! CI VM: at 16 sequences the second core sat idle for ~10% of a decode step. While a
//! [`Warm`] guard lives, every other worker of the current pool runs a job that takes pool
//! work the moment it is pushed (`rayon::yield_now`) and otherwise spins; dropping the guard
//! releases them to rayon's own idling.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Idle polls between OS yields: the spinning stays polite where workers share cores with
/// other threads, and costs little (one `sched_yield`) where they do not.
const POLLS_PER_OS_YIELD: u32 = 256;

/// The longest a poller waits without work before leaving the worker to rayon's idling:
/// longer than the serial stretches of a decode step (tens of microseconds), short enough
/// that the rare poller caught inside a job costs little (see [`poll_until`]).
const MAX_IDLE: Duration = Duration::from_millis(1);

/// While alive, the current pool's other workers poll for work instead of sleeping.
pub struct Warm {
    stop: Arc<AtomicBool>,
}

impl Warm {
    /// Starts the spinning on every worker of the current rayon pool but this thread.
    /// Outside a pool (or in a pool of one) it does nothing.
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(me) = rayon::current_thread_index() {
            if rayon::current_num_threads() > 1 {
                let flag = stop.clone();
                rayon::spawn_broadcast(move |ctx| {
                    // This thread's own copy returns at once: it would otherwise run (when the
                    // thread waits on a fork) and spin until a flag only this thread clears.
                    if ctx.index() != me {
                        poll_until(&flag);
                    }
                });
            }
        }
        Self { stop }
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

thread_local! {
    /// Whether this thread is inside [`poll_until`] already.
    static POLLING: Cell<bool> = const { Cell::new(false) };
}

/// Runs pool jobs as they come until `stop`, or until none has come for [`MAX_IDLE`].
///
/// The poller is itself a pool job, so a worker can pick it up while it waits inside another
/// job (rayon runs queued work while a thread waits on a fork). Nested in a job that the
/// step is waiting for, a poller that waited for `stop` alone would never return: the step
/// could not end. So a poller never starts inside another one (a worker still polling for the
/// last step when this one's poller arrives), and any poller gives up after [`MAX_IDLE`]
/// without work: in that rare race the step loses at most that long, never hangs.
fn poll_until(stop: &AtomicBool) {
    if POLLING.with(|p| p.replace(true)) {
        return;
    }
    let mut idle = 0u32;
    let mut idle_since = Instant::now();
    while !stop.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle = 0,
            Some(rayon::Yield::Idle) => {
                if idle == 0 {
                    idle_since = Instant::now();
                }
                idle += 1;
                if idle.is_multiple_of(POLLS_PER_OS_YIELD) {
                    if idle_since.elapsed() > MAX_IDLE {
                        break;
                    }
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            None => break,
        }
    }
    POLLING.with(|p| p.set(false));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn work_still_runs_everywhere_and_the_workers_are_released() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool");
        let done = AtomicUsize::new(0);
        pool.install(|| {
            for _ in 0..20 {
                let warm = Warm::start();
                let sum: u64 = (0..10_000u64).into_par_iter().map(|x| x * 2).sum();
                assert_eq!(sum, 9_999 * 10_000);
                rayon::join(
                    || done.fetch_add(1, Ordering::Relaxed),
                    || done.fetch_add(1, Ordering::Relaxed),
                );
                drop(warm);
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), 40);
        // The spinners have stopped: a broadcast reaches every worker, so each is free again.
        let seen = pool.broadcast(|ctx| ctx.index());
        assert_eq!(seen, vec![0, 1, 2]);
    }

    #[test]
    fn a_poller_caught_inside_a_job_the_step_waits_for_gives_up() {
        // Worker B runs job b, and inside it runs queued work (as a worker waiting on a fork
        // does) after A has queued the poller: the poller lands inside b, and A cannot drop
        // the guard until b returns. Without the idle limit this never finishes.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .expect("a pool");
            pool.install(|| {
                let (stolen, queued) = (AtomicBool::new(false), AtomicBool::new(false));
                let warm = std::sync::Mutex::new(None);
                rayon::join(
                    || {
                        while !stolen.load(Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                        *warm.lock().expect("lock") = Some(Warm::start());
                        queued.store(true, Ordering::Release);
                    },
                    || {
                        stolen.store(true, Ordering::Release);
                        while !queued.load(Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                        rayon::yield_now();
                    },
                );
                drop(warm);
            });
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(20)).is_ok(),
            "the step never ended"
        );
    }

    #[test]
    fn outside_a_pool_it_does_nothing() {
        std::thread::spawn(|| drop(Warm::start()))
            .join()
            .expect("no panic");
    }
}
