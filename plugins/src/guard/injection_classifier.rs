//! The learned stage of `prompt-guard`'s injection detection: a linear classifier over hashed
//! words and word pairs, trained offline by `scripts/injection_train.sh` and shipped as a
//! safetensors file (`weights` int8 `[buckets]`, `scale` and `bias` f32 `[1]`, metadata
//! `format: payload-processor-injection-v1`, `window`, `stride`, `threshold`).
//!
//! The features must match the training script byte for byte: ASCII letters lower-cased; words
//! are runs of ASCII letters and digits and of non-ASCII bytes, cut to 32 bytes; each word
//! (`w` + word) and each pair of neighbours (`b` + first + space + second) is hashed with
//! FNV-1a 32 into `buckets`, the top bit giving the sign. A window of up to `window` words scores
//! `bias + scale * sum(sign * weight) / sqrt(features)`; long texts are scored every `stride`
//! words and the highest probability wins. No allocation beyond one vector of word scores.

use safetensors::{Dtype, SafeTensors};

/// The format this build reads.
pub const FORMAT: &str = "payload-processor-injection-v1";
const MAX_WORD: usize = 32;
const FNV_OFFSET: u32 = 2_166_136_261;
const FNV_PRIME: u32 = 16_777_619;
/// FNV-1a state after the kind byte of a word (`w`) and of a pair (`b`).
const UNIGRAM_SEED: u32 = (FNV_OFFSET ^ b'w' as u32).wrapping_mul(FNV_PRIME);
const PAIR_SEED: u32 = (FNV_OFFSET ^ b'b' as u32).wrapping_mul(FNV_PRIME);

/// A loaded classifier, shared read-only by every stream.
#[derive(Debug)]
pub struct InjectionClassifier {
    weights: Vec<i8>,
    mask: u32,
    scale: f32,
    bias: f32,
    window: usize,
    stride: usize,
    /// The threshold the training chose (used when the config gives none).
    pub trained_threshold: f64,
}

fn fnv(mut hash: u32, bytes: impl IntoIterator<Item = u8>) -> u32 {
    for byte in bytes {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

fn lower(byte: u8) -> u8 {
    byte.to_ascii_lowercase()
}

fn word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte >= 0x80
}

impl InjectionClassifier {
    /// Reads a weights file; the error names what is wrong with it.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, String> {
        let (_, metadata) =
            SafeTensors::read_metadata(bytes).map_err(|err| format!("not a safetensors file: {err}"))?;
        let tensors = SafeTensors::deserialize(bytes).map_err(|err| format!("not a safetensors file: {err}"))?;
        let meta = metadata.metadata().clone().unwrap_or_default();
        let format = meta.get("format").map(String::as_str).unwrap_or("none");
        if format != FORMAT {
            return Err(format!("format {format:?} is not {FORMAT:?}"));
        }
        let number = |key: &str| -> Result<usize, String> {
            meta.get(key)
                .and_then(|value| value.parse().ok())
                .ok_or_else(|| format!("metadata {key:?} is missing or not a number"))
        };
        let buckets = number("buckets")?;
        let window = number("window")?;
        let stride = number("stride")?;
        if !buckets.is_power_of_two() || !(256..=1 << 24).contains(&buckets) {
            return Err(format!("buckets {buckets} is not a power of two in 256..=16777216"));
        }
        if window == 0 || stride == 0 || stride > window {
            return Err(format!(
                "window {window} and stride {stride} must be positive, stride <= window"
            ));
        }
        let trained_threshold = meta
            .get("threshold")
            .and_then(|value| value.parse::<f64>().ok())
            .filter(|t| (0.0..1.0).contains(t))
            .ok_or("metadata \"threshold\" is missing or not in 0..1")?;
        let tensor = |name: &str, dtype: Dtype, len: usize| {
            let view = tensors
                .tensor(name)
                .map_err(|_| format!("tensor {name:?} is missing"))?;
            if view.dtype() != dtype || view.shape() != [len] {
                return Err(format!(
                    "tensor {name:?} is {:?} {:?}, expected {dtype:?} [{len}]",
                    view.dtype(),
                    view.shape()
                ));
            }
            Ok(view.data().to_vec())
        };
        let weights = tensor("weights", Dtype::I8, buckets)?
            .into_iter()
            .map(|b| b as i8)
            .collect();
        let float = |name: &str| -> Result<f32, String> {
            let data = tensor(name, Dtype::F32, 1)?;
            let value = f32::from_le_bytes(data[..4].try_into().expect("four bytes"));
            value
                .is_finite()
                .then_some(value)
                .ok_or(format!("tensor {name:?} is not finite"))
        };
        Ok(Self {
            weights,
            mask: (buckets - 1) as u32,
            scale: float("scale")?,
            bias: float("bias")?,
            window,
            stride,
            trained_threshold,
        })
    }

    fn weight(&self, hash: u32) -> f32 {
        let weight = f32::from(self.weights[(hash & self.mask) as usize]);
        if hash >> 31 == 1 {
            -weight
        } else {
            weight
        }
    }

    /// The probability that `text` is an injection: the highest of its windows.
    pub fn score(&self, text: &str) -> f64 {
        let bytes = text.as_bytes();
        // Per word: its own weight and the weight of the pair it ends.
        let mut word_scores: Vec<(f32, f32)> = Vec::with_capacity(bytes.len() / 5);
        // The hash of `b` + the previous word + a space: a pair's hash continues from it.
        let mut pair_prefix: Option<u32> = None;
        let mut at = 0;
        while at < bytes.len() {
            if !word_byte(bytes[at]) {
                at += 1;
                continue;
            }
            let start = at;
            while at < bytes.len() && word_byte(bytes[at]) {
                at += 1;
            }
            let word = &bytes[start..at.min(start + MAX_WORD)];
            // The word's three hashes in one pass: itself, the pair it ends, the pair it starts.
            let (mut unigram, mut pair, mut next) = (UNIGRAM_SEED, pair_prefix.unwrap_or(0), PAIR_SEED);
            for &byte in word {
                let byte = u32::from(lower(byte));
                unigram = (unigram ^ byte).wrapping_mul(FNV_PRIME);
                pair = (pair ^ byte).wrapping_mul(FNV_PRIME);
                next = (next ^ byte).wrapping_mul(FNV_PRIME);
            }
            let pair_weight = if pair_prefix.is_some() { self.weight(pair) } else { 0.0 };
            word_scores.push((self.weight(unigram), pair_weight));
            pair_prefix = Some(fnv(next, [b' ']));
        }
        if word_scores.is_empty() {
            return 0.0;
        }
        let mut best = f64::NEG_INFINITY;
        let mut start = 0;
        loop {
            let end = (start + self.window).min(word_scores.len());
            let window = &word_scores[start..end];
            // The first word's pair reaches outside the window.
            let sum: f32 = window.iter().map(|(w, _)| w).sum::<f32>() + window[1..].iter().map(|(_, p)| p).sum::<f32>();
            let features = (2 * window.len() - 1) as f32;
            let z = f64::from(self.bias + self.scale * sum / features.sqrt());
            best = best.max(z);
            if end == word_scores.len() {
                break;
            }
            start += self.stride;
        }
        1.0 / (1.0 + (-best).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weights file in the trained format; `weight_of` gives the stored int8 per bucket.
    fn file(buckets: usize, shape: usize, format: &str, weight_of: impl Fn(usize) -> i8) -> Vec<u8> {
        let weights: Vec<u8> = (0..shape).map(|bucket| weight_of(bucket) as u8).collect();
        let header = format!(
            r#"{{"weights":{{"dtype":"I8","shape":[{shape}],"data_offsets":[0,{shape}]}},"scale":{{"dtype":"F32","shape":[1],"data_offsets":[{shape},{a}]}},"bias":{{"dtype":"F32","shape":[1],"data_offsets":[{a},{b}]}},"__metadata__":{{"format":"{format}","buckets":"{buckets}","window":"4","stride":"2","threshold":"0.5"}}}}"#,
            a = shape + 4,
            b = shape + 8
        );
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header.as_bytes());
        out.extend(weights);
        out.extend(0.1f32.to_le_bytes());
        out.extend((-3.0f32).to_le_bytes());
        out
    }

    fn trigger_bucket(word: &str, buckets: usize) -> (usize, bool) {
        let hash = fnv(fnv(FNV_OFFSET, [b'w']), word.bytes());
        ((hash as usize) & (buckets - 1), hash >> 31 == 1)
    }

    #[test]
    fn scores_the_highest_window_and_ignores_case() {
        let (bucket, negative) = trigger_bucket("zqxjailword", 256);
        let bytes = file(256, 256, FORMAT, |b| match (b == bucket, negative) {
            (true, false) => 127,
            (true, true) => -127,
            _ => 0,
        });
        let classifier = InjectionClassifier::from_safetensors(&bytes).expect("loads");
        assert!(classifier.score("please ZQXJAILWORD now") > 0.9);
        assert!(classifier.score("please summarise this") < 0.1);
        assert_eq!(classifier.score(""), 0.0);
        // Windows of four words every two: the word far into a long text still counts.
        let long = format!("{} zqxjailword", "plain words only here ".repeat(50));
        assert!(classifier.score(&long) > 0.9);
    }

    #[test]
    fn refuses_files_that_are_not_its_format() {
        let cases = [
            (
                file(256, 128, FORMAT, |_| 0),
                "tensor \"weights\" is I8 [128], expected I8 [256]",
            ),
            (file(300, 300, FORMAT, |_| 0), "buckets 300 is not a power of two"),
            (file(256, 256, "other-v9", |_| 0), "format \"other-v9\" is not"),
            (b"not a file".to_vec(), "not a safetensors file"),
        ];
        for (bytes, expected) in cases {
            let err = InjectionClassifier::from_safetensors(&bytes).expect_err("refused");
            assert!(err.starts_with(expected), "{err}");
        }
    }
}
