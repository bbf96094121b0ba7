//! `semantic-router`: routes a request by the meaning of its prompt. The prompt is embedded with
//! a static embedding model (`crate::embedding`), compared with each route's example groups, and
//! the best route above its threshold rewrites `model` and the routing header.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/semantic-router.md`.

use crate::common::validate_header_name;
use crate::embedding::{
    cosine, normalize, request_embedding, request_text, EmbeddingConfig, ModelSource, StaticModel, TextSource,
};
use payload_processor_core::{
    Background, BuildContext, ConfigError, Context, Counter, Decision, FieldPath, PhaseNeed, Plugin, PluginError,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

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

/// The plugin.
#[derive(Debug)]
pub struct SemanticRouter {
    source: ModelSource<Loaded>,
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
    let source = ModelSource::build(
        &config.embedding,
        ctx,
        Box::new(move |model| {
            let routes = centroids(&model, &specs)?;
            Ok(Loaded { model, routes })
        }),
    )?;
    Ok(Arc::new(SemanticRouter {
        source,
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

impl SemanticRouter {
    /// The best route and its score, or None below every threshold; the best score either way.
    fn classify<'a>(&self, ctx: &mut Context<'_>, loaded: &'a Loaded, text: &str) -> (Option<&'a Route>, f32) {
        let query = request_embedding(ctx, &loaded.model, text);
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
        self.source.background()
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
        let Some(loaded) = self.source.get() else {
            return Err(self.source.not_loaded());
        };
        let (route, score) = match text.as_deref().filter(|t| !t.trim().is_empty()) {
            Some(text) => self.classify(ctx, loaded, text),
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
