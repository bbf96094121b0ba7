//! The callout family through the engine, against fake services.

use payload_processor_core::testing::{
    json_answer, run_request_with_callouts, run_response_with_callouts, FakeHost, PhaseEnd,
};
use payload_processor_core::{CalloutRequest, CalloutResponse, Chain, Direction, Host, Stream};
use serde_json::{json, Value};
use std::sync::Arc;

fn chain(yaml: &str) -> Arc<Chain> {
    Arc::new(Chain::load(yaml, &crate::builtin_registry()).expect("test chain loads"))
}

fn chat(messages: Value) -> FakeHost {
    let body = serde_json::to_vec(&json!({"model": "m", "messages": messages})).unwrap();
    FakeHost::request(
        "/v1/chat/completions",
        &[("content-type", "application/json"), ("x-user", "ana")],
        &body,
    )
}

/// A stream of `yaml` whose chat request (one user message, `prompt`) went upstream without a
/// callout: ready for its response.
fn past_the_request(yaml: &str, prompt: &str) -> (Stream, FakeHost) {
    let mut stream = Stream::new(chain(yaml));
    let mut host = chat(json!([{"role": "user", "content": prompt}]));
    assert_eq!(
        run_request_with_callouts(&mut stream, &mut host, |_| unreachable!()),
        PhaseEnd::Continued
    );
    (stream, host)
}

/// Runs the request phase; returns the host, what the service received and how it ended.
fn run(
    yaml: &str,
    mut host: FakeHost,
    answer: impl Fn(&CalloutRequest) -> Result<CalloutResponse, String>,
) -> (FakeHost, Vec<CalloutRequest>, PhaseEnd) {
    let mut stream = Stream::new(chain(yaml));
    let mut seen = Vec::new();
    let end = run_request_with_callouts(&mut stream, &mut host, |request| {
        seen.push(request.clone());
        answer(request)
    });
    (host, seen, end)
}

fn sent_json(request: &CalloutRequest) -> Value {
    serde_json::from_slice(&request.body).expect("the call's body is JSON")
}

fn error_message(host: &FakeHost) -> String {
    host.reply.as_ref().unwrap().json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string()
}

const RAG: &str = r#"
processors:
  - name: rag
    type: http-callout
    parameters:
      cluster: retriever
      path: /search
      forwardHeaders: [x-user]
      body: {query: "{{ $.messages[-1].content }}", user: "{{ headers.x-user }}", all: "{{ text }}", k: 2}
      setBodyFields:
        - path: $.messages
          action: Prepend
          value: {role: system, content: "Use these documents:\n{{ $.documents[*].text }}"}
      setHeaders: {x-rag-count: "{{ $.count }}"}
      setMetadata: {sources: "{{ $.documents[*].id }}"}
"#;

#[test]
fn http_callout_builds_the_call_from_templates_and_maps_the_answer() {
    let host = chat(json!([{"role": "user", "content": "hi"}, {"role": "user", "content": "what is \"RAG\"?"}]));
    let (host, seen, end) = run(RAG, host, |_| {
        json_answer(
            200,
            &json!({"count": 2, "documents": [{"id": "d1", "text": "one"}, {"id": "d2", "text": "two"}]}),
        )
    });
    assert_eq!(end, PhaseEnd::Continued);
    let call = &seen[0];
    assert_eq!(
        (call.cluster.as_str(), call.method.as_str(), call.path.as_str()),
        ("retriever", "POST", "/search")
    );
    assert!(call.headers.contains(&("x-user".into(), "ana".into())));
    // Values are inserted as JSON: the quotes in the prompt stay inside the string.
    assert_eq!(
        sent_json(call),
        json!({"query": "what is \"RAG\"?", "user": "ana", "all": "hi\nwhat is \"RAG\"?", "k": 2})
    );
    let body = host.request_json();
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "Use these documents:\none\ntwo"})
    );
    assert_eq!(body["messages"].as_array().unwrap().len(), 3);
    assert_eq!(host.header(Direction::Request, "x-rag-count").as_deref(), Some("2"));
    assert_eq!(
        host.metadata
            .get(&("envoy.payload_processor.callout".into(), "sources".into()))
            .map(String::as_str),
        Some("d1,d2")
    );
}

#[test]
fn http_callout_leaves_the_body_alone_when_nothing_was_retrieved() {
    let host = chat(json!([{"role": "user", "content": "hi"}]));
    let before = host.request_body.clone();
    let (host, _, end) = run(RAG, host, |_| json_answer(200, &json!({"count": 0, "documents": []})));
    assert_eq!(end, PhaseEnd::Continued);
    assert_eq!(host.request_body, before);
}

#[test]
fn http_callout_rejects_when_a_predicate_holds_and_fails_on_bad_answers() {
    let yaml = r#"
processors:
  - name: check
    type: http-callout
    parameters:
      cluster: svc
      path: /check
      rejectWhen: [{path: $.verdict, in: [block, deny]}, {path: $.score, greaterThan: 0.8}]
      reject: {status: 451, code: blocked, message: not here}
"#;
    for (answer, status) in [
        (json!({"verdict": "deny"}), Some(451)),
        (json!({"verdict": "allow", "score": 0.9}), Some(451)),
        (json!({"verdict": "allow", "score": 0.1}), None),
    ] {
        let (host, _, _) = run(yaml, chat(json!([{"role": "user", "content": "x"}])), |_| {
            json_answer(200, &answer)
        });
        assert_eq!(host.reply.as_ref().map(|r| r.status), status, "{answer}");
    }
    // Non-2xx and unreadable answers are failures (fail closed: 503 naming the processor).
    let (host, _, _) = run(yaml, chat(json!([{"role": "user", "content": "x"}])), |_| {
        json_answer(500, &json!({}))
    });
    assert_eq!(host.reply.as_ref().unwrap().status, 503);
    assert!(
        error_message(&host).contains("processor check"),
        "{}",
        error_message(&host)
    );
    let (host, _, _) = run(yaml, chat(json!([{"role": "user", "content": "x"}])), |_| {
        Ok(CalloutResponse {
            status: 200,
            headers: vec![],
            body: b"<html>".to_vec(),
        })
    });
    assert_eq!(host.reply.as_ref().unwrap().status, 503);
    // Fail open: the request goes on, counted.
    let open = yaml.replace("type: http-callout", "type: http-callout\n    failureMode: FailOpen");
    let (host, _, end) = run(&open, chat(json!([{"role": "user", "content": "x"}])), |_| {
        Err("timeout".into())
    });
    assert_eq!(end, PhaseEnd::Continued);
    assert!(host.reply.is_none());
}

#[test]
fn openai_moderation_speaks_the_moderation_api() {
    let yaml = "processors: [{name: mod, type: openai-moderation, parameters: {cluster: moderation, headers: {authorization: Bearer k}}}]";
    let flagged = json!({"id": "modr-1", "model": "omni-moderation-latest", "results": [{
        "flagged": true,
        "categories": {"harassment": true, "violence": false, "self-harm": true},
        "category_scores": {"harassment": 0.91, "violence": 0.01, "self-harm": 0.7}
    }]});
    let (host, seen, end) = run(
        yaml,
        chat(json!([{"role": "user", "content": "you are awful"}])),
        |_| json_answer(200, &flagged),
    );
    assert_eq!(end, PhaseEnd::Stopped);
    assert_eq!(seen[0].path, "/v1/moderations");
    assert!(seen[0].headers.contains(&("authorization".into(), "Bearer k".into())));
    assert_eq!(
        sent_json(&seen[0]),
        json!({"input": "you are awful", "model": "omni-moderation-latest"})
    );
    let reply = host.reply.clone().unwrap();
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "content_flagged");
    assert!(
        error_message(&host).ends_with("(harassment,self-harm)"),
        "{}",
        error_message(&host)
    );
    // Only some categories matter: a flag elsewhere passes.
    let only_violence = yaml.replace("headers:", "categories: [violence], headers:");
    let (host, _, end) = run(&only_violence, chat(json!([{"role": "user", "content": "x"}])), |_| {
        json_answer(200, &flagged)
    });
    assert_eq!(end, PhaseEnd::Continued, "{:?}", host.reply);
    let clean = json!({"results": [{"flagged": false, "categories": {"harassment": false}}]});
    let (_, _, end) = run(yaml, chat(json!([{"role": "user", "content": "hello"}])), |_| {
        json_answer(200, &clean)
    });
    assert_eq!(end, PhaseEnd::Continued);
    // A reply without results is unreadable: a failure.
    let (host, _, _) = run(yaml, chat(json!([{"role": "user", "content": "hello"}])), |_| {
        json_answer(200, &json!({}))
    });
    assert_eq!(host.reply.unwrap().status, 503);
}

#[test]
fn llama_guard_reads_safe_unsafe_and_acts_per_category() {
    let yaml = "processors: [{name: lg, type: llama-guard, parameters: {cluster: guard, model: llama-guard-3, categories: {S9: Report}}}]";
    let says = |content: &'static str| {
        move |_: &CalloutRequest| {
            json_answer(
                200,
                &json!({"choices": [{"message": {"role": "assistant", "content": content}}]}),
            )
        }
    };
    let (host, seen, end) = run(
        yaml,
        chat(json!([{"role": "user", "content": "how to pick a lock"}])),
        says("unsafe\nS2"),
    );
    assert_eq!(end, PhaseEnd::Stopped);
    let call = sent_json(&seen[0]);
    assert_eq!(call["model"], "llama-guard-3");
    assert_eq!(
        call["messages"],
        json!([{"role": "user", "content": "how to pick a lock"}])
    );
    assert_eq!(host.reply.as_ref().unwrap().status, 400);
    assert!(error_message(&host).ends_with("(S2)"));
    let (host, _, end) = run(
        yaml,
        chat(json!([{"role": "user", "content": "x"}])),
        says("unsafe\nS9"),
    );
    assert_eq!(end, PhaseEnd::Continued);
    assert_eq!(
        host.metadata
            .get(&("envoy.payload_processor.callout".into(), "lg.categories".into()))
            .map(String::as_str),
        Some("S9")
    );
    let (_, _, end) = run(yaml, chat(json!([{"role": "user", "content": "x"}])), says("safe"));
    assert_eq!(end, PhaseEnd::Continued);
    let (host, _, _) = run(yaml, chat(json!([{"role": "user", "content": "x"}])), says("maybe?"));
    assert_eq!(host.reply.unwrap().status, 503);
}

#[test]
fn llama_guard_classifies_an_answer_with_its_prompt() {
    let yaml = "processors: [{name: lg, type: llama-guard, parameters: {cluster: guard, model: lg, phase: Response}}]";
    let (mut stream, mut host) = past_the_request(yaml, "tell me");
    host.response_body = serde_json::to_vec(&json!({"choices": [{"message": {"content": "here is how"}}]})).unwrap();
    let mut seen = Vec::new();
    let end = run_response_with_callouts(&mut stream, &mut host, |request| {
        seen.push(sent_json(request));
        json_answer(200, &json!({"choices": [{"message": {"content": "unsafe\nS1"}}]}))
    });
    assert_eq!(end, PhaseEnd::Stopped);
    assert_eq!(
        seen[0]["messages"],
        json!([{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "here is how"}])
    );
    assert_eq!(host.reply.unwrap().status, 400);
}

fn presidio_answer(request: &CalloutRequest) -> Result<CalloutResponse, String> {
    // A tiny stand-in for the analyzer: finds the names it knows, offsets in code points.
    let text = sent_json(request)["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    let mut found = Vec::new();
    for (name, entity) in [("Jörg Müller", "PERSON"), ("ana@example.com", "EMAIL_ADDRESS")] {
        let needle: Vec<char> = name.chars().collect();
        for start in 0..chars.len() {
            if chars[start..].starts_with(&needle) {
                found.push(json!({"entity_type": entity, "start": start, "end": start + needle.len(), "score": 0.85}));
            }
        }
    }
    json_answer(200, &Value::Array(found))
}

#[test]
fn presidio_masks_rejects_or_reports_the_spans_it_returns() {
    let messages = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "Grüße von Jörg Müller"}, {"type": "text", "text": "mail ana@example.com"}]}
    ]);
    let yaml = "processors: [{name: pr, type: presidio, parameters: {cluster: presidio, entities: [PERSON, EMAIL_ADDRESS], scoreThreshold: 0.5}}]";
    let (host, seen, end) = run(yaml, chat(messages.clone()), presidio_answer);
    assert_eq!(end, PhaseEnd::Continued);
    assert_eq!(seen[0].path, "/analyze");
    let sent = sent_json(&seen[0]);
    assert_eq!(sent["language"], "en");
    assert_eq!(sent["entities"], json!(["PERSON", "EMAIL_ADDRESS"]));
    assert_eq!(sent["score_threshold"], 0.5);
    let body = host.request_json();
    assert_eq!(body["messages"][0]["content"], "be brief");
    assert_eq!(body["messages"][1]["content"][0]["text"], "Grüße von [PERSON]");
    assert_eq!(body["messages"][1]["content"][1]["text"], "mail [EMAIL_ADDRESS]");
    let reject = yaml.replace("scoreThreshold: 0.5", "action: Reject");
    let (host, _, end) = run(&reject, chat(messages.clone()), presidio_answer);
    assert_eq!(end, PhaseEnd::Stopped);
    assert_eq!(host.reply.as_ref().unwrap().json()["error"]["code"], "pii_detected");
    assert!(error_message(&host).ends_with("(EMAIL_ADDRESS,PERSON)"));
    let report = yaml.replace("scoreThreshold: 0.5", "action: Report");
    let before = chat(messages.clone()).request_body;
    let (host, _, end) = run(&report, chat(messages), presidio_answer);
    assert_eq!(end, PhaseEnd::Continued);
    assert_eq!(host.request_body, before);
    assert_eq!(
        host.metadata
            .get(&("envoy.payload_processor.guard".into(), "pr.entities".into()))
            .map(String::as_str),
        Some("EMAIL_ADDRESS,PERSON")
    );
}

#[test]
fn ext_authz_body_allows_with_headers_and_passes_denials_through() {
    let yaml = "processors: [{name: authz, type: ext-authz-body, parameters: {cluster: authz, path: /check, bodyFields: [model, $.metadata.tenant]}}]";
    let body = serde_json::to_vec(&json!({"model": "gpt", "metadata": {"tenant": "t1"}, "messages": []})).unwrap();
    let request = || {
        FakeHost::request(
            "/v1/chat/completions",
            &[("authorization", "Bearer u"), ("x-other", "no")],
            &body,
        )
    };
    let allow = |_: &CalloutRequest| {
        Ok(CalloutResponse {
            status: 200,
            headers: vec![
                (":status".into(), "200".into()),
                ("x-user-id".into(), "u-7".into()),
                ("x-envoy-upstream-service-time".into(), "1".into()),
                ("content-length".into(), "0".into()),
            ],
            body: Vec::new(),
        })
    };
    let (host, seen, end) = run(yaml, request(), allow);
    assert_eq!(end, PhaseEnd::Continued);
    let call = &seen[0];
    assert_eq!(
        (call.method.as_str(), call.path.as_str()),
        ("POST", "/check/v1/chat/completions")
    );
    assert!(call.headers.contains(&("authorization".into(), "Bearer u".into())));
    assert!(!call.headers.iter().any(|(name, _)| name == "x-other"));
    assert_eq!(sent_json(call), json!({"model": "gpt", "metadata.tenant": "t1"}));
    assert_eq!(host.header(Direction::Request, "x-user-id").as_deref(), Some("u-7"));
    assert_eq!(host.header(Direction::Request, "x-envoy-upstream-service-time"), None);
    let deny = |_: &CalloutRequest| {
        Ok(CalloutResponse {
            status: 403,
            headers: vec![
                (":status".into(), "403".into()),
                ("content-type".into(), "text/plain".into()),
            ],
            body: b"tenant t1 may not use gpt".to_vec(),
        })
    };
    let (host, _, end) = run(yaml, request(), deny);
    assert_eq!(end, PhaseEnd::Stopped);
    let reply = host.reply.unwrap();
    assert_eq!(
        (reply.status, reply.body.as_slice()),
        (403, &b"tenant t1 may not use gpt"[..])
    );
    assert!(reply.headers.contains(&("content-type".into(), "text/plain".into())));
}

#[test]
fn bad_configurations_are_refused_with_their_path() {
    for (parameters, ty, expected) in [
        (
            "{cluster: s, path: check}",
            "http-callout",
            "processors[0].parameters.path",
        ),
        (
            "{cluster: '', path: /x}",
            "http-callout",
            "processors[0].parameters.cluster",
        ),
        (
            "{cluster: s, path: /x, body: {a: '{{ nope }}'}}",
            "http-callout",
            "processors[0].parameters.body.a",
        ),
        (
            "{cluster: s, path: /x, body: '{{ text'}",
            "http-callout",
            "processors[0].parameters.body",
        ),
        (
            "{cluster: s, path: /x, rejectWhen: {path: '$..x'}}",
            "http-callout",
            "processors[0].parameters.rejectWhen[0].path",
        ),
        (
            "{cluster: s, path: /x, reject: {status: 200}}",
            "http-callout",
            "processors[0].parameters.reject.status",
        ),
        (
            "{cluster: s, path: /x, setHeaders: {'bad header': x}}",
            "http-callout",
            "processors[0].parameters.setHeaders.bad header",
        ),
        (
            "{cluster: s, path: /x, setBodyFields: [{path: '$.a[*]', value: 1}]}",
            "http-callout",
            "processors[0].parameters.setBodyFields[0].path",
        ),
        (
            "{cluster: s, path: /x, headers: {x-k: \"a\\nb\"}}",
            "http-callout",
            "processors[0].parameters.headers.x-k",
        ),
        (
            "{cluster: s, model: m, categories: {X1: Reject}}",
            "llama-guard",
            "processors[0].parameters.categories.X1",
        ),
        ("{cluster: s}", "llama-guard", "processors[0].parameters"),
        (
            "{cluster: s, entities: [person]}",
            "presidio",
            "processors[0].parameters.entities[0]",
        ),
        (
            "{cluster: s, action: Maybe}",
            "presidio",
            "processors[0].parameters.action",
        ),
        (
            "{cluster: s, scoreThreshold: 2}",
            "openai-moderation",
            "processors[0].parameters.scoreThreshold",
        ),
        (
            "{cluster: s, bodyFields: []}",
            "ext-authz-body",
            "processors[0].parameters.bodyFields",
        ),
    ] {
        let yaml = format!("processors: [{{name: c, type: {ty}, parameters: {parameters}}}]");
        let err = Chain::load(&yaml, &crate::builtin_registry())
            .expect_err(&yaml)
            .to_string();
        assert!(err.starts_with(expected), "{yaml}: {err}");
    }
}

fn sse_chunk(word: &str) -> String {
    format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n")
}

/// Streams `chunks` through the response phase, answering every callout with `answer` as
/// soon as it is out (after the chunk that caused it); returns what the client received.
fn stream_through(
    yaml: &str,
    chunks: &[String],
    answer: impl Fn(&CalloutRequest) -> Result<CalloutResponse, String>,
) -> (String, FakeHost) {
    let (mut stream, mut host) = past_the_request(yaml, "tell me");
    host.response_headers.push((":status".into(), "200".into()));
    host.response_headers
        .push(("content-type".into(), "text/event-stream".into()));
    stream.on_response_headers(&mut host, false);
    let mut client = Vec::new();
    let mut answered = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        host.response_body = chunk.clone().into_bytes();
        let flow = stream.on_response_body(&mut host, i + 1 == chunks.len());
        if flow == payload_processor_core::BodyFlow::Continue {
            client.extend_from_slice(&host.response_body);
        }
        while answered < host.callouts.len() && stream.waiting_for_callout().is_some() {
            let (handle, request) = host.callouts[answered].clone();
            answered += 1;
            host.response_body.clear();
            match stream.on_callout_done(&mut host, handle, answer(&request)) {
                payload_processor_core::CalloutFlow::Resume(_) => client.extend_from_slice(&host.response_body),
                payload_processor_core::CalloutFlow::Replied => return (String::new(), host),
                _ => {}
            }
        }
    }
    (String::from_utf8(client).unwrap(), host)
}

#[test]
fn moderation_approves_a_streamed_answer_window_by_window() {
    let yaml = "processors: [{name: mod, type: openai-moderation, parameters: {cluster: m, phase: Response, streamWindowBytes: 12}}]";
    let words = ["The ", "plan ", "is ", "to ", "kill ", "the ", "process ", "now"];
    let chunks: Vec<String> = words
        .iter()
        .map(|w| sse_chunk(w))
        .chain(["data: [DONE]\n\n".to_string()])
        .collect();
    let verdict = |request: &CalloutRequest| {
        let input = sent_json(request)["input"].as_str().unwrap().to_string();
        let flagged = input.contains("kill");
        json_answer(
            200,
            &json!({"results": [{"flagged": flagged, "categories": {"violence": flagged}}]}),
        )
    };
    let (client, host) = stream_through(yaml, &chunks, verdict);
    // The window holding "kill" was refused: its text never went out, the stream ended the
    // way the openai client understands.
    assert!(
        client.starts_with(&[sse_chunk("The "), sse_chunk("plan "), sse_chunk("is ")].concat()),
        "{client}"
    );
    assert!(!client.contains("kill"), "{client}");
    assert!(
        client.contains("content_filter") && client.ends_with("data: [DONE]\n\n"),
        "{client}"
    );
    // Each window was one call; the second carried the end of the first as context.
    let inputs: Vec<String> = host
        .callouts
        .iter()
        .map(|(_, r)| sent_json(r)["input"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(inputs[0], "The plan is ");
    assert!(
        inputs[1].starts_with("The plan is ") && inputs[1].contains("kill"),
        "{inputs:?}"
    );
    // A clean answer goes out whole, every window approved.
    let clean: Vec<String> = ["all ", "good ", "here ", "friend"]
        .iter()
        .map(|w| sse_chunk(w))
        .chain(["data: [DONE]\n\n".to_string()])
        .collect();
    let (client, host) = stream_through(yaml, &clean, verdict);
    assert_eq!(client, clean.concat());
    assert!(host.callouts.len() >= 2);
}

#[test]
fn llama_guard_and_http_callout_judge_streamed_windows_too() {
    let guard = "processors: [{name: lg, type: llama-guard, parameters: {cluster: g, model: lg, phase: Response, streamWindowBytes: 8}}]";
    let chunks: Vec<String> = ["how ", "to ", "build ", "a ", "bomb"]
        .iter()
        .map(|w| sse_chunk(w))
        .collect();
    let says = |request: &CalloutRequest| {
        let messages = sent_json(request)["messages"].clone();
        assert_eq!(messages[0], json!({"role": "user", "content": "tell me"}));
        let unsafe_ = messages[1]["content"].as_str().unwrap().contains("bomb");
        let content = if unsafe_ { "unsafe\nS9" } else { "safe" };
        json_answer(200, &json!({"choices": [{"message": {"content": content}}]}))
    };
    let (client, _) = stream_through(guard, &chunks, says);
    assert!(
        client.contains("how ") && !client.contains("bomb") && client.contains("content_filter"),
        "{client}"
    );
    let general = r#"processors: [{name: check, type: http-callout, parameters: {cluster: s, path: /check, phase: Response, streamWindowBytes: 8, body: {t: "{{ text }}"}, rejectWhen: {path: $.bad, equals: true}}}]"#;
    let judge = |request: &CalloutRequest| {
        json_answer(
            200,
            &json!({"bad": sent_json(request)["t"].as_str().unwrap().contains("bomb")}),
        )
    };
    let (client, _) = stream_through(general, &chunks, judge);
    assert!(client.contains("how ") && !client.contains("bomb"), "{client}");
}

#[test]
fn presidio_masks_a_buffered_answer_too() {
    let yaml = "processors: [{name: pr, type: presidio, parameters: {cluster: presidio, phase: Response}}]";
    let (mut stream, mut host) = past_the_request(yaml, "who wrote it?");
    host.response_body =
        serde_json::to_vec(&json!({"choices": [{"message": {"role": "assistant", "content": "Jörg Müller did"}}]}))
            .unwrap();
    let end = run_response_with_callouts(&mut stream, &mut host, presidio_answer);
    assert_eq!(end, PhaseEnd::Continued);
    let answer: Value = serde_json::from_slice(&host.response_body).unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "[PERSON] did");
}
