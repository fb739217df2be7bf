//! Turns a row of logits into the next token under a request's sampling parameters.
//!
//! Each request owns its RNG, seeded from its `seed`, so a seeded request draws the same tokens
//! whatever else shares its batch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    pub seed: Option<u64>,
    /// HF-style: logits of tokens seen (prompt or output) are divided (if > 0) or multiplied
    /// (if < 0) by this; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    pub logit_bias: super::request::LogitBias,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Default::default(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Range checks; the error names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, msg: &str| if ok { Ok(()) } else { Err(msg.to_string()) };
        check(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a number >= 0",
        )?;
        check(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p must be in (0, 1]",
        )?;
        check((0.0..=1.0).contains(&self.min_p), "min_p must be in [0, 1]")?;
        check(
            self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0,
            "repetition_penalty must be > 0",
        )?;
        check(
            (-2.0..=2.0).contains(&self.presence_penalty),
            "presence_penalty must be in [-2, 2]",
        )?;
        check(
            (-2.0..=2.0).contains(&self.frequency_penalty),
            "frequency_penalty must be in [-2, 2]",
        )?;
        check(
            self.logit_bias.values().all(|b| b.is_finite()),
            "logit_bias values must be numbers",
        )
    }

    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
    }
}

/// Rewrites logits by the request's penalties and biases, in vLLM's order: repetition penalty
/// (over prompt and output), then frequency and presence (over the output), then logit bias.
pub fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
) {
    if !params.has_penalties() {
        return;
    }
    let vocab = logits.len();
    if params.repetition_penalty != 1.0 {
        let mut seen = vec![false; vocab];
        for &t in prompt.iter().chain(output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, &s)| s) {
            if *l > 0.0 {
                *l /= params.repetition_penalty;
            } else {
                *l *= params.repetition_penalty;
            }
        }
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        let mut counts: std::collections::HashMap<u32, u32> = Default::default();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= params.frequency_penalty * c as f32 + params.presence_penalty;
            }
        }
    }
    for (&t, &b) in &params.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self::for_sample(params, 0)
    }

    /// The sampler of sample `index` of a request: seeded requests give each of their `n`
    /// samples its own stream, derived from the seed.
    pub fn for_sample(params: SamplingParams, index: usize) -> Self {
        let rng = match params.seed {
            Some(s) => {
                StdRng::seed_from_u64(s ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        // Candidates sorted by logit, best first; truncated by top-k before any softmax work.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        // A total order (ties to the lower id) keeps top-k deterministic under ties.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, order);
            cand.truncate(k);
        }
        cand.sort_unstable_by(order);
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);

        let mut keep = probs.len();
        if self.params.min_p > 0.0 {
            let floor = self.params.min_p * probs[0];
            keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
        }
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs[..keep].iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (c, p) in cand[..keep].iter().zip(&probs[..keep]) {
            r -= p;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[keep - 1].0
    }
}

/// Index of the largest logit; ties go to the lowest index (as torch.argmax does), NaNs are
/// never the largest. It runs once per sequence and step over the whole vocabulary: eight
/// independent lanes, compiled for AVX2 where the CPU has it (the baseline x86-64 target
/// cannot vectorise the compare-and-select), the same result either way.
pub fn argmax(logits: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if crate::model::cpu::simd().avx2 {
        // SAFETY: the CPU has AVX2.
        return unsafe { argmax_avx2(logits) };
    }
    argmax_lanes(logits)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn argmax_avx2(logits: &[f32]) -> u32 {
    argmax_lanes(logits)
}

#[inline(always)]
fn argmax_lanes(logits: &[f32]) -> u32 {
    const LANES: usize = 8;
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [0u32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let base = (c * LANES) as u32;
        for l in 0..LANES {
            let gt = chunk[l] > best[l];
            best[l] = if gt { chunk[l] } else { best[l] };
            at[l] = if gt { base + l as u32 } else { at[l] };
        }
    }
    let (mut best_v, mut best_i) = (f32::NEG_INFINITY, 0usize);
    let lanes = best.iter().zip(&at).map(|(&v, &i)| (v, i as usize));
    let rest = tail
        .iter()
        .enumerate()
        .map(|(i, &v)| (v, logits.len() - tail.len() + i));
    for (v, i) in lanes.chain(rest) {
        if v > best_v || (v == best_v && i < best_i) {
            (best_v, best_i) = (v, i);
        }
    }
    best_i as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn argmax_takes_the_first_of_ties_across_lanes_and_the_tail() {
        let naive = |l: &[f32]| {
            let mut best = 0;
            for (i, &v) in l.iter().enumerate() {
                if v > l[best] || l[best].is_nan() && !v.is_nan() {
                    best = i;
                }
            }
            best as u32
        };
        let mut l: Vec<f32> = (0..21).map(|i| (i % 5) as f32).collect();
        assert_eq!(argmax(&l), naive(&l)); // 4.0 first at 4, again at 9, 14, 19 (tail)
        l[20] = 7.0; // the largest in the tail
        assert_eq!(argmax(&l), 20);
        l[13] = 7.0; // tie: the lower index wins
        assert_eq!(argmax(&l), 13);
        l[2] = f32::NAN;
        assert_eq!(argmax(&l), 13);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 11]), 0);
        for seed in 0..50u32 {
            let v: Vec<f32> = (0..37u32)
                .map(|i| ((i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 9) as f32)
                .collect();
            assert_eq!(argmax(&v), naive(&v), "{v:?}");
        }
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 5,
            seed: Some(42),
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        // top_k 5 keeps only the five best ids (value 1.8, i % 7 == 6, lowest ids first).
        let allowed = [6, 13, 20, 27, 34];
        assert!(a.iter().all(|t| allowed.contains(t)), "{a:?}");
    }

    #[test]
    fn tiny_top_p_is_greedy_and_min_p_filters() {
        let logits = [1.0, 5.0, 4.9, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: Some(3),
            ..Default::default()
        });
        assert!((0..50).all(|_| matches!(s.sample(&logits), 1 | 2)));
    }
}
