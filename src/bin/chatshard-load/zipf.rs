//! Zipf-distributed picks: which of a run's chats the `mixed` scenario's
//! background traffic goes to, a few popular, most quiet.

/// Picks chat indexes by a Zipf law (exponent 1) over `n` chats: chat `i` is
/// drawn with weight 1/(i+1).
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize) -> Self {
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|i| {
                total += 1.0 / (i as f64 + 1.0);
                total
            })
            .collect();
        Self { cumulative }
    }

    pub fn pick(&self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rand::random::<f64>() * total;
        self.cumulative
            .partition_point(|c| *c < x)
            .min(self.cumulative.len().saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_stay_in_range_and_favour_the_first_chats() {
        let zipf = Zipf::new(100);
        let mut counts = [0u32; 100];
        for _ in 0..20_000 {
            counts[zipf.pick()] += 1;
        }
        // Chat 0 has weight 1 of H(100) = 5.19 (19 %), chat 99 1/100 of it.
        assert!(counts[0] > 3000, "{}", counts[0]);
        assert!(counts[0] > counts[1] && counts[1] > counts[9]);
        assert!(counts[99] < 200, "{}", counts[99]);
    }

    #[test]
    fn one_chat_is_always_picked() {
        let zipf = Zipf::new(1);
        assert!((0..100).all(|_| zipf.pick() == 0));
    }
}
