//! Where a processor's embedding model comes from: files the `.so` reads at config load, or
//! paths fetched through an Envoy cluster after the configuration loaded (both forms; the only
//! way for the `.wasm`, which has no file system). Shared by every plugin that embeds.

use super::{loaded_model, shared_model, ModelError, StaticModel};
use payload_processor_core::{
    Background, BackgroundContext, BuildContext, CalloutError, CalloutRequest, CalloutResponse, ConfigError, Counter,
    PluginError,
};
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The `embedding` parameter of the plugins that embed.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// The safetensors table: a file, or a path on `cluster`.
    pub weights: String,
    /// The model's `tokenizer.json`: a file, or a path on `cluster`.
    pub tokenizer: String,
    /// An Envoy cluster serving both files.
    pub cluster: Option<String>,
    /// `:authority` of the fetches (default the cluster name).
    pub authority: Option<String>,
    /// How long one fetch may take (default 30s).
    #[serde(default, deserialize_with = "payload_processor_core::config::deserialize_duration")]
    #[schemars(with = "Option<String>")]
    pub fetch_timeout: Option<Duration>,
}

/// What a plugin computes from the model once it is there (route centroids), with errors as
/// (parameter path, message).
pub type Prepare<T> = Box<dyn Fn(Arc<StaticModel>) -> Result<T, (String, String)> + Send + Sync>;

/// A plugin's model and what it prepared with it: there from config load (files), or once the
/// fetch through the cluster succeeded. Until then [`ModelSource::get`] is `None` and requests
/// get [`ModelSource::not_loaded`] (503 `model_loading`), never a wait.
pub struct ModelSource<T> {
    processor: String,
    loaded: OnceLock<T>,
    prepare: Prepare<T>,
    fetch: Option<Fetch>,
}

/// Fetching the model through a cluster.
struct Fetch {
    cluster: String,
    authority: String,
    weights: String,
    tokenizer: String,
    timeout: Duration,
    state: Mutex<FetchState>,
    loaded: Counter,
    failed: Counter,
}

#[derive(Debug, Default)]
struct FetchState {
    started: Option<u64>,
    next_try: u64,
    weights: Option<Vec<u8>>,
    tokenizer: Option<Vec<u8>>,
}

/// Callout tags of the two files.
const WEIGHTS: u64 = 0;
const TOKENIZER: u64 = 1;

/// Loads the model named by `config` once per process (shared with every other processor and
/// configuration naming the same files); errors carry the parameter path.
fn load_files(config: &EmbeddingConfig, ctx: &BuildContext) -> Result<Arc<StaticModel>, ConfigError> {
    shared_model(&config.weights, &config.tokenizer, || {
        let weights = ctx
            .read_file(&config.weights)
            .map_err(|err| ModelError::Weights(format!("cannot read: {err}")))?;
        let tokenizer = ctx
            .read_file(&config.tokenizer)
            .map_err(|err| ModelError::Tokenizer(format!("cannot read: {err}")))?;
        StaticModel::load(&weights, &tokenizer)
    })
    .map_err(|err| match err {
        ModelError::Weights(message) => ConfigError::new("embedding.weights", message),
        ModelError::Tokenizer(message) => ConfigError::new("embedding.tokenizer", message),
        ModelError::Mismatch(message) => ConfigError::new("embedding", message),
    })
}

impl<T: Send + Sync> ModelSource<T> {
    /// Reads the files now, or (with `cluster`) declares the fetch that background work runs.
    /// The counters `model_loaded` and `model_fetch_failed` count fetches.
    pub fn build(config: &EmbeddingConfig, ctx: &mut BuildContext, prepare: Prepare<T>) -> Result<Self, ConfigError> {
        let loaded = OnceLock::new();
        let fetch = match &config.cluster {
            None => {
                let model = load_files(config, ctx)?;
                log::info!(
                    "processor {}: embedding model {} ({:.1} MB table, shared by every processor naming these files)",
                    ctx.processor_name(),
                    config.weights,
                    model.table_bytes() as f64 / 1e6
                );
                let ready = prepare(model).map_err(|(path, message)| ConfigError::new(path, message))?;
                let _ = loaded.set(ready);
                None
            }
            Some(cluster) => {
                if cluster.trim().is_empty() {
                    return Err(ConfigError::new("embedding.cluster", "must not be empty"));
                }
                Some(Fetch {
                    cluster: cluster.clone(),
                    authority: config.authority.clone().unwrap_or_else(|| cluster.clone()),
                    weights: config.weights.clone(),
                    tokenizer: config.tokenizer.clone(),
                    timeout: config.fetch_timeout.unwrap_or(Duration::from_secs(30)),
                    state: Mutex::new(FetchState::default()),
                    loaded: ctx.counter("model_loaded"),
                    failed: ctx.counter("model_fetch_failed"),
                })
            }
        };
        Ok(Self {
            processor: ctx.processor_name().to_string(),
            loaded,
            prepare,
            fetch,
        })
    }

    /// The model's prepared form, once loaded.
    pub fn get(&self) -> Option<&T> {
        self.loaded.get()
    }

    /// The error for a request that needs the model before it is there.
    pub fn not_loaded(&self) -> PluginError {
        PluginError {
            status: Some(503),
            code: "model_loading".into(),
            message: format!("processor {}: the embedding model is not loaded yet", self.processor),
        }
    }

    /// The background work that fetches the model, when it comes through a cluster.
    pub fn background(&self) -> Option<&dyn Background> {
        self.fetch.as_ref().map(|_| self as &dyn Background)
    }

    /// Logs why, counts it, and tries again a little later: requests meanwhile get 503
    /// `model_loading` (or pass under FailOpen), never wait.
    fn fetch_failed(&self, ctx: &mut BackgroundContext<'_>, now: u64, reason: &str) {
        let Some(fetch) = &self.fetch else { return };
        log::error!("processor {}: {reason}; retrying in 2s", self.processor);
        ctx.increment(fetch.failed);
        let mut state = fetch.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *state = FetchState {
            next_try: now.saturating_add(2_000_000_000),
            ..FetchState::default()
        };
    }
}

impl<T: Send + Sync> Background for ModelSource<T> {
    fn tick_interval(&self) -> Duration {
        Duration::from_millis(200)
    }

    fn on_tick(&self, ctx: &mut BackgroundContext<'_>) {
        let Some(fetch) = &self.fetch else { return };
        if self.loaded.get().is_some() {
            return;
        }
        let now = ctx.now_nanos();
        let timeout = u64::try_from(fetch.timeout.as_nanos()).unwrap_or(u64::MAX);
        {
            let mut state = fetch.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            // A fetch in flight blocks the next, unless the proxy lost it.
            let busy = state
                .started
                .is_some_and(|started| now.saturating_sub(started) < timeout.saturating_mul(2));
            if busy || now < state.next_try {
                return;
            }
            // Another processor (or configuration) already fetched the same files: share its table.
            let (weights_key, tokenizer_key) = fetch.keys();
            if let Some(model) = loaded_model(&weights_key, &tokenizer_key) {
                drop(state);
                return self.loaded(ctx, now, Ok(model));
            }
            *state = FetchState {
                started: Some(now),
                ..FetchState::default()
            };
        }
        for (path, tag) in [(&fetch.weights, WEIGHTS), (&fetch.tokenizer, TOKENIZER)] {
            let request = CalloutRequest {
                cluster: fetch.cluster.clone(),
                method: "GET".into(),
                path: path.clone(),
                authority: fetch.authority.clone(),
                headers: Vec::new(),
                body: Vec::new(),
                timeout: fetch.timeout,
            };
            if let Err(err) = ctx.send(&request, tag) {
                self.fetch_failed(
                    ctx,
                    now,
                    &format!("cannot fetch {path} from cluster {}: {err}", fetch.cluster),
                );
                return;
            }
        }
    }

    fn on_callout_done(
        &self,
        ctx: &mut BackgroundContext<'_>,
        tag: u64,
        result: Result<CalloutResponse, CalloutError>,
    ) {
        let Some(fetch) = &self.fetch else { return };
        let now = ctx.now_nanos();
        let path = if tag == WEIGHTS {
            &fetch.weights
        } else {
            &fetch.tokenizer
        };
        let body = match result {
            Ok(response) if response.status == 200 => response.body,
            Ok(response) => {
                let reason = format!("GET {path} from cluster {} answered {}", fetch.cluster, response.status);
                return self.fetch_failed(ctx, now, &reason);
            }
            Err(err) => {
                let reason = format!("GET {path} from cluster {} failed: {err}", fetch.cluster);
                return self.fetch_failed(ctx, now, &reason);
            }
        };
        let files = {
            let mut state = fetch.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if state.started.is_none() {
                return; // a failed attempt's late answer
            }
            if tag == WEIGHTS {
                state.weights = Some(body);
            } else {
                state.tokenizer = Some(body);
            }
            match (&state.weights, &state.tokenizer) {
                (Some(_), Some(_)) => {
                    state.started = None;
                    Some((
                        state.weights.take().unwrap_or_default(),
                        state.tokenizer.take().unwrap_or_default(),
                    ))
                }
                _ => None,
            }
        };
        let Some((weights, tokenizer)) = files else { return };
        // One table per process for the same files, whoever fetched them first.
        let (weights_key, tokenizer_key) = fetch.keys();
        let model = shared_model(&weights_key, &tokenizer_key, || StaticModel::load(&weights, &tokenizer))
            .map_err(|err| format!("{err:?}"));
        self.loaded(ctx, now, model);
    }
}

impl Fetch {
    /// The keys of the fetched files among the process's models (apart from file paths).
    fn keys(&self) -> (String, String) {
        (
            format!("cluster {}: {}", self.cluster, self.weights),
            format!("cluster {}: {}", self.cluster, self.tokenizer),
        )
    }
}

impl<T: Send + Sync> ModelSource<T> {
    /// Prepares what the plugin needs from a fetched model, or counts the failure and retries.
    fn loaded(&self, ctx: &mut BackgroundContext<'_>, now: u64, model: Result<Arc<StaticModel>, String>) {
        let Some(fetch) = &self.fetch else { return };
        let prepared = model.and_then(|model| {
            let table_mb = model.table_bytes() as f64 / 1e6;
            (self.prepare)(model)
                .map(|ready| (ready, table_mb))
                .map_err(|(path, message)| format!("{path}: {message}"))
        });
        match prepared {
            Ok((ready, table_mb)) => {
                log::info!(
                    "processor {}: embedding model loaded from cluster {} ({table_mb:.1} MB table)",
                    self.processor,
                    fetch.cluster,
                );
                let _ = self.loaded.set(ready);
                ctx.increment(fetch.loaded);
            }
            Err(reason) => self.fetch_failed(ctx, now, &format!("the fetched model does not load: {reason}")),
        }
    }
}

impl<T> std::fmt::Debug for ModelSource<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSource")
            .field("processor", &self.processor)
            .field("loaded", &self.loaded.get().is_some())
            .field("fetch", &self.fetch.as_ref().map(|fetch| &fetch.cluster))
            .finish()
    }
}
