//! OpenAI-compatible HTTP API (axum): completions and chat (plain and streamed), models, health,
//! readiness and Prometheus metrics. The router is built before the model loads so `/healthz`
//! answers at once, `/startupz` once this process's weights are in, and `/readyz` only when
//! the engine (the whole group) can serve.

pub mod admission;
pub mod error;
pub mod listen;
pub mod request;
mod respond;

use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::engine::{EngineHandle, Event, GenRequest};
use crate::metrics::{Metrics, RequestLabels};
use crate::model::chat::ChatTemplate;
use crate::model::tokenizer::ModelTokenizer;
use admission::Gate;
use error::ApiError;
use respond::{Kind, respond};

/// Everything that exists once the model is loaded.
pub struct Loaded {
    /// Submits generation work.
    pub engine: EngineHandle,
    /// Prompt tokenizer.
    pub tokenizer: Arc<ModelTokenizer>,
    /// Chat template, when the model has one.
    pub chat: Option<ChatTemplate>,
    /// Tokens per sequence.
    pub context: usize,
}

/// Why this process is stopping with requests in flight (a fatal GPU fault, its group failing),
/// once it knows: every open request ends with an error naming it rather than being cut off.
static FAILING: std::sync::LazyLock<tokio::sync::watch::Sender<Option<String>>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::channel(None).0);

/// How long a stopping rank gives its open requests to receive their error.
pub const FAIL_FLUSH: std::time::Duration = std::time::Duration::from_millis(300);

/// Ends every request in flight (and any that arrives after) with an error saying `reason`:
/// a streamed answer gets an error event and no `[DONE]`, a plain one a 503. The first reason
/// is kept. Call before the process exits, then give the answers [`FAIL_FLUSH`] to go out.
pub fn fail_in_flight(reason: &str) {
    FAILING.send_if_modified(|r| {
        if r.is_some() {
            return false;
        }
        *r = Some(reason.to_string());
        true
    });
}

/// Resolves with the reason once [`fail_in_flight`] was called.
async fn failing() -> String {
    let mut rx = FAILING.subscribe();
    let reason = rx
        .wait_for(Option::is_some)
        .await
        .map(|r| r.clone().unwrap_or_default());
    match reason {
        Ok(r) => r,
        // The sender is a static: it is never dropped.
        Err(_) => std::future::pending().await,
    }
}

/// The error object a failing rank answers with.
fn failed(reason: &str) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("this replica group stopped: {reason}"),
        kind: "server_error",
        param: None,
        code: Some("replica_failed"),
    }
}

/// Shared server state.
pub struct AppState {
    /// Name clients must send as `model`.
    pub model_name: String,
    /// Set once loading finishes.
    pub loaded: OnceLock<Loaded>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// On a rank that serves no API (a later stage or TP rank), set once it is loaded and
    /// connected to its peers: the flag its ranks raise when the whole group has formed.
    pub group_formed: OnceLock<Arc<std::sync::atomic::AtomicBool>>,
    /// API keys, the drain and the generations in flight.
    pub gate: Arc<Gate>,
    created: u64,
}

impl AppState {
    /// State for a server whose model is still loading; `/v1/*` needs one of `api_keys` when
    /// any is given.
    pub fn new(model_name: String, metrics: Arc<Metrics>, api_keys: &[String]) -> Arc<Self> {
        Arc::new(Self {
            model_name,
            loaded: OnceLock::new(),
            metrics,
            group_formed: OnceLock::new(),
            gate: Arc::new(Gate::new(api_keys)),
            created: now(),
        })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:06x}",
        now(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The process runs; the body says what the GPU sampler found (`ok: 2 GPU(s)`, `ok: no GPU
/// (...)`), so a person probing a pod sees at once whether NVML works there.
async fn healthz(State(st): State<Arc<AppState>>) -> String {
    let gpus = st.metrics.gpu.status();
    if gpus.is_empty() {
        "ok".into()
    } else {
        format!("ok: {gpus}")
    }
}

/// The router, with a request-body limit in bytes.
pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    // Model output needs a key (when keys are set); health and metrics carry none.
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admission::require_key,
        ));
    api.route("/healthz", get(healthz))
        .route("/startupz", get(startupz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn track(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    st.metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// The startup probe: 200 once this process's weights are loaded (its group may still be
/// forming: that is `/readyz`'s business), 503 while they load. Until it passes the kubelet
/// runs no liveness probe, so a rank that loads for minutes is not restarted, and one whose
/// load hangs is, once the probe's budget (sized from the shard's bytes) runs out.
async fn startupz(State(st): State<Arc<AppState>>) -> Response {
    let bytes = st.metrics.weight_bytes.get();
    if bytes > 0 {
        format!(
            "loaded: {bytes} bytes of weights in {:.1} s",
            st.metrics.load_seconds.get()
        )
        .into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response()
    }
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if let Some(fault) = st.metrics.gpu.fatal() {
        (StatusCode::SERVICE_UNAVAILABLE, fault.to_string()).into_response()
    } else if st.gate.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if st.loaded.get().is_some_and(|l| l.engine.stopped()) {
        (StatusCode::SERVICE_UNAVAILABLE, "the engine stopped").into_response()
    } else if st.loaded.get().is_some() {
        "ready".into_response()
    } else if let Some(formed) = st.group_formed.get() {
        if formed.load(std::sync::atomic::Ordering::SeqCst) {
            "ready".into_response()
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "loaded and connected; waiting for the whole group to form",
            )
                .into_response()
        }
    } else if st.metrics.weight_bytes.get() > 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "loaded; connecting to its peers",
        )
            .into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": st.model_name, "object": "model", "created": st.created, "owned_by": "whaleflux"
    }]}))
}

fn body_error(rej: BytesRejection) -> ApiError {
    // The body timeout (tower-http) surfaces as a body that failed to arrive.
    if rej
        .to_string()
        .contains("not received within the designated timeout")
    {
        return ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: "the request body did not arrive in time".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
        };
    }
    let status = rej.status();
    ApiError {
        status,
        message: if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is too large".into()
        } else {
            format!("cannot read the request body: {rej}")
        },
        kind: "invalid_request_error",
        param: None,
        code: Some(if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "invalid_body"
        }),
    }
}

fn loaded(st: &AppState) -> Result<&Loaded, ApiError> {
    st.loaded.get().ok_or(ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the model is still loading".into(),
        kind: "server_error",
        param: None,
        code: Some("not_ready"),
    })
}

/// A validated generation, ready to submit.
struct Job {
    prompt: Vec<u32>,
    common: request::Common,
    logprobs: Option<usize>,
    default_max: usize,
    prompt_param: &'static str,
}

fn submit(l: &Loaded, job: Job) -> Result<(UnboundedReceiver<Event>, usize), ApiError> {
    let n = job.prompt.len();
    if n >= l.context {
        return Err(ApiError::invalid(
            job.prompt_param,
            format!(
                "the prompt is {n} tokens, the context is {} tokens; shorten the prompt",
                l.context
            ),
        )
        .with(StatusCode::BAD_REQUEST, "context_length_exceeded"));
    }
    let room = l.context - n;
    let max_tokens = match job.common.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "'max_tokens' is {m}, but the context is {} tokens and the prompt uses {n}; at most {room} can be generated",
                    l.context
                ),
            )
            .with(StatusCode::BAD_REQUEST, "context_length_exceeded"));
        }
        Some(m) => m,
        None => job.default_max.min(room),
    };
    let (tx, rx) = unbounded_channel();
    l.engine
        .submit(GenRequest {
            prompt: job.prompt,
            params: job.common.params.clone(),
            max_tokens,
            stop: job.common.stop.clone(),
            logprobs: job.logprobs,
            events: tx,
        })
        .map_err(|e| ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: e.to_string(),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        })?;
    Ok((rx, n))
}

fn tokenize(l: &Loaded, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    let ids = l
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::invalid(param, e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            param,
            format!("'{param}' tokenizes to nothing"),
        ));
    }
    Ok(ids)
}

/// Runs `f` (rendering the chat template, tokenizing: work that grows with the request) on the
/// blocking pool, after admission, so a large prompt never stalls the async threads that
/// answer everyone else (health probes included).
async fn off_async<T: Send + 'static>(
    st: &Arc<AppState>,
    f: impl FnOnce(&Loaded) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || f(loaded(&st)?))
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("preparing the prompt failed: {e}"),
            kind: "server_error",
            param: None,
            code: None,
        })?
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let body = body.map_err(body_error)?;
        let ticket = st.gate.admit()?;
        let l = loaded(&st)?;
        let m = request::parse_object(&body)?;
        request::check_model(&m, &st.model_name)?;
        let prompt = request::prompt(&m)?;
        let common = request::common(&m, &["max_tokens"])?;
        let logprobs = request::completion_logprobs(&m)?;
        if request::boolean(&m, "echo")? {
            return Err(ApiError::invalid("echo", "'echo' is not supported"));
        }
        let ids = off_async(&st, move |l| tokenize(l, &prompt, "prompt")).await?;
        let (rx, n) = submit(
            l,
            Job {
                prompt: ids,
                common: common.clone(),
                logprobs,
                default_max: 16,
                prompt_param: "prompt",
            },
        )?;
        respond(
            &st,
            Kind::Completion,
            rx,
            n,
            logprobs.is_some(),
            &common,
            ticket,
        )
        .await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let body = body.map_err(body_error)?;
        let ticket = st.gate.admit()?;
        let l = loaded(&st)?;
        let m = request::parse_object(&body)?;
        request::check_model(&m, &st.model_name)?;
        let msgs = request::messages(&m)?;
        let common = request::common(&m, &["max_tokens", "max_completion_tokens"])?;
        let logprobs = request::chat_logprobs(&m)?;
        let ids = off_async(&st, move |l| {
            let tpl = l.chat.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    "messages",
                    "this model has no chat template; use /v1/completions",
                )
            })?;
            let text = tpl
                .render(&msgs)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            tokenize(l, &text, "messages")
        })
        .await?;
        let (rx, n) = submit(
            l,
            Job {
                prompt: ids,
                common: common.clone(),
                logprobs,
                default_max: usize::MAX,
                prompt_param: "messages",
            },
        )?;
        respond(&st, Kind::Chat, rx, n, logprobs.is_some(), &common, ticket).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}
