//! Turning the engine's events into OpenAI responses: one JSON body (collected) or server-sent
//! events (streamed), with logprobs and usage; a group that fails mid-answer ends a stream with
//! an error event, never a clean end.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::Json;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::admission::Ticket;
use super::error::ApiError;
use super::{AppState, failed, failing, now, request, request_id};
use crate::engine::Event;
use crate::engine::scheduler::TokenLogprob;

/// Which API shape to render.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Completion,
    Chat,
}

struct Collected {
    text: String,
    tokens: Vec<(TokenLogprob, Vec<TokenLogprob>)>,
    finish: &'static str,
    completion_tokens: usize,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut c = Collected {
        text: String::new(),
        tokens: Vec::new(),
        finish: "stop",
        completion_tokens: 0,
    };
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            reason = failing() => return Err(failed(&reason)),
        };
        let Some(ev) = ev else { break };
        match ev {
            Event::Token { text, logprob, top } => {
                c.text.push_str(&text);
                if let Some(lp) = logprob {
                    c.tokens.push((lp, top));
                }
            }
            Event::Done {
                finish_reason,
                completion_tokens,
                ..
            } => {
                c.finish = finish_reason.as_str();
                c.completion_tokens = completion_tokens;
                return Ok(c);
            }
        }
    }
    Err(ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "the engine stopped before finishing the request".into(),
        kind: "server_error",
        param: None,
        code: None,
    })
}

fn completion_logprobs(toks: &[(TokenLogprob, Vec<TokenLogprob>)], offset0: usize) -> Value {
    let mut offset = offset0;
    let mut offsets = Vec::new();
    for (t, _) in toks {
        offsets.push(offset);
        offset += t.token.len();
    }
    json!({
        "tokens": toks.iter().map(|(t, _)| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": toks.iter().map(|(t, _)| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": toks.iter().map(|(_, top)| {
            top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn chat_logprobs(toks: &[(TokenLogprob, Vec<TokenLogprob>)]) -> Value {
    json!({"content": toks.iter().map(|(t, top)| json!({
        "token": t.token, "logprob": t.logprob, "bytes": t.bytes,
        "top_logprobs": top.iter().map(|a| json!({
            "token": a.token, "logprob": a.logprob, "bytes": a.bytes
        })).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()})
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

pub(super) async fn respond(
    st: &AppState,
    kind: Kind,
    rx: UnboundedReceiver<Event>,
    prompt_tokens: usize,
    want_logprobs: bool,
    common: &request::Common,
    ticket: Ticket,
) -> Result<Response, ApiError> {
    let (id, created, model) = (
        request_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        now(),
        st.model_name.clone(),
    );
    if common.stream {
        return Ok(stream(
            kind,
            rx,
            id,
            created,
            model,
            prompt_tokens,
            want_logprobs,
            common.include_usage,
            ticket,
        ));
    }
    let c = collect(rx).await?;
    drop(ticket);
    let choice = match kind {
        Kind::Completion => json!({
            "index": 0, "text": c.text, "finish_reason": c.finish,
            "logprobs": if want_logprobs { completion_logprobs(&c.tokens, 0) } else { Value::Null },
        }),
        Kind::Chat => json!({
            "index": 0, "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish,
            "logprobs": if want_logprobs { chat_logprobs(&c.tokens) } else { Value::Null },
        }),
    };
    Ok(Json(json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created, "model": model, "choices": [choice],
        "usage": usage(prompt_tokens, c.completion_tokens),
    }))
    .into_response())
}

struct StreamState {
    rx: UnboundedReceiver<Event>,
    /// Counts the stream in flight until its last event is produced (or the client leaves).
    _ticket: Ticket,
    out: VecDeque<String>,
    finished: bool,
    text_offset: usize,
}

#[allow(clippy::too_many_arguments)]
fn stream(
    kind: Kind,
    rx: UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    want_logprobs: bool,
    include_usage: bool,
    ticket: Ticket,
) -> Response {
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: Value, usage_v: Option<Value>| -> String {
        let mut v = json!({"id": id, "object": object, "created": created, "model": model,
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) }});
        if let Some(u) = usage_v {
            v["usage"] = u;
        }
        v.to_string()
    };
    let mut out = VecDeque::new();
    if kind == Kind::Chat {
        out.push_back(chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
            None,
        ));
    }
    let init = StreamState {
        rx,
        _ticket: ticket,
        out,
        finished: false,
        text_offset: 0,
    };
    // An error event in the shape OpenAI's clients raise on; never followed by `[DONE]`.
    let error_event = |e: ApiError| {
        json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": e.code}})
            .to_string()
    };
    let s = futures_util::stream::unfold((init, chunk), move |(mut st, chunk)| async move {
        loop {
            if let Some(line) = st.out.pop_front() {
                return Some((
                    Ok::<_, Infallible>(SseEvent::default().data(line)),
                    (st, chunk),
                ));
            }
            if st.finished {
                // Dropping the state here ends the ticket with the last event, not later.
                drop(st);
                return None;
            }
            let ev = tokio::select! {
                ev = st.rx.recv() => ev,
                reason = failing() => {
                    st.out.push_back(error_event(failed(&reason)));
                    st.finished = true;
                    continue;
                }
            };
            match ev {
                Some(Event::Token { text, logprob, top }) => {
                    let toks: Vec<_> = logprob.into_iter().map(|l| (l, top.clone())).collect();
                    if text.is_empty() && (!want_logprobs || toks.is_empty()) {
                        continue;
                    }
                    let lp = if want_logprobs && !toks.is_empty() {
                        match kind {
                            Kind::Completion => completion_logprobs(&toks, st.text_offset),
                            Kind::Chat => chat_logprobs(&toks),
                        }
                    } else {
                        Value::Null
                    };
                    st.text_offset += text.len();
                    let choice = match kind {
                        Kind::Completion => {
                            json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": null})
                        }
                        Kind::Chat => {
                            json!({"index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": null})
                        }
                    };
                    st.out.push_back(chunk(choice, None));
                }
                Some(Event::Done {
                    finish_reason,
                    completion_tokens,
                    ..
                }) => {
                    let f = finish_reason.as_str();
                    let choice = match kind {
                        Kind::Completion => {
                            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": f})
                        }
                        Kind::Chat => {
                            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": f})
                        }
                    };
                    st.out.push_back(chunk(choice, None));
                    if include_usage {
                        st.out.push_back(chunk(
                            Value::Null,
                            Some(usage(prompt_tokens, completion_tokens)),
                        ));
                    }
                    st.out.push_back("[DONE]".to_string());
                    st.finished = true;
                }
                // The engine dropped the request unfinished: say so, not a clean end.
                None => {
                    st.out.push_back(error_event(ApiError {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        message: "the engine stopped before finishing the request".into(),
                        kind: "server_error",
                        param: None,
                        code: None,
                    }));
                    st.finished = true;
                }
            }
        }
    });
    Sse::new(s).into_response()
}
