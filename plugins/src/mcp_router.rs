//! `mcp-router`: reads MCP JSON-RPC requests over HTTP and sets routing headers from the
//! method, the tool name (`params.name` of `tools/call`) and the `Mcp-Session-Id`, so Envoy
//! routes can send each tool to its own server; optional allow/deny lists answer refused
//! calls with a JSON-RPC error carrying the request's `id`.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/mcp-router.md`.

use crate::common::validate_header_name;
use payload_processor_core::{
    BuildContext, ConfigError, Context, Counter, Decision, LocalReply, PhaseNeed, Plugin, PluginError, RequestEdits,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "mcp-router";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "McpRouterParameters")]
pub struct Config {
    /// Header for the JSON-RPC method.
    #[serde(default = "method_header")]
    pub method_header: String,
    /// Header for the tool name of `tools/call`.
    #[serde(default = "tool_header")]
    pub tool_header: String,
    /// Header the session id is copied into.
    #[serde(default = "session_header")]
    pub session_header: String,
    /// Only these tools may be called.
    #[serde(default)]
    pub allow_tools: Option<Vec<String>>,
    /// These tools may not be called.
    #[serde(default)]
    pub deny_tools: Vec<String>,
    /// Only these methods may be used.
    #[serde(default)]
    pub allow_methods: Option<Vec<String>>,
    /// These methods may not be used.
    #[serde(default)]
    pub deny_methods: Vec<String>,
}

fn method_header() -> String {
    "x-mcp-method".into()
}
fn tool_header() -> String {
    "x-mcp-tool".into()
}
fn session_header() -> String {
    "x-mcp-session".into()
}

/// The plugin.
#[derive(Debug)]
pub struct McpRouter {
    config: Config,
    routed: Counter,
    denied: Counter,
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let mut config: Config = ctx.parameters(parameters)?;
    for (name, at) in [
        (&mut config.method_header, "methodHeader"),
        (&mut config.tool_header, "toolHeader"),
        (&mut config.session_header, "sessionHeader"),
    ] {
        validate_header_name(name, at)?;
        *name = name.to_ascii_lowercase();
    }
    for (list, at) in [
        (config.allow_tools.as_deref(), "allowTools"),
        (Some(config.deny_tools.as_slice()), "denyTools"),
        (config.allow_methods.as_deref(), "allowMethods"),
        (Some(config.deny_methods.as_slice()), "denyMethods"),
    ] {
        if let Some(index) = list.and_then(|l| l.iter().position(String::is_empty)) {
            return Err(ConfigError::new(format!("{at}[{index}]"), "must not be empty"));
        }
    }
    Ok(Arc::new(McpRouter {
        config,
        routed: ctx.counter("routed"),
        denied: ctx.counter("denied"),
    }))
}

fn rpc_error(status: u16, id: Value, code: i64, message: &str) -> Decision {
    let body = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
    Decision::Reject(LocalReply {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    })
}

fn listed(list: &[String], name: &str) -> bool {
    list.iter().any(|entry| entry == name)
}

impl McpRouter {
    /// Why a call is refused, if it is.
    fn refusal(&self, method: &str, tool: Option<&str>) -> Option<String> {
        let c = &self.config;
        if listed(&c.deny_methods, method) || c.allow_methods.as_ref().is_some_and(|a| !listed(a, method)) {
            return Some(format!("method {method} is not allowed"));
        }
        let tool = tool?;
        if listed(&c.deny_tools, tool) || c.allow_tools.as_ref().is_some_and(|a| !listed(a, tool)) {
            return Some(format!("tool {tool} is not allowed"));
        }
        None
    }
}

impl Plugin for McpRouter {
    fn request_edits(&self) -> RequestEdits {
        RequestEdits::HEADERS
    }

    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        // Gateway-owned headers: never let a client choose its own route.
        for header in [
            &self.config.method_header,
            &self.config.tool_header,
            &self.config.session_header,
        ] {
            ctx.remove_header(header);
        }
        if let Some(session) = ctx.header("mcp-session-id") {
            ctx.set_header(&self.config.session_header, &session)?;
        }
        if ctx.body().is_blank() {
            return Ok(Decision::Continue); // GET (the server-to-client stream) or DELETE
        }
        let calls: Vec<Value> = match ctx.body().doc() {
            Ok(Value::Array(batch)) => batch.clone(),
            Ok(call @ Value::Object(_)) => vec![call.clone()],
            Ok(_) => return Ok(rpc_error(400, Value::Null, -32600, "not a JSON-RPC request")),
            Err(_) => return Ok(rpc_error(400, Value::Null, -32700, "parse error")),
        };
        let mut first = None;
        for call in &calls {
            let Some(method) = call.get("method").and_then(Value::as_str) else {
                continue; // a response or notification result sent by the client
            };
            let tool = (method == "tools/call")
                .then(|| call.pointer("/params/name").and_then(Value::as_str))
                .flatten();
            if let Some(reason) = self.refusal(method, tool) {
                ctx.increment(self.denied);
                let id = call.get("id").cloned().unwrap_or(Value::Null);
                return Ok(rpc_error(200, id, -32601, &reason));
            }
            first.get_or_insert((method.to_string(), tool.map(str::to_string)));
        }
        if let Some((method, tool)) = first {
            ctx.set_header(&self.config.method_header, &method)?;
            if let Some(tool) = tool {
                ctx.set_header(&self.config.tool_header, &tool)?;
            }
            ctx.increment(self.routed);
        }
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::run_request_at;
    use payload_processor_core::Direction;
    use serde_json::json;

    const CHAIN: &str = "processors: [{name: mcp, type: mcp-router, parameters: {denyTools: [rm_rf], denyMethods: [sampling/createMessage]}}]";

    fn route(body: serde_json::Value, headers: &[(&str, &str)]) -> payload_processor_core::testing::FakeHost {
        run_request_at("/mcp", CHAIN, headers, &serde_json::to_vec(&body).unwrap()).0
    }

    #[test]
    fn headers_come_from_method_tool_and_session() {
        let host = route(
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "search", "arguments": {}}}),
            &[("mcp-session-id", "s-1"), ("x-mcp-tool", "spoofed")],
        );
        let header = |name| host.header_values(Direction::Request, name);
        assert_eq!(header("x-mcp-method"), ["tools/call"]);
        assert_eq!(header("x-mcp-tool"), ["search"]);
        assert_eq!(header("x-mcp-session"), ["s-1"]);
        let host = route(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            &[("x-mcp-tool", "spoofed")],
        );
        assert!(
            host.header_values(Direction::Request, "x-mcp-tool").is_empty(),
            "client value removed"
        );
    }

    #[test]
    fn denied_calls_get_json_rpc_errors_with_their_id() {
        let host = route(
            json!({"jsonrpc": "2.0", "id": "a7", "method": "tools/call", "params": {"name": "rm_rf"}}),
            &[],
        );
        let reply = host.reply.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.json(),
            json!({"jsonrpc": "2.0", "id": "a7", "error": {"code": -32601, "message": "tool rm_rf is not allowed"}})
        );
        let host = route(
            json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "sampling/createMessage"}]),
            &[],
        );
        assert_eq!(host.reply.unwrap().json()["id"], 2);
        let (host, _) = run_request_at("/mcp", CHAIN, &[], b"{oops");
        let reply = host.reply.unwrap();
        assert_eq!(
            (reply.status, reply.json()["error"]["code"].as_i64()),
            (400, Some(-32700))
        );
    }

    #[test]
    fn bad_configs_are_refused_with_paths() {
        for (parameters, expected) in [
            ("{toolHeader: 'a b'}", "processors[0].parameters.toolHeader:"),
            ("{denyTools: ['']}", "processors[0].parameters.denyTools[0]:"),
            ("{allowTools: x}", "processors[0].parameters.allowTools:"),
        ] {
            let yaml = format!("processors: [{{name: m, type: mcp-router, parameters: {parameters}}}]");
            let err = payload_processor_core::Chain::load(&yaml, &crate::builtin_registry())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{parameters}: {err}");
        }
    }
}
