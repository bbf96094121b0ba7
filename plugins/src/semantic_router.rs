//! `semantic-router`: routes a request by the meaning of its prompt. The prompt is embedded with
//! a static embedding model (`crate::embedding`), compared with each route's example groups, and
//! the best route above its threshold rewrites `model` and the routing header.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/semantic-router.md`.

use crate::common::validate_header_name;
use crate::embedding::{cosine, normalize, shared_model, ModelError, StaticModel};
use payload_processor_core::{Background, BackgroundContext, CalloutError, CalloutRequest, CalloutResponse};
use payload_processor_core::{
    BuildContext, ConfigError, Context, Counter, Decision, FieldPath, PhaseNeed, Plugin, PluginError,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Registry key.
pub const TYPE_NAME: &str = "semantic-router";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "SemanticRouterParameters")]
pub struct Config {
    /// The static embedding model.
    pub embedding: EmbeddingConfig,
    /// The routes, each with its example utterances.
    pub routes: Vec<RouteConfig>,
    /// Where requests below every route's threshold go.
    pub default_model: String,
    /// Similarity a route needs when it sets no threshold of its own (default 0.5).
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// Only requests asking for one of these models are routed (default `["auto"]`).
    #[serde(default = "default_triggers")]
    pub trigger_models: Vec<String>,
    /// Response-independent report of the chosen route, on the request (default `x-semantic-route`).
    #[serde(default = "default_route_header")]
    pub route_header: String,
    /// The routing header set to the chosen model (default `X-Gateway-Model-Name`).
    #[serde(default = "default_model_header")]
    pub header_name: String,
    /// What is embedded (default `LastUserMessage`).
    #[serde(default)]
    pub text: TextSource,
    /// Dynamic metadata namespace for `route` and `score`.
    #[serde(default = "default_namespace")]
    pub metadata_namespace: String,
}

/// Where the model's files are: files the `.so` reads at config load, or, with `cluster`,
/// paths fetched with GET through that Envoy cluster after the configuration loaded (both
/// forms; the only way for the `.wasm`, which has no file system).
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
    pub fetch_timeout: Option<std::time::Duration>,
}

/// One route.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfig {
    /// Name, in the route header, stats and metadata.
    pub name: String,
    /// The model requests of this route go to.
    pub model: String,
    /// Example utterances: a list (one group), or a list of lists (several groups, each its own
    /// centroid; the route scores as its best group).
    pub utterances: Utterances,
    /// Similarity this route needs (default the plugin's `threshold`).
    pub threshold: Option<f32>,
}

/// One group of utterances, or several.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Utterances {
    /// Several groups.
    Groups(Vec<Vec<String>>),
    /// One group.
    One(Vec<String>),
}

payload_processor_core::config_enum! {
    /// What text is embedded.
    #[derive(Default)]
    pub enum TextSource {
        #[default]
        /// The last user message (chat `messages`, Anthropic `messages`, responses `input`,
        /// completions `prompt`).
        LastUserMessage = "LastUserMessage",
        /// Every user and system text of the conversation, joined.
        Conversation = "Conversation",
    }
}

fn default_threshold() -> f32 {
    0.5
}
fn default_triggers() -> Vec<String> {
    vec!["auto".into()]
}
fn default_route_header() -> String {
    "x-semantic-route".into()
}
fn default_model_header() -> String {
    "X-Gateway-Model-Name".into()
}
fn default_namespace() -> String {
    "envoy.payload_processor.semantic_router".into()
}

/// A route with its group centroids (unit length).
#[derive(Debug)]
struct Route {
    name: String,
    model: String,
    threshold: f32,
    centroids: Vec<Vec<f32>>,
    routed: Counter,
}

/// A route before the model is there: its example groups.
#[derive(Debug)]
struct RouteSpec {
    name: String,
    model: String,
    threshold: f32,
    groups: Vec<Vec<String>>,
    routed: Counter,
}

/// The model and the routes' centroids computed with it.
#[derive(Debug)]
struct Loaded {
    model: Arc<StaticModel>,
    routes: Vec<Route>,
}

/// Fetching the model through a cluster.
#[derive(Debug)]
struct Fetch {
    cluster: String,
    authority: String,
    weights: String,
    tokenizer: String,
    timeout: std::time::Duration,
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

/// The plugin.
#[derive(Debug)]
pub struct SemanticRouter {
    name: String,
    loaded: OnceLock<Loaded>,
    specs: Vec<RouteSpec>,
    fetch: Option<Fetch>,
    default_model: String,
    triggers: Vec<String>,
    route_header: String,
    header_name: String,
    text: TextSource,
    namespace: String,
    model_field: FieldPath,
    defaulted: Counter,
    not_triggered: Counter,
    no_text: Counter,
}

/// Loads the model named by `config` once per process (shared with every other processor and
/// configuration naming the same files); errors carry the parameter path.
pub(crate) fn load_model(config: &EmbeddingConfig, ctx: &BuildContext) -> Result<Arc<StaticModel>, ConfigError> {
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

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    validate_header_name(&config.route_header, "routeHeader")?;
    validate_header_name(&config.header_name, "headerName")?;
    if config.routes.is_empty() {
        return Err(ConfigError::new("routes", "at least one route is needed"));
    }
    if config.default_model.trim().is_empty() {
        return Err(ConfigError::new("defaultModel", "must not be empty"));
    }
    if !(-1.0..=1.0).contains(&config.threshold) {
        return Err(ConfigError::new("threshold", "a cosine similarity between -1 and 1"));
    }
    let mut specs = Vec::with_capacity(config.routes.len());
    for (i, route) in config.routes.iter().enumerate() {
        let at = |field: &str| format!("routes[{i}].{field}");
        if specs.iter().any(|r: &RouteSpec| r.name == route.name) {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate route name {:?}", route.name),
            ));
        }
        if let Some(threshold) = route.threshold {
            if !(-1.0..=1.0).contains(&threshold) {
                return Err(ConfigError::new(
                    at("threshold"),
                    "a cosine similarity between -1 and 1",
                ));
            }
        }
        let groups: Vec<Vec<String>> = match &route.utterances {
            Utterances::One(group) => vec![group.clone()],
            Utterances::Groups(groups) => groups.clone(),
        };
        if let Some(g) = groups.iter().position(Vec::is_empty) {
            return Err(ConfigError::new(at(&format!("utterances[{g}]")), "an empty group"));
        }
        specs.push(RouteSpec {
            name: route.name.clone(),
            model: route.model.clone(),
            threshold: route.threshold.unwrap_or(config.threshold),
            groups,
            routed: ctx.counter(&format!("route.{}", route.name)),
        });
    }
    let loaded = OnceLock::new();
    let fetch = match &config.embedding.cluster {
        None => {
            let model = load_model(&config.embedding, ctx)?;
            let routes = centroids(&model, &specs).map_err(|(path, message)| ConfigError::new(path, message))?;
            let _ = loaded.set(Loaded { model, routes });
            None
        }
        Some(cluster) => {
            if cluster.trim().is_empty() {
                return Err(ConfigError::new("embedding.cluster", "must not be empty"));
            }
            Some(Fetch {
                cluster: cluster.clone(),
                authority: config.embedding.authority.clone().unwrap_or_else(|| cluster.clone()),
                weights: config.embedding.weights.clone(),
                tokenizer: config.embedding.tokenizer.clone(),
                timeout: config.embedding.fetch_timeout.unwrap_or(Duration::from_secs(30)),
                state: Mutex::new(FetchState::default()),
                loaded: ctx.counter("model_loaded"),
                failed: ctx.counter("model_fetch_failed"),
            })
        }
    };
    Ok(Arc::new(SemanticRouter {
        name: ctx.processor_name().to_string(),
        loaded,
        specs,
        fetch,
        default_model: config.default_model,
        triggers: config.trigger_models,
        route_header: config.route_header.to_ascii_lowercase(),
        header_name: config.header_name.to_ascii_lowercase(),
        text: config.text,
        namespace: config.metadata_namespace,
        model_field: FieldPath::Members(vec!["model".into()]),
        defaulted: ctx.counter("route.default"),
        not_triggered: ctx.counter("not_triggered"),
        no_text: ctx.counter("no_text"),
    }))
}

/// Each route's group centroids: the mean of the unit-length utterance vectors, itself made
/// unit length. Errors name the parameter.
fn centroids(model: &StaticModel, specs: &[RouteSpec]) -> Result<Vec<Route>, (String, String)> {
    let mut routes = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let mut centroids = Vec::with_capacity(spec.groups.len());
        for (g, group) in spec.groups.iter().enumerate() {
            let mut centroid = vec![0f32; model.dim()];
            for utterance in group {
                let mut v = model.embed(utterance);
                normalize(&mut v);
                centroid.iter_mut().zip(&v).for_each(|(c, x)| *c += x);
            }
            normalize(&mut centroid);
            if centroid.iter().all(|x| *x == 0.0) {
                return Err((
                    format!("routes[{i}].utterances[{g}]"),
                    "no utterance has a token the model knows".into(),
                ));
            }
            centroids.push(centroid);
        }
        routes.push(Route {
            name: spec.name.clone(),
            model: spec.model.clone(),
            threshold: spec.threshold,
            centroids,
            routed: spec.routed,
        });
    }
    Ok(routes)
}

/// The text of a message's `content`: a string, or the text parts of a list.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str).or_else(|| part.as_str()))
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

/// The text to embed from a request document of the known API shapes.
fn request_text(doc: &Value, source: TextSource) -> Option<String> {
    let messages = doc
        .get("messages")
        .or_else(|| doc.get("input").filter(|input| input.is_array()))
        .and_then(Value::as_array);
    if let Some(messages) = messages {
        let role = |m: &Value| m.get("role").and_then(Value::as_str).unwrap_or("user").to_string();
        return match source {
            TextSource::LastUserMessage => messages
                .iter()
                .rev()
                .find(|m| role(m) == "user")
                .and_then(|m| m.get("content").and_then(content_text)),
            TextSource::Conversation => {
                let mut texts: Vec<String> = doc.get("system").and_then(content_text).into_iter().collect();
                texts.extend(
                    messages
                        .iter()
                        .filter(|m| matches!(role(m).as_str(), "user" | "system" | "developer"))
                        .filter_map(|m| m.get("content").and_then(content_text)),
                );
                (!texts.is_empty()).then(|| texts.join("\n"))
            }
        };
    }
    doc.get("input")
        .or_else(|| doc.get("prompt"))
        .and_then(|v| content_text(v).or_else(|| v.as_array()?.first().and_then(content_text)))
}

impl SemanticRouter {
    /// The best route and its score, or None below every threshold; the best score either way.
    fn classify<'a>(&self, loaded: &'a Loaded, text: &str) -> (Option<&'a Route>, f32) {
        let mut query = loaded.model.embed(text);
        normalize(&mut query);
        let mut best: Option<(&Route, f32)> = None;
        let mut best_score = f32::MIN;
        for route in &loaded.routes {
            let score = route
                .centroids
                .iter()
                .map(|c| cosine(&query, c))
                .fold(f32::MIN, f32::max);
            best_score = best_score.max(score);
            if score >= route.threshold && best.map_or(true, |(_, s)| score > s) {
                best = Some((route, score));
            }
        }
        (best.map(|(route, _)| route), best.map_or(best_score, |(_, s)| s))
    }
}

impl Plugin for SemanticRouter {
    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn background(&self) -> Option<&dyn Background> {
        self.fetch.as_ref().map(|_| self as &dyn Background)
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        // The route header is the gateway's: never the client's.
        ctx.remove_header(&self.route_header);
        let doc = ctx
            .body()
            .doc()
            .map_err(|err| PluginError::bad_request("invalid_json", err.to_string()))?;
        let asked = doc.get("model").and_then(Value::as_str).unwrap_or_default().to_string();
        if !self.triggers.contains(&asked) {
            // Not ours to choose: the routing header still carries the model asked for, so
            // the chain needs no separate body-field-to-header for these requests.
            ctx.increment(self.not_triggered);
            if !asked.is_empty() {
                ctx.set_header(&self.header_name, &asked)?;
            }
            return Ok(Decision::Continue);
        }
        let text = request_text(doc, self.text);
        let Some(loaded) = self.loaded.get() else {
            return Err(PluginError {
                status: Some(503),
                code: "model_loading".into(),
                message: format!("processor {}: the embedding model is not loaded yet", self.name),
            });
        };
        let (route, score) = match text.as_deref().filter(|t| !t.trim().is_empty()) {
            Some(text) => self.classify(loaded, text),
            None => {
                ctx.increment(self.no_text);
                (None, 0.0)
            }
        };
        let (name, model) = match route {
            Some(route) => {
                ctx.increment(route.routed);
                (route.name.as_str(), route.model.as_str())
            }
            None => {
                ctx.increment(self.defaulted);
                ("default", self.default_model.as_str())
            }
        };
        ctx.body()
            .set(&self.model_field, Value::String(model.to_string()))
            .map_err(|err| PluginError::bad_request("invalid_json", err.to_string()))?;
        ctx.set_header(&self.header_name, model)?;
        ctx.set_header(&self.route_header, name)?;
        ctx.set_metadata(&self.namespace, "route", name);
        ctx.set_metadata_number(&self.namespace, "score", f64::from(score));
        Ok(Decision::Continue)
    }
}

/// Callout tags of the two files.
const WEIGHTS: u64 = 0;
const TOKENIZER: u64 = 1;

impl Background for SemanticRouter {
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
        let loaded = StaticModel::load(&weights, &tokenizer)
            .map_err(|err| format!("{err:?}"))
            .and_then(|model| {
                let routes = centroids(&model, &self.specs).map_err(|(path, message)| format!("{path}: {message}"))?;
                Ok(Loaded {
                    model: Arc::new(model),
                    routes,
                })
            });
        match loaded {
            Ok(loaded) => {
                log::info!(
                    "semantic-router {}: model loaded from cluster {} ({:.1} MB table)",
                    self.name,
                    fetch.cluster,
                    loaded.model.table_bytes() as f64 / 1e6
                );
                let _ = self.loaded.set(loaded);
                ctx.increment(fetch.loaded);
            }
            Err(reason) => self.fetch_failed(ctx, now, &format!("the fetched model does not load: {reason}")),
        }
    }
}

impl SemanticRouter {
    /// Logs why, counts it, and tries again a little later: requests meanwhile get 503
    /// `model_loading` (or pass unrouted under FailOpen), never wait.
    fn fetch_failed(&self, ctx: &mut BackgroundContext<'_>, now: u64, reason: &str) {
        let Some(fetch) = &self.fetch else { return };
        log::error!("semantic-router {}: {reason}; retrying in 2s", self.name);
        ctx.increment(fetch.failed);
        let mut state = fetch.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *state = FetchState {
            next_try: now.saturating_add(2_000_000_000),
            ..FetchState::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use crate::embedding::tests::model_files;
    use crate::testing::run_request;
    use payload_processor_core::{Chain, Direction};
    use serde_json::json;

    fn chain(extra: &str) -> String {
        let (weights, tokenizer) = model_files();
        format!(
            "processors: [{{name: router, type: semantic-router, parameters: {{embedding: {{weights: '{weights}', \
             tokenizer: '{tokenizer}'}}, defaultModel: general, threshold: 0.9, routes: [\
             {{name: alpha, model: alpha-model, utterances: [a, aa]}}, \
             {{name: gamma, model: gamma-model, utterances: [[c], [cc c]]}}]{extra}}}}}]"
        )
    }

    fn ask(chain_text: &str, model: &str, content: &str) -> (Option<String>, Option<String>, serde_json::Value) {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "ignored"},
                          {"role": "assistant", "content": "c c c"}, {"role": "user", "content": content}]});
        let (host, _) = run_request(chain_text, &[("x-semantic-route", "spoofed")], &body);
        let header = |name: &str| host.header_values(Direction::Request, name).pop();
        (
            header("x-semantic-route"),
            header("x-gateway-model-name"),
            host.request_json(),
        )
    }

    #[test]
    fn routes_the_last_user_message_by_its_best_group() {
        let text = chain("");
        let (route, model, body) = ask(&text, "auto", "a a a");
        assert_eq!(
            (route.as_deref(), model.as_deref()),
            (Some("alpha"), Some("alpha-model"))
        );
        assert_eq!(body["model"], "alpha-model");
        let (route, _, body) = ask(&text, "auto", "c");
        assert_eq!(route.as_deref(), Some("gamma"));
        assert_eq!(body["model"], "gamma-model");
        // Below every threshold (a and c mixed): the default, and the client's header replaced.
        let (route, model, body) = ask(&text, "auto", "a c");
        assert_eq!((route.as_deref(), model.as_deref()), (Some("default"), Some("general")));
        assert_eq!(body["model"], "general");
    }

    #[test]
    fn other_models_pass_with_their_routing_header() {
        let (route, model, body) = ask(&chain(""), "gpt-4o", "a a");
        assert_eq!(route, None, "the spoofed route header is removed");
        assert_eq!(model.as_deref(), Some("gpt-4o"));
        assert_eq!(body["model"], "gpt-4o");
    }

    #[test]
    fn bad_parameters_are_refused_with_paths() {
        let registry = crate::builtin_registry();
        for (extra, expected) in [
            (
                ", threshold: 2",
                "processors[0].parameters.threshold: a cosine similarity between -1 and 1",
            ),
            (", headerName: 'bad header'", "processors[0].parameters.headerName"),
        ] {
            let err = Chain::load(&chain(extra), &registry).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err}");
        }
        let missing =
            "processors: [{name: r, type: semantic-router, parameters: {embedding: {weights: /nonexistent/w, \
                       tokenizer: /nonexistent/t}, defaultModel: d, routes: [{name: x, model: y, utterances: [z]}]}}]";
        model_files();
        let err = Chain::load(missing, &registry).unwrap_err().to_string();
        assert!(
            err.starts_with("processors[0].parameters.embedding.weights: cannot read"),
            "{err}"
        );
    }
}
