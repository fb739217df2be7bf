//! Prometheus metrics: request latencies recorded as they happen, engine gauges and counters
//! read from the engine at scrape time, and per layer and expert the tokens routed to it.

use crate::engine::Engine;
use metrics::{Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A recorder of this server's own (not the process-global one): several servers can live in
/// one process, as they do in the tests.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_latency: Histogram,
}

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let describe = |name: &'static str, help: &'static str| {
            recorder.describe_histogram(name.into(), Some(Unit::Seconds), help.into());
        };
        describe(
            "mixserve_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
        );
        describe(
            "mixserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
        );
        describe(
            "mixserve_request_latency_seconds",
            "Time from request arrival to its last token.",
        );
        let hist = |name: &'static str| recorder.register_histogram(&Key::from_name(name), &META);
        Self {
            time_to_first_token: hist("mixserve_time_to_first_token_seconds"),
            inter_token_latency: hist("mixserve_inter_token_latency_seconds"),
            request_latency: hist("mixserve_request_latency_seconds"),
            recorder,
            handle,
        }
    }

    fn gauge(&self, name: &'static str, v: f64) {
        self.recorder
            .register_gauge(&Key::from_name(name), &META)
            .set(v);
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>, v: u64) {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &META)
            .absolute(v);
    }

    /// The Prometheus text exposition, with the engine's state as of now.
    pub fn render(&self, engine: Option<&Engine>) -> String {
        if let Some(engine) = engine {
            let s = engine.stats();
            self.gauge("mixserve_requests_running", s.running as f64);
            self.gauge("mixserve_requests_waiting", s.waiting as f64);
            self.gauge("mixserve_kv_cache_usage_ratio", s.kv_usage());
            self.gauge("mixserve_kv_cache_blocks_total", s.num_blocks as f64);
            self.gauge("mixserve_kv_cache_blocks_free", s.free_blocks as f64);
            self.gauge("mixserve_sequences_live", s.live_sequences as f64);
            for (name, v) in [
                ("mixserve_prompt_tokens_total", s.prompt_tokens),
                ("mixserve_generation_tokens_total", s.generation_tokens),
                (
                    "mixserve_prompt_tokens_computed_total",
                    s.computed_prompt_tokens,
                ),
                (
                    "mixserve_prefix_cache_hit_tokens_total",
                    s.cached_prompt_tokens,
                ),
                ("mixserve_preemptions_total", s.preemptions),
                ("mixserve_engine_steps_total", s.steps),
                ("mixserve_requests_finished_total", s.finished_requests),
                ("mixserve_requests_aborted_total", s.aborted_requests),
            ] {
                self.counter(name, Vec::new(), v);
            }
            for (layer, experts) in engine.model().expert_token_counts().iter().enumerate() {
                for (expert, &v) in experts.iter().enumerate() {
                    let labels = vec![
                        Label::new("layer", layer.to_string()),
                        Label::new("expert", expert.to_string()),
                    ];
                    self.counter("mixserve_expert_tokens_total", labels, v);
                }
            }
        }
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
