//! The scoring half of the scheduler, as pure functions over a snapshot: each scorer gives a
//! candidate a score in 0..1, the weighted sum ranks them, ties go to a random one.

/// What the scorers know of one eligible endpoint for this request.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Candidate {
    /// Requests waiting in its queue.
    pub waiting: f64,
    /// KV-cache usage, 0..1.
    pub kv_cache_usage: f64,
    /// Share of the prompt's leading blocks it has cached, 0..1.
    pub prefix_match: f64,
    /// LoRA affinity, 0..1 (1: adapter loaded; 0.8: room to load it; 0: neither).
    pub lora: f64,
}

/// Scorer weights; zero turns a scorer off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Shorter queues score higher (min-max normalised over the candidates).
    pub queue: f64,
    /// More free KV cache scores higher (1 - usage).
    pub kv_cache: f64,
    /// More cached prompt prefix scores higher.
    pub prefix_cache: f64,
    /// Serving (or able to load) the requested adapter scores higher.
    pub lora_affinity: f64,
}

/// One candidate's scores, for ranking and for debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scores {
    /// Queue scorer, 0..1.
    pub queue: f64,
    /// KV-cache scorer, 0..1.
    pub kv_cache: f64,
    /// Prefix-cache scorer, 0..1.
    pub prefix_cache: f64,
    /// LoRA scorer, 0..1.
    pub lora_affinity: f64,
    /// Weighted sum.
    pub total: f64,
}

/// Scores every candidate.
pub fn score(candidates: &[Candidate], weights: &Weights) -> Vec<Scores> {
    let min = candidates.iter().map(|c| c.waiting).fold(f64::INFINITY, f64::min);
    let max = candidates.iter().map(|c| c.waiting).fold(f64::NEG_INFINITY, f64::max);
    candidates
        .iter()
        .map(|c| {
            // All queues equal: nobody is better, everybody gets the full score.
            let queue = if max > min {
                (max - c.waiting) / (max - min)
            } else {
                1.0
            };
            let kv_cache = (1.0 - c.kv_cache_usage).clamp(0.0, 1.0);
            let prefix_cache = c.prefix_match.clamp(0.0, 1.0);
            let lora_affinity = c.lora.clamp(0.0, 1.0);
            Scores {
                queue,
                kv_cache,
                prefix_cache,
                lora_affinity,
                total: weights.queue * queue
                    + weights.kv_cache * kv_cache
                    + weights.prefix_cache * prefix_cache
                    + weights.lora_affinity * lora_affinity,
            }
        })
        .collect()
}

/// Candidate indexes, best total first; equal totals in random order.
pub fn rank(scores: &[Scores], rng: &mut fastrand::Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    rng.shuffle(&mut order);
    // A stable sort keeps the shuffled order among equals.
    order.sort_by(|a, b| scores[*b].total.total_cmp(&scores[*a].total));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Weights = Weights {
        queue: 2.0,
        kv_cache: 2.0,
        prefix_cache: 3.0,
        lora_affinity: 1.0,
    };

    fn candidate(waiting: f64, kv: f64, prefix: f64) -> Candidate {
        Candidate {
            waiting,
            kv_cache_usage: kv,
            prefix_match: prefix,
            lora: 0.0,
        }
    }

    #[test]
    fn least_loaded_wins() {
        let scores = score(
            &[
                candidate(4.0, 0.5, 0.0),
                candidate(0.0, 0.1, 0.0),
                candidate(2.0, 0.3, 0.0),
            ],
            &DEFAULT,
        );
        assert_eq!(scores[1].queue, 1.0);
        assert_eq!(scores[0].queue, 0.0);
        assert_eq!(scores[2].queue, 0.5);
        assert_eq!(rank(&scores, &mut fastrand::Rng::with_seed(1))[0], 1);
    }

    #[test]
    fn a_full_prefix_hit_outweighs_a_slightly_longer_queue() {
        // Prefix weight 3 beats the queue difference (weight 2) and a little KV usage.
        let scores = score(&[candidate(1.0, 0.2, 0.0), candidate(2.0, 0.3, 1.0)], &DEFAULT);
        assert_eq!(rank(&scores, &mut fastrand::Rng::with_seed(1))[0], 1);
    }

    #[test]
    fn ties_are_broken_at_random() {
        let scores = score(&[candidate(0.0, 0.0, 0.0); 3], &DEFAULT);
        let firsts: std::collections::HashSet<usize> = (0..64)
            .map(|seed| rank(&scores, &mut fastrand::Rng::with_seed(seed))[0])
            .collect();
        assert_eq!(firsts.len(), 3);
    }

    #[test]
    fn zero_weights_switch_scorers_off() {
        let weights = Weights {
            queue: 0.0,
            kv_cache: 0.0,
            prefix_cache: 1.0,
            lora_affinity: 0.0,
        };
        let scores = score(&[candidate(0.0, 0.0, 0.0), candidate(9.0, 1.0, 0.5)], &weights);
        assert_eq!(rank(&scores, &mut fastrand::Rng::with_seed(3))[0], 1);
    }
}
