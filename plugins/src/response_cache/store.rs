//! The cache's memory: answers by key in LRU order, bounded by entries and bytes, with a TTL;
//! for semantic entries, their prompt vectors grouped by everything that must match exactly
//! (the bucket), so a lookup compares vectors only where a hit is possible.
//!
//! Within a bucket, a lookup first ranks entries by one bit per dimension (the sign of the
//! vector minus the model's mean row; Hamming distance over four u64 words for 256
//! dimensions), then computes exact cosines for the closest few. At 10,000 entries in one
//! bucket that is 320 KB scanned instead of 10 MB (`bench/benches/response_cache.rs`). The ANN
//! crates (hnsw_rs, instant-distance) cannot remove entries, which LRU and TTL need, and are
//! built for far larger sets.

use super::key::Digest32;
use lru::LruCache;
use std::collections::HashMap;
use std::sync::Arc;

/// A stored answer.
#[derive(Debug)]
pub struct Answer {
    /// The body as the client received it (a recorded event stream for streamed answers).
    pub body: Arc<[u8]>,
    /// Its `content-type`.
    pub content_type: String,
    /// A recorded event stream.
    pub streamed: bool,
    /// When it was stored (host clock).
    pub stored_nanos: u64,
}

struct Entry {
    answer: Answer,
    expires_nanos: u64,
    bytes: usize,
    /// The semantic bucket holding this entry's vector.
    bucket: Option<Digest32>,
}

/// One bucket's vectors, entry by entry in the same order.
#[derive(Default)]
struct Bucket {
    keys: Vec<Digest32>,
    /// Unit vectors, `dim` floats each.
    vectors: Vec<f32>,
    /// Sign bits of each vector minus the mean row, `words` u64 each.
    codes: Vec<u64>,
}

/// What an insert or lookup did to the store, for the stats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Churn {
    /// Entries dropped to stay within the limits.
    pub evicted: u64,
    /// Entries dropped because their TTL ran out.
    pub expired: u64,
}

/// A semantic query: the bucket, the unit vector and its sign bits.
pub struct Query<'a> {
    /// The bucket (everything that must match exactly).
    pub bucket: &'a Digest32,
    /// The prompt's unit vector.
    pub vector: &'a [f32],
    /// Its sign bits ([`Store::code`]).
    pub code: &'a [u64],
    /// The similarity a hit needs.
    pub threshold: f32,
}

/// Exact cosines are computed for at most this many entries of a bucket, the closest by bits.
const RERANK: usize = 48;

/// The cache's contents.
pub struct Store {
    entries: LruCache<Digest32, Entry>,
    buckets: HashMap<Digest32, Bucket>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    ttl_nanos: u64,
    /// Vector length and the mean row subtracted before taking sign bits (semantic mode).
    dim: usize,
    mean: Vec<f32>,
}

impl Store {
    /// An empty store with these limits; `mean` is the embedding model's mean row (empty in
    /// exact mode).
    pub fn new(max_entries: usize, max_bytes: usize, ttl_nanos: u64, mean: Vec<f32>) -> Self {
        Self {
            entries: LruCache::unbounded(),
            buckets: HashMap::new(),
            bytes: 0,
            max_entries,
            max_bytes,
            ttl_nanos,
            dim: mean.len(),
            mean,
        }
    }

    /// Entries held.
    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    /// Bytes held (answers, keys and vectors).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The sign bits of `vector` minus the mean row.
    pub fn code(&self, vector: &[f32]) -> Vec<u64> {
        let mut code = vec![0u64; self.dim.div_ceil(64)];
        for (i, (x, m)) in vector.iter().zip(&self.mean).enumerate() {
            if x > m {
                code[i / 64] |= 1 << (i % 64);
            }
        }
        code
    }

    /// The answer under `key`, if fresh (a stale one is dropped).
    pub fn get(&mut self, key: &Digest32, now: u64, churn: &mut Churn) -> Option<&Answer> {
        let expired = self.entries.peek(key)?.expires_nanos <= now;
        if expired {
            self.remove(key);
            churn.expired += 1;
            return None;
        }
        self.entries.get(key).map(|entry| &entry.answer)
    }

    /// The most similar fresh entry of the query's bucket at or above its threshold: its key
    /// and similarity.
    pub fn nearest(&mut self, query: &Query<'_>, now: u64, churn: &mut Churn) -> Option<(Digest32, f32)> {
        loop {
            let (key, score) = self.best_in_bucket(query)?;
            if self.get(&key, now, churn).is_some() {
                return Some((key, score));
            }
            // It had expired and is gone now: look again.
        }
    }

    fn best_in_bucket(&self, query: &Query<'_>) -> Option<(Digest32, f32)> {
        let bucket = self.buckets.get(query.bucket)?;
        let dim = self.dim;
        let count = bucket.keys.len();
        let candidates: Vec<usize> = if count <= RERANK {
            (0..count).collect()
        } else {
            // Hamming distances, then the RERANK closest by a histogram cut (no sort).
            let mut distances = Vec::with_capacity(count);
            let histogram = hamming_distances(&bucket.codes, query.code, &mut distances);
            let (mut cut, mut below) = (0, 0);
            while cut < HISTOGRAM - 1 && below + histogram[cut] < RERANK {
                below += histogram[cut];
                cut += 1;
            }
            let mut at_cut = RERANK - below;
            let mut candidates = Vec::with_capacity(RERANK);
            for (i, &d) in distances.iter().enumerate() {
                let d = usize::from(d);
                if d < cut || (d == cut && at_cut > 0) {
                    at_cut -= usize::from(d == cut);
                    candidates.push(i);
                }
            }
            candidates
        };
        let mut best: Option<(usize, f32)> = None;
        for i in candidates {
            let vector = &bucket.vectors[i * dim..(i + 1) * dim];
            let score = dot(vector, query.vector);
            if score >= query.threshold && best.map_or(true, |(_, best)| score > best) {
                best = Some((i, score));
            }
        }
        best.map(|(i, score)| (bucket.keys[i], score))
    }

    /// Stores an answer under `key` (replacing any), with its vector in `bucket` for semantic
    /// entries, then evicts the least recently used entries beyond the limits. An answer
    /// bigger than the whole store is not kept (false).
    pub fn insert(
        &mut self,
        key: Digest32,
        answer: Answer,
        semantic: Option<(&Digest32, &[f32])>,
        now: u64,
        churn: &mut Churn,
    ) -> bool {
        let bytes = answer.body.len() + answer.content_type.len() + 96 + semantic.map_or(0, |_| self.dim * 4 + 40);
        if bytes > self.max_bytes {
            return false;
        }
        self.remove(&key);
        let bucket = semantic.map(|(bucket_key, vector)| {
            let code = self.code(vector);
            let bucket = self.buckets.entry(*bucket_key).or_default();
            bucket.keys.push(key);
            bucket.vectors.extend_from_slice(vector);
            bucket.codes.extend_from_slice(&code);
            *bucket_key
        });
        self.bytes += bytes;
        self.entries.put(
            key,
            Entry {
                answer,
                expires_nanos: now.saturating_add(self.ttl_nanos),
                bytes,
                bucket,
            },
        );
        // The new entry alone fits, and it is the most recent: it is never the one evicted.
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((oldest, entry)) = self.entries.pop_lru() else {
                break;
            };
            self.forget(&oldest, entry);
            churn.evicted += 1;
        }
        true
    }

    /// Drops the entry under `key`, if any.
    pub fn remove(&mut self, key: &Digest32) {
        if let Some(entry) = self.entries.pop(key) {
            self.forget(key, entry);
        }
    }

    /// Drops an entry's bytes and its place in its bucket.
    fn forget(&mut self, key: &Digest32, entry: Entry) {
        self.bytes -= entry.bytes;
        let Some(bucket_key) = entry.bucket else { return };
        let Some(bucket) = self.buckets.get_mut(&bucket_key) else {
            return;
        };
        if let Some(i) = bucket.keys.iter().position(|k| k == key) {
            let (dim, words) = (self.dim, self.mean.len().div_ceil(64));
            let last = bucket.keys.len() - 1;
            bucket.keys.swap_remove(i);
            bucket.vectors.copy_within(last * dim..(last + 1) * dim, i * dim);
            bucket.vectors.truncate(last * dim);
            bucket.codes.copy_within(last * words..(last + 1) * words, i * words);
            bucket.codes.truncate(last * words);
        }
        if bucket.keys.is_empty() {
            self.buckets.remove(&bucket_key);
        }
    }
}

/// Histogram bins of Hamming distances (distances above the last bin count in it).
const HISTOGRAM: usize = 257;

/// The Hamming distance of each code (`query.len()` words each) to `query`, and how many
/// codes are at each distance. Compiled for the POPCNT instruction too and chosen at run time:
/// the x86-64 baseline counts bits in a dozen instructions per word.
#[multiversion::multiversion(targets("x86_64+avx2+popcnt", "x86_64+popcnt"))]
fn hamming_distances(codes: &[u64], query: &[u64], out: &mut Vec<u16>) -> [usize; HISTOGRAM] {
    let mut histogram = [0usize; HISTOGRAM];
    let mut record = |d: u32| {
        histogram[(d as usize).min(HISTOGRAM - 1)] += 1;
        out.push(d as u16);
    };
    // 256 dimensions (wordllama, most Model2Vec models): four fixed words, unrolled.
    if let Ok(query) = <&[u64; 4]>::try_from(query) {
        for code in codes.chunks_exact(4) {
            record(
                (code[0] ^ query[0]).count_ones()
                    + (code[1] ^ query[1]).count_ones()
                    + (code[2] ^ query[2]).count_ones()
                    + (code[3] ^ query[3]).count_ones(),
            );
        }
    } else {
        for code in codes.chunks_exact(query.len()) {
            record(code.iter().zip(query).map(|(a, b)| (a ^ b).count_ones()).sum());
        }
    }
    histogram
}

/// Dot product in eight independent sums, so it vectorizes (a single running sum cannot be
/// reordered); AVX2 where the CPU has it.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            sums[lane] += x[lane] * y[lane];
        }
    }
    sums.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str) -> Answer {
        Answer {
            body: body.as_bytes().into(),
            content_type: "application/json".into(),
            streamed: false,
            stored_nanos: 0,
        }
    }

    fn key(n: u8) -> Digest32 {
        [n; 32]
    }

    #[test]
    fn lru_evicts_the_least_recently_used_beyond_max_entries_and_bytes() {
        let mut store = Store::new(2, 10_000, u64::MAX / 2, Vec::new());
        let mut churn = Churn::default();
        store.insert(key(1), answer("one"), None, 0, &mut churn);
        store.insert(key(2), answer("two"), None, 0, &mut churn);
        assert!(store.get(&key(1), 1, &mut churn).is_some(), "1 is now the most recent");
        store.insert(key(3), answer("three"), None, 0, &mut churn);
        assert_eq!(churn.evicted, 1);
        assert!(
            store.get(&key(2), 1, &mut churn).is_none(),
            "2 was the least recently used"
        );
        assert!(store.get(&key(1), 1, &mut churn).is_some());
        assert_eq!(store.entries(), 2);
        // Bytes: an answer bigger than the store is refused; big ones push others out.
        let mut small = Store::new(100, 400, u64::MAX / 2, Vec::new());
        assert!(!small.insert(key(1), answer(&"x".repeat(500)), None, 0, &mut churn));
        small.insert(key(1), answer(&"x".repeat(150)), None, 0, &mut churn);
        small.insert(key(2), answer(&"y".repeat(150)), None, 0, &mut churn);
        assert_eq!(small.entries(), 1);
        assert!(small.bytes() <= 400);
    }

    #[test]
    fn ttl_expires_entries() {
        let mut store = Store::new(10, 10_000, 100, Vec::new());
        let mut churn = Churn::default();
        store.insert(key(1), answer("one"), None, 1_000, &mut churn);
        assert!(store.get(&key(1), 1_099, &mut churn).is_some());
        assert!(store.get(&key(1), 1_100, &mut churn).is_none());
        assert_eq!((churn.expired, store.entries(), store.bytes()), (1, 0, 0));
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / norm).collect()
    }

    #[test]
    fn nearest_finds_the_most_similar_entry_of_the_bucket_above_the_threshold() {
        let dim = 64;
        let mut store = Store::new(100_000, usize::MAX, u64::MAX / 2, vec![0.0; dim]);
        let mut churn = Churn::default();
        let bucket = key(9);
        let mut rng = fastrand::Rng::with_seed(7);
        // Many random entries (past the bit-ranking size), then one close to the query.
        for n in 0..2_000u32 {
            let v = unit(&(0..dim).map(|_| rng.f32() - 0.5).collect::<Vec<_>>());
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&n.to_le_bytes());
            store.insert(k, answer("random"), Some((&bucket, &v)), 0, &mut churn);
        }
        let target = unit(&(0..dim).map(|_| rng.f32() - 0.5).collect::<Vec<_>>());
        let near: Vec<f32> = unit(&target.iter().map(|x| x + 0.02 * (rng.f32() - 0.5)).collect::<Vec<_>>());
        store.insert(key(200), answer("near"), Some((&bucket, &near)), 0, &mut churn);
        let code = store.code(&target);
        let query = Query {
            bucket: &bucket,
            vector: &target,
            code: &code,
            threshold: 0.95,
        };
        let (found, score) = store.nearest(&query, 1, &mut churn).expect("a hit");
        assert_eq!(found, key(200));
        assert!(score > 0.99);
        // Another bucket, or a higher bar, finds nothing.
        let other = key(8);
        assert!(store
            .nearest(
                &Query {
                    bucket: &other,
                    ..query
                },
                1,
                &mut churn
            )
            .is_none());
        assert!(store
            .nearest(
                &Query {
                    threshold: 0.99999,
                    ..Query {
                        bucket: &bucket,
                        vector: &target,
                        code: &code,
                        threshold: 0.0
                    }
                },
                1,
                &mut churn
            )
            .is_none());
        // Removing entries keeps the bucket consistent.
        let mut small = Store::new(1, usize::MAX, u64::MAX / 2, vec![0.0; dim]);
        small.insert(key(1), answer("a"), Some((&bucket, &near)), 0, &mut churn);
        small.insert(key(2), answer("b"), Some((&bucket, &target)), 0, &mut churn);
        let (found, _) = small
            .nearest(
                &Query {
                    bucket: &bucket,
                    vector: &near,
                    code: &code,
                    threshold: 0.5,
                },
                1,
                &mut churn,
            )
            .unwrap();
        assert_eq!(found, key(2), "the first entry was evicted with its vector");
    }
}
