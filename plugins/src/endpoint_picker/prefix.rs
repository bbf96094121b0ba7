//! Prefix-cache affinity: the prompt is cut into fixed-size blocks, each block's hash chains
//! the previous one (so a block only matches when everything before it matched too), and each
//! endpoint remembers, in an LRU, the block hashes of prompts it served. An endpoint's score is
//! the share of a new prompt's leading blocks it has seen, a stand-in for its KV-cache hits.

use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Chained hashes of the prompt's whole blocks (a trailing partial block is not cached by
/// model servers either), at most `max_blocks`. The model name seeds the chain: the same
/// prompt to another model shares no cache.
pub fn block_hashes(model: &str, prompt: &[u8], block_size: usize, max_blocks: usize) -> Vec<u64> {
    // xxh3 seeded with the previous block's hash: fast, and the same in every thread and VM.
    let mut previous = xxh3_64(model.as_bytes());
    prompt
        .chunks_exact(block_size.max(1))
        .take(max_blocks)
        .map(|block| {
            previous = xxh3_64_with_seed(block, previous);
            previous
        })
        .collect()
}

/// One LRU of block hashes per endpoint.
pub struct PrefixIndex {
    endpoints: Vec<Mutex<LruCache<u64, (), foldhash::fast::RandomState>>>,
}

impl PrefixIndex {
    /// An empty index for `endpoints` endpoints, each remembering `capacity` blocks.
    pub fn new(endpoints: usize, capacity: NonZeroUsize) -> Self {
        Self {
            // Keys are block hashes: a light seeded hasher (SipHash was a fifth of the
            // picker's cost per request), still seeded so clients cannot aim at one bucket.
            endpoints: (0..endpoints)
                .map(|_| Mutex::new(LruCache::with_hasher(capacity, foldhash::fast::RandomState::default())))
                .collect(),
        }
    }

    /// How many of `hashes`, from the first, `endpoint` has seen.
    pub fn matched_blocks(&self, endpoint: usize, hashes: &[u64]) -> usize {
        let Some(cache) = self.endpoints.get(endpoint) else {
            return 0;
        };
        let cache = cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        hashes.iter().take_while(|hash| cache.contains(hash)).count()
    }

    /// Records that `endpoint` served a prompt with these blocks (it now has them cached).
    pub fn record(&self, endpoint: usize, hashes: &[u64]) {
        let Some(cache) = self.endpoints.get(endpoint) else {
            return;
        };
        let mut cache = cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for hash in hashes {
            cache.put(*hash, ());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_so_a_block_matches_only_after_its_whole_prefix() {
        let a = block_hashes("m", &[b'a'; 256], 64, 100);
        assert_eq!(a.len(), 4);
        let mut changed_first = vec![b'a'; 256];
        changed_first[0] = b'b';
        let b = block_hashes("m", &changed_first, 64, 100);
        // Same text in blocks 2..4, but a different first block: nothing matches.
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_ne!(block_hashes("other", &[b'a'; 256], 64, 100)[0], a[0]);
        assert_eq!(block_hashes("m", &[b'a'; 63], 64, 100), Vec::<u64>::new());
        assert_eq!(block_hashes("m", &[b'a'; 1000], 64, 3).len(), 3);
    }

    #[test]
    fn matched_blocks_counts_the_leading_run_and_the_lru_forgets() {
        let index = PrefixIndex::new(2, NonZeroUsize::new(4).unwrap());
        let prompt = block_hashes("m", &[b'x'; 64 * 3], 64, 100);
        assert_eq!(index.matched_blocks(0, &prompt), 0);
        index.record(0, &prompt[..2]);
        assert_eq!(index.matched_blocks(0, &prompt), 2);
        assert_eq!(index.matched_blocks(1, &prompt), 0);
        assert_eq!(index.matched_blocks(7, &prompt), 0);
        // Four other blocks push the old ones out.
        index.record(0, &block_hashes("m", &[b'y'; 64 * 4], 64, 100));
        assert_eq!(index.matched_blocks(0, &prompt), 0);
    }
}
