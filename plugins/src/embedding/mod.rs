//! Static token embeddings: a table of one vector per token (safetensors, F16 or F32) and the
//! model's `tokenizer.json`; a text's embedding is the mean of its tokens' rows, with no
//! transformer at request time. This is what wordllama and Model2Vec models are, and it is what
//! `semantic-router` and `response-cache` compare prompts with.
//!
//! - [`tokenizer`]: the tokenizer subset these models use, matching the reference token for token.
//! - [`StaticModel`]: the table (kept as f16), loading with checks, embedding, memory.
//! - [`shared_model`]: one model per pair of files per process, shared by every processor and
//!   every worker that names them.
//! - [`source`]: the `embedding` parameter, and loading from files or through a cluster.
//! - [`request`]: a request's prompt text, and its embedding made once per request.

pub mod request;
pub mod source;
pub mod tokenizer;

use half::f16;
pub use request::{request_embedding, request_text, TextSource};
pub use source::{EmbeddingConfig, ModelSource};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
pub use tokenizer::Tokenizer;

/// A static embedding model.
#[derive(Debug)]
pub struct StaticModel {
    tokenizer: Tokenizer,
    /// `rows x dim`, row-major.
    table: Vec<f16>,
    rows: usize,
    dim: usize,
}

impl StaticModel {
    /// Loads a model from its safetensors table and its `tokenizer.json`. The table is the
    /// only 2-D tensor of the file, or the one named `embedding.weight` / `embeddings`; its rows
    /// must cover every token id of the tokenizer.
    pub fn load(weights: &[u8], tokenizer_json: &[u8]) -> Result<StaticModel, ModelError> {
        let tokenizer = Tokenizer::from_json(tokenizer_json).map_err(ModelError::Tokenizer)?;
        let tensors = safetensors::SafeTensors::deserialize(weights)
            .map_err(|err| ModelError::Weights(format!("not a safetensors file: {err}")))?;
        let names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
        let name = ["embedding.weight", "embeddings"]
            .iter()
            .find(|n| names.iter().any(|m| m == *n))
            .map(|n| n.to_string())
            .or_else(|| {
                let matrices: Vec<&String> = names
                    .iter()
                    .filter(|n| tensors.tensor(n).is_ok_and(|t| t.shape().len() == 2))
                    .collect();
                (matrices.len() == 1).then(|| matrices[0].clone())
            })
            .ok_or_else(|| {
                ModelError::Weights(format!(
                    "no embedding table: expected a tensor `embedding.weight` or `embeddings`, or a single 2-D tensor (found {names:?})"
                ))
            })?;
        let tensor = tensors
            .tensor(&name)
            .map_err(|err| ModelError::Weights(err.to_string()))?;
        let [rows, dim] = tensor.shape() else {
            return Err(ModelError::Weights(format!(
                "tensor {name:?} has shape {:?}, expected [vocab, dim]",
                tensor.shape()
            )));
        };
        let (rows, dim) = (*rows, *dim);
        if dim == 0 || rows == 0 {
            return Err(ModelError::Weights(format!("tensor {name:?} is empty")));
        }
        let data = tensor.data();
        let table: Vec<f16> = match tensor.dtype() {
            safetensors::Dtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect(),
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| f16::from_f32(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()))
                .collect(),
            other => {
                return Err(ModelError::Weights(format!(
                    "tensor {name:?} is {other:?}; F16, BF16 or F32 expected"
                )))
            }
        };
        let vocab = tokenizer.vocab_size();
        if vocab > rows {
            return Err(ModelError::Mismatch(format!(
                "the tokenizer has {vocab} tokens but the table has {rows} rows"
            )));
        }
        Ok(StaticModel {
            tokenizer,
            table,
            rows,
            dim,
        })
    }

    /// Vector length.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bytes the table takes (the tokenizer's maps come on top, a few MB at most).
    pub fn table_bytes(&self) -> usize {
        self.table.len() * 2
    }

    /// The mean of every row of the table: the direction all of this model's embeddings share,
    /// which a cache subtracts before it keeps one bit per dimension.
    pub fn mean_row(&self) -> Vec<f32> {
        let mut sum = vec![0f32; self.dim];
        for row in self.table.chunks_exact(self.dim) {
            add_row(&mut sum, row, 1.0);
        }
        let scale = 1.0 / self.rows.max(1) as f32;
        sum.iter_mut().for_each(|s| *s *= scale);
        sum
    }

    /// The token ids of `text`.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.tokenizer.encode(text, &mut ids);
        ids
    }

    /// The mean of the rows of `text`'s tokens (all zero for a text without tokens).
    pub fn embed(&self, text: &str) -> Vec<f32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        self.tokenizer.encode(text, &mut ids);
        let mut sum = vec![0f32; self.dim];
        let count = ids.len();
        // Each distinct token's row once, times its count: prompts repeat their common tokens,
        // and the rows are most of the cost.
        ids.sort_unstable();
        for run in ids.chunk_by(|a, b| a == b) {
            let id = (run[0] as usize).min(self.rows - 1);
            add_row(
                &mut sum,
                &self.table[id * self.dim..(id + 1) * self.dim],
                run.len() as f32,
            );
        }
        if count > 0 {
            let scale = 1.0 / count as f32;
            sum.iter_mut().for_each(|s| *s *= scale);
        }
        sum
    }
}

/// `sum += times * row`, compiled for AVX2 too and chosen at run time where the CPU has it (8
/// lanes instead of the baseline's 4).
#[multiversion::multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn add_row(sum: &mut [f32], row: &[f16], times: f32) {
    for (s, h) in sum.iter_mut().zip(row) {
        *s += times * f16_to_f32(h.to_bits());
    }
}

/// f16 to f32 in plain integer operations, so the pooling loop vectorizes on any x86-64 or
/// wasm target (the F16C instruction is not in the x86-64 baseline). Exact for normal numbers;
/// subnormals (below 6.1e-5) read as zero, and the tables hold no infinities or NaNs.
#[inline(always)]
fn f16_to_f32(bits: u16) -> f32 {
    let bits = u32::from(bits);
    let sign = (bits & 0x8000) << 16;
    let magnitude = bits & 0x7fff;
    // Rebias the exponent (15 -> 127) and widen the mantissa (10 -> 23 bits).
    let normal = (magnitude << 13) + 0x3800_0000;
    f32::from_bits(sign | if magnitude >= 0x0400 { normal } else { 0 })
}

/// Cosine similarity; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// Scales a vector to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Why a model did not load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// The weights file.
    Weights(String),
    /// The tokenizer file.
    Tokenizer(String),
    /// They do not belong together.
    Mismatch(String),
}

/// Models already loaded in this process, by their files: every processor and every
/// configuration that names the same files shares one table.
static MODELS: Mutex<Option<LoadedModels>> = Mutex::new(None);

/// (weights path, tokenizer path) -> the model, while anyone holds it.
type LoadedModels = HashMap<(String, String), Weak<StaticModel>>;

/// The model of these two files if one is loaded in this process (anyone still holds it).
pub fn loaded_model(weights_path: &str, tokenizer_path: &str) -> Option<Arc<StaticModel>> {
    let models = MODELS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    models
        .as_ref()?
        .get(&(weights_path.to_string(), tokenizer_path.to_string()))
        .and_then(Weak::upgrade)
}

/// The model of these two files, loaded once per process while anyone holds it.
pub fn shared_model(
    weights_path: &str,
    tokenizer_path: &str,
    load: impl FnOnce() -> Result<StaticModel, ModelError>,
) -> Result<Arc<StaticModel>, ModelError> {
    let key = (weights_path.to_string(), tokenizer_path.to_string());
    let mut models = MODELS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let models = models.get_or_insert_with(HashMap::new);
    if let Some(model) = models.get(&key).and_then(Weak::upgrade) {
        return Ok(model);
    }
    let model = Arc::new(load()?);
    models.retain(|_, model| model.strong_count() > 0);
    models.insert(key, Arc::downgrade(&model));
    Ok(model)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// Writes a tiny model's two files under the target directory and installs a file reader;
    /// returns (weights, tokenizer) paths. Token rows: `a` points one way, `c` another.
    pub(crate) fn model_files() -> (String, String) {
        let dir = std::env::temp_dir().join(format!("payload-processor-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let weights = dir.join("model.safetensors");
        let tokenizer = dir.join("tokenizer.json");
        let rows = 400;
        let dim = 4;
        let mut data = vec![0f32; rows * dim];
        for (id, axis) in [(2usize, 0usize), (5, 0), (7, 1), (4, 2), (1, 3)] {
            data[id * dim + axis] = 1.0; // a, ▁a -> x; ▁ab -> y; c -> z; ▁ -> w
        }
        let bytes: Vec<u8> = data.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![rows, dim], &bytes).unwrap();
        std::fs::write(
            &weights,
            safetensors::tensor::serialize([("embedding.weight", view)], None).unwrap(),
        )
        .unwrap();
        std::fs::write(&tokenizer, tokenizer_json()).unwrap();
        payload_processor_core::set_file_reader(|path| std::fs::read(path).map_err(|err| format!("{path}: {err}")));
        (weights.display().to_string(), tokenizer.display().to_string())
    }

    /// A Llama-style BPE over a tiny vocabulary: metaspace words, byte fallback for the rest.
    fn tokenizer_json() -> Vec<u8> {
        let mut vocab = serde_json::Map::new();
        for (i, token) in ["<unk>", "▁", "a", "b", "c", "▁a", "ab", "▁ab", "▁▁"]
            .iter()
            .enumerate()
        {
            vocab.insert(token.to_string(), json!(i));
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), json!(100 + b));
        }
        serde_json::to_vec(&json!({
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "model": {"type": "BPE", "vocab": vocab, "merges": ["a b", "▁ a", "▁ ab", "▁ ▁"],
                      "byte_fallback": true, "unk_token": "<unk>", "fuse_unk": true, "dropout": null}
        }))
        .unwrap()
    }

    fn table(rows: usize, dim: usize) -> Vec<u8> {
        let data: Vec<u8> = (0..rows * dim)
            .flat_map(|i| f16::from_f32((i % 7) as f32 - 3.0).to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![rows, dim], &data).unwrap();
        safetensors::tensor::serialize([("embedding.weight", view)], None).unwrap()
    }

    #[test]
    fn bpe_merges_by_rank_with_byte_fallback() {
        let tokenizer = Tokenizer::from_json(&tokenizer_json()).unwrap();
        let encode = |text: &str| {
            let mut ids = Vec::new();
            tokenizer.encode(text, &mut ids);
            ids
        };
        assert_eq!(encode("ab"), [7], "a+b first (rank 0), then ▁+ab");
        assert_eq!(encode("ab c"), [7, 1, 4]);
        assert_eq!(encode("  a"), [8, 5], "leading spaces: ▁▁ then ▁a");
        // 'é' is not in the vocabulary: its two UTF-8 bytes.
        assert_eq!(encode("é"), [1, 100 + 0xC3, 100 + 0xA9]);
        assert_eq!(encode(""), Vec::<u32>::new());
    }

    #[test]
    fn model_loads_embeds_and_refuses_mismatched_files() {
        let model = StaticModel::load(&table(400, 4), &tokenizer_json()).unwrap();
        assert_eq!(model.dim(), 4);
        assert_eq!(model.table_bytes(), 400 * 4 * 2);
        let v = model.embed("ab ab");
        assert_eq!(v.len(), 4);
        assert!(
            (cosine(&v, &model.embed("ab")) - 1.0).abs() < 1e-6,
            "a mean ignores repetition"
        );
        assert_eq!(model.embed(""), vec![0.0; 4]);
        let short = StaticModel::load(&table(10, 4), &tokenizer_json()).unwrap_err();
        assert!(matches!(short, ModelError::Mismatch(m) if m.contains("has 10 rows")));
        let garbage = StaticModel::load(b"not a file", &tokenizer_json()).unwrap_err();
        assert!(matches!(garbage, ModelError::Weights(m) if m.contains("not a safetensors file")));
        let unsupported = br#"{"model": {"type": "Unigram", "vocab": []}}"#;
        let err = StaticModel::load(&table(400, 4), unsupported).unwrap_err();
        assert!(matches!(err, ModelError::Tokenizer(m) if m.contains("\"Unigram\" is not supported")));
    }

    #[test]
    fn f16_conversion_is_exact_for_normal_numbers() {
        for x in [0.0f32, 1.0, -2.5, 0.000_061_035_156, 65504.0, -0.333_251_95] {
            let h = f16::from_f32(x);
            assert_eq!(f16_to_f32(h.to_bits()), h.to_f32(), "{x}");
        }
        assert_eq!(
            f16_to_f32(f16::from_f32(1e-7).to_bits()),
            0.0,
            "subnormals read as zero"
        );
    }

    #[test]
    fn cosine_and_normalize() {
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
    }
}
