//! Stop strings over a stream of text: holds back what may still become a stop string.

/// Tracks generated text and decides how much of it is safe to emit.
#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

pub(crate) enum Step {
    /// Emit this text and go on.
    Emit(String),
    /// A stop string matched: emit this last text and end.
    Stop(String),
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> Self {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        StopMatcher {
            stops,
            ..Default::default()
        }
    }

    pub(crate) fn push(&mut self, delta: &str) -> Step {
        // Held-back text was never emitted, so a stop string is searched from there on.
        let from = self.emitted;
        self.text.push_str(delta);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(end) = first_stop {
            let out = self.text[from..end].to_string();
            self.text.truncate(end);
            self.emitted = end;
            return Step::Stop(out);
        }
        let hold = self.partial_suffix_len(from);
        let safe = self.text.len() - hold;
        let out = self.text[from..safe].to_string();
        self.emitted = safe;
        Step::Emit(out)
    }

    /// Text held back at the end (a prefix of a stop string that never completed).
    pub(crate) fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// The full text, without any stop string.
    pub(crate) fn into_text(self) -> String {
        self.text
    }

    /// Length of the longest suffix of the unemitted text that is a proper prefix of a stop.
    fn partial_suffix_len(&self, from: usize) -> usize {
        let tail = &self.text[from..];
        let mut best = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > best && tail.ends_with(&stop[..i]) {
                    best = i;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = Vec::new();
        for d in deltas {
            match m.push(d) {
                Step::Emit(t) => out.push(t),
                Step::Stop(t) => {
                    out.push(t);
                    return (out, true, m.into_text());
                }
            }
        }
        out.push(m.flush());
        (out, false, m.into_text())
    }

    #[test]
    fn stop_split_across_deltas_is_never_emitted() {
        let (out, stopped, text) = run(&["\n\n"], &["Hello", "\n", "\nWorld"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hello");
        assert_eq!(text, "Hello");
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        let (out, stopped, _) = run(&["END"], &["a E", "N", "x"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a ", "", "ENx", ""]);
    }

    #[test]
    fn held_back_prefix_is_flushed_at_the_end() {
        let (out, stopped, text) = run(&["END"], &["a EN"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "a EN");
        assert_eq!(text, "a EN");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["b", "a"], &["xyab"]);
        assert!(stopped);
        assert_eq!(out.concat(), "xy");
    }
}
