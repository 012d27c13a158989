//! Request validation: every field is checked by hand so each error names the field at fault.

use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::engine::sampling::SamplingParams;
use crate::model::chat::Message;

/// What a completion or chat request asks for, after validation.
#[derive(Debug, Clone)]
pub struct Common {
    /// Sampling settings.
    pub params: SamplingParams,
    /// Requested `max_tokens` (None = default).
    pub max_tokens: Option<usize>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream as server-sent events.
    pub stream: bool,
    /// Send a usage chunk at the end of a stream.
    pub include_usage: bool,
}

/// Parse the body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("the request body is not valid JSON: {e}"),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_json"),
    })?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: "the request body must be a JSON object".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_json"),
        }),
    }
}

fn present<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

fn number(m: &Map<String, Value>, k: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match present(m, k) {
        None => Ok(None),
        Some(v) => {
            let x = v
                .as_f64()
                .ok_or_else(|| ApiError::invalid(k, format!("'{k}' must be a number")))?;
            if !(lo..=hi).contains(&x) {
                return Err(ApiError::invalid(
                    k,
                    format!("'{k}' is {x}, must be between {lo} and {hi}"),
                ));
            }
            Ok(Some(x))
        }
    }
}

fn integer(m: &Map<String, Value>, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match present(m, k) {
        None => Ok(None),
        Some(v) => {
            let x = v
                .as_i64()
                .ok_or_else(|| ApiError::invalid(k, format!("'{k}' must be an integer")))?;
            if !(lo..=hi).contains(&x) {
                return Err(ApiError::invalid(
                    k,
                    format!("'{k}' is {x}, must be between {lo} and {hi}"),
                ));
            }
            Ok(Some(x))
        }
    }
}

/// A boolean field (absent = false).
pub fn boolean(m: &Map<String, Value>, k: &str) -> Result<bool, ApiError> {
    match present(m, k) {
        None => Ok(false),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::invalid(k, format!("'{k}' must be a boolean"))),
    }
}

/// Check `model` against the served name.
pub fn check_model(m: &Map<String, Value>, served: &str) -> Result<(), ApiError> {
    match present(m, "model") {
        None => Err(ApiError::invalid("model", "'model' is required")),
        Some(Value::String(s)) if s == served => Ok(()),
        Some(Value::String(s)) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model '{s}' does not exist; this server serves '{served}'"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }),
        Some(_) => Err(ApiError::invalid("model", "'model' must be a string")),
    }
}

/// The longest stop string accepted, in bytes: each one is searched for after every token.
pub const MAX_STOP_BYTES: usize = 256;

/// OpenAI fields this server does not implement, each with the value that asks for nothing
/// (accepted, since some clients always send it). Any other value is refused by name rather
/// than ignored: a client that sends it expects its effect.
fn not_implemented(k: &str, v: &Value) -> bool {
    let neutral = match k {
        "best_of" => v.as_i64() == Some(1),
        "tools" => v.as_array().is_some_and(Vec::is_empty),
        "tool_choice" => v.as_str() == Some("none"),
        "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
        "logit_bias" => v.as_object().is_some_and(Map::is_empty),
        "suffix" => v.as_str() == Some(""),
        _ => return false,
    };
    !neutral
}

/// Fields shared by both endpoints; `max_tokens_keys` lists the accepted spellings.
pub fn common(m: &Map<String, Value>, max_tokens_keys: &[&str]) -> Result<Common, ApiError> {
    for k in [
        "best_of",
        "tools",
        "tool_choice",
        "response_format",
        "logit_bias",
        "suffix",
    ] {
        if let Some(v) = present(m, k)
            && not_implemented(k, v)
        {
            return Err(ApiError::invalid(
                k,
                format!("'{k}' is not supported by this server; remove it from the request"),
            )
            .with(StatusCode::BAD_REQUEST, "unsupported_parameter"));
        }
    }
    let temperature = number(m, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
    let top_p = number(m, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
    let top_k = integer(m, "top_k", 0, 1 << 20)?.unwrap_or(0) as usize;
    let repetition_penalty = number(m, "repetition_penalty", 0.01, 10.0)?.unwrap_or(1.0) as f32;
    for k in ["frequency_penalty", "presence_penalty"] {
        if let Some(x) = number(m, k, -2.0, 2.0)?
            && x != 0.0
        {
            return Err(ApiError::invalid(
                k,
                format!("'{k}' is not supported; use 'repetition_penalty'"),
            ));
        }
    }
    let seed = match present(m, "seed") {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .map(|s| s as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| ApiError::invalid("seed", "'seed' must be an integer"))?,
        ),
    };
    if let Some(n) = integer(m, "n", 1, 1)? {
        debug_assert_eq!(n, 1);
    }
    let mut max_tokens = None;
    for k in max_tokens_keys {
        if let Some(x) = integer(m, k, 1, i64::from(u32::MAX))? {
            max_tokens = Some(x as usize);
        }
    }
    let stop = match present(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::invalid("stop", "'stop' items must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "'stop' must be a string or an array of up to 4 strings",
            ));
        }
    };
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "a stop string is {} bytes; at most {MAX_STOP_BYTES} are allowed",
                long.len()
            ),
        ));
    }
    let stream = boolean(m, "stream")?;
    let include_usage = match present(m, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage").map_err(|_| {
            ApiError::invalid("stream_options", "'include_usage' must be a boolean")
        })?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "'stream_options' must be an object",
            ));
        }
    };
    Ok(Common {
        params: SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
        },
        max_tokens,
        stop,
        stream,
        include_usage,
    })
}

/// The `prompt` of a completion request (a string or a one-string array).
pub fn prompt(m: &Map<String, Value>) -> Result<String, ApiError> {
    let p = match present(m, "prompt") {
        None => return Err(ApiError::invalid("prompt", "'prompt' is required")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "'prompt' must be a string (or an array of one string)",
            ));
        }
    };
    if p.is_empty() {
        return Err(ApiError::invalid("prompt", "'prompt' must not be empty"));
    }
    Ok(p)
}

/// Completions `logprobs`: an integer 0..=5.
pub fn completion_logprobs(m: &Map<String, Value>) -> Result<Option<usize>, ApiError> {
    Ok(integer(m, "logprobs", 0, 5)?.map(|n| n as usize))
}

/// Chat `logprobs` + `top_logprobs`.
pub fn chat_logprobs(m: &Map<String, Value>) -> Result<Option<usize>, ApiError> {
    let on = boolean(m, "logprobs")?;
    let top = integer(m, "top_logprobs", 0, 20)?;
    match (on, top) {
        (false, Some(_)) => Err(ApiError::invalid(
            "top_logprobs",
            "'top_logprobs' requires 'logprobs' to be true",
        )),
        (false, None) => Ok(None),
        (true, t) => Ok(Some(t.unwrap_or(0) as usize)),
    }
}

/// Chat `messages`.
pub fn messages(m: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let arr = match present(m, "messages") {
        None => return Err(ApiError::invalid("messages", "'messages' is required")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("messages", "'messages' must be an array")),
    };
    if arr.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must not be empty",
        ));
    }
    let mut out = Vec::with_capacity(arr.len());
    for (i, msg) in arr.iter().enumerate() {
        let p = |f: &str| format!("messages[{i}].{f}");
        let o = msg.as_object().ok_or_else(|| {
            ApiError::invalid(&format!("messages[{i}]"), "each message must be an object")
        })?;
        let role = match o.get("role") {
            Some(Value::String(r))
                if matches!(
                    r.as_str(),
                    "system" | "user" | "assistant" | "developer" | "tool"
                ) =>
            {
                if r == "developer" {
                    "system".to_string()
                } else {
                    r.clone()
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    &p("role"),
                    "'role' must be one of system, user, assistant, developer, tool",
                ));
            }
        };
        let content = match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for part in parts {
                    match (
                        part.get("type").and_then(Value::as_str),
                        part.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                &p("content"),
                                "only text content parts are supported",
                            ));
                        }
                    }
                }
                s
            }
            Some(Value::Null) | None if role == "assistant" => String::new(),
            _ => {
                return Err(ApiError::invalid(
                    &p("content"),
                    "'content' must be a string",
                ));
            }
        };
        out.push(Message { role, content });
    }
    Ok(out)
}
