//! Stop strings over streamed text.
//!
//! A stop string can straddle token (and delta) boundaries, so text that could be the start of a
//! stop string is held back until it is known not to be one. As in the OpenAI API, the stop
//! string itself and everything after it is not returned.

/// What [`StopMatcher::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to send now (possibly empty).
    Continue(String),
    /// A stop string matched: `text` is what precedes it and has not been sent yet;
    /// `stop` is the index of the stop string in the list given to [`StopMatcher::new`].
    Stopped { text: String, stop: usize },
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds a detokenizer delta.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(delta.to_string());
        }
        self.held.push_str(delta);
        // Earliest match wins; on a tie the longer stop string (it covers the shorter).
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i)))
            .min_by_key(|&(pos, i)| (pos, std::cmp::Reverse(self.stops[i].len())));
        if let Some((pos, stop)) = found {
            let text = self.held[..pos].to_string();
            self.held.clear();
            return StopOutcome::Stopped { text, stop };
        }
        let keep = self.partial_match_len();
        let send = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        StopOutcome::Continue(send)
    }

    /// At the end of generation the held-back text was not a stop string after all.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn partial_match_len(&self) -> usize {
        let held = self.held.as_str();
        held.char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let suffix = &held[i..];
                self.stops.iter().any(|s| s.starts_with(suffix))
            })
            .map_or(0, |i| held.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<usize>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped { text, stop } => {
                    out.push_str(&text);
                    return (out, Some(stop));
                }
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_across_deltas() {
        assert_eq!(
            run(&["###"], &["Hello #", "#", "# rest"]),
            ("Hello ".into(), Some(0))
        );
        assert_eq!(run(&["###"], &["a #", "# b"]), ("a ## b".into(), None));
        assert_eq!(run(&["x", "ab"], &["zza", "bx"]), ("zz".into(), Some(1)));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
        assert_eq!(
            run(&["日本"], &["こんに日", "本語"]),
            ("こんに".into(), Some(0))
        );
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = StopMatcher::new(vec!["</answer>".into()]);
        assert_eq!(m.push("text </ans"), StopOutcome::Continue("text ".into()));
        assert_eq!(m.push("wer"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("!"), StopOutcome::Continue("</answer!".into()));
    }
}
