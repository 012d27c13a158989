//! Continuous batching: one engine thread owns the model; every step it admits waiting requests
//! into free slots, feeds each running sequence its next prompt chunk or last token in one shared
//! forward pass, samples, and streams events back. Beyond the queue limit, submission fails fast.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::pipeline::Executor;
use super::sampling::{
    Sampler, SamplingParams, find_stop, log_softmax, partial_stop_len, top_logprobs,
};
use crate::metrics::Metrics;
use crate::model::tokenizer::ModelTokenizer;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Log-probability of a token (for the API's `logprobs`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Token text (lossy UTF-8).
    pub token: String,
    /// Token bytes.
    pub bytes: Vec<u8>,
    /// Natural-log probability.
    pub logprob: f32,
}

/// What the engine sends back for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token with the text it releases (may be empty while a stop string or a
    /// UTF-8 sequence is incomplete).
    Token {
        /// Text released by this token.
        text: String,
        /// The chosen token's log-probability (when requested).
        logprob: Option<TokenLogprob>,
        /// The most likely alternatives (when requested).
        top: Vec<TokenLogprob>,
    },
    /// Generation ended.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
}

/// One generation request.
pub struct GenRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Sampling settings.
    pub params: SamplingParams,
    /// Maximum tokens to generate.
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// `Some(n)`: report the chosen token's logprob and the top `n` alternatives.
    pub logprobs: Option<usize>,
    /// Where events go; when the receiver is dropped the sequence is cancelled.
    pub events: UnboundedSender<Event>,
}

/// Submission failed because the queue is full.
#[derive(Debug, thiserror::Error)]
#[error("the server is busy: {0} requests are already waiting")]
pub struct QueueFull(pub usize);

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests allowed to wait for a slot.
    pub max_queue: usize,
    /// Tokens per sequence (prompt + generated).
    pub context: usize,
    /// Prompt tokens fed per step across the batch (chunked prefill).
    pub prefill_chunk: usize,
}

/// What the engine thread receives.
enum Work {
    Generate(GenRequest),
    /// Stop now (after a drain): requests still open end with an error, and the group's other
    /// ranks are told to shut down.
    Stop,
}

/// Cheap handle the server uses to submit work.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Work>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queue a request or fail with [`QueueFull`].
    pub fn submit(&self, req: GenRequest) -> Result<(), QueueFull> {
        let prev = self.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueFull(prev));
        }
        self.metrics.queue_depth.set((prev + 1) as i64);
        if self.tx.send(Work::Generate(req)).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueFull(prev));
        }
        Ok(())
    }

    /// Stop the engine and shut the group down (the drain's last step). Returns at once;
    /// [`EngineHandle::stopped`] says when the engine thread has ended.
    pub fn stop(&self) {
        let _ = self.tx.send(Work::Stop);
    }

    /// Whether the engine thread has ended (stopped, or its group failed).
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

struct Seq {
    req: GenRequest,
    id: u64,
    /// Tokens the group's caches hold for this sequence.
    cached: usize,
    in_flight: bool,
    fed: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    pending: Vec<u8>,
    text: String,
    sent: usize,
    submitted: Instant,
    last_token: Option<Instant>,
}

/// Called when the group fails under the engine (a peer died); the worker process exits.
pub type OnFatal = Box<dyn FnOnce(String) + Send>;

/// Start the engine thread over `exec` (a single rank, or the leader of a sharded group).
/// When the group fails, the waiting requests are dropped and `on_fatal` is called.
pub fn spawn(
    exec: Box<dyn Executor>,
    tokenizer: Arc<ModelTokenizer>,
    cfg: SchedulerConfig,
    metrics: Arc<Metrics>,
    on_fatal: Option<OnFatal>,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel::<Work>();
    let waiting = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handle = EngineHandle {
        tx,
        stopped: stopped.clone(),
        waiting: waiting.clone(),
        max_queue: cfg.max_queue,
        metrics: metrics.clone(),
    };
    std::thread::Builder::new()
        .name("wf-engine".into())
        .spawn(move || {
            let mut exec = exec;
            let r = run(exec.as_mut(), &tokenizer, cfg, &metrics, &rx, &waiting);
            exec.shutdown();
            stopped.store(true, Ordering::SeqCst);
            if let Err(e) = r {
                tracing::error!(error = %e, "the engine stopped: the group failed");
                if let Some(f) = on_fatal {
                    f(e.to_string());
                }
            }
        })?;
    Ok(handle)
}

fn run(
    exec: &mut dyn Executor,
    tk: &ModelTokenizer,
    cfg: SchedulerConfig,
    metrics: &Metrics,
    rx: &mpsc::Receiver<Work>,
    waiting_count: &AtomicUsize,
) -> Result<(), crate::comm::CommError> {
    let mut waiting: VecDeque<GenRequest> = VecDeque::new();
    let mut active: Vec<Seq> = Vec::new();
    // Steps in flight: the sequence ids of each, oldest first.
    let mut in_flight: VecDeque<Vec<(u64, usize)>> = VecDeque::new();
    let mut free: Vec<u64> = Vec::new();
    let mut next_id: u64 = 0;
    let depth = exec.depth().max(1);
    loop {
        if active.is_empty() && waiting.is_empty() && in_flight.is_empty() {
            match rx.recv() {
                Ok(Work::Generate(r)) => waiting.push_back(r),
                Ok(Work::Stop) | Err(_) => return Ok(()),
            }
        }
        while let Ok(w) = rx.try_recv() {
            match w {
                Work::Generate(r) => waiting.push_back(r),
                Work::Stop => return Ok(()),
            }
        }
        while active.len() < cfg.max_batch.max(1) {
            let Some(req) = waiting.pop_front() else {
                break;
            };
            let left = waiting_count
                .fetch_sub(1, Ordering::SeqCst)
                .saturating_sub(1);
            metrics.queue_depth.set(left as i64);
            if req.events.is_closed() {
                continue;
            }
            metrics.prompt_tokens.inc_by(req.prompt.len() as u64);
            next_id += 1;
            active.push(Seq {
                sampler: Sampler::new(req.params.clone()),
                req,
                id: next_id,
                cached: 0,
                in_flight: false,
                fed: 0,
                generated: Vec::new(),
                pending: Vec::new(),
                text: String::new(),
                sent: 0,
                submitted: Instant::now(),
                last_token: None,
            });
        }
        active.retain(|s| {
            let keep = s.in_flight || !s.req.events.is_closed();
            if !keep {
                free.push(s.id);
            }
            keep
        });
        if active.is_empty() && in_flight.is_empty() {
            continue;
        }
        metrics.running.set(active.len() as i64);
        // Launch a micro-batch of the sequences not in flight while the pipeline has room; each
        // takes its share of the running sequences so every stage has work.
        let idle = active.iter().filter(|s| !s.in_flight).count();
        if in_flight.len() < depth && idle > 0 {
            let share = active.len().div_ceil(depth).max(1);
            // Decode tokens first, then prompt chunks within the budget.
            let mut budget = cfg.prefill_chunk.max(1);
            let mut feeds: Vec<(usize, Vec<u32>)> = Vec::new();
            for (i, s) in active.iter().enumerate() {
                if feeds.len() < share
                    && !s.in_flight
                    && s.fed >= s.req.prompt.len()
                    && let Some(&t) = s.generated.last()
                {
                    feeds.push((i, vec![t]));
                }
            }
            for (i, s) in active.iter().enumerate() {
                if feeds.len() < share && !s.in_flight && s.fed < s.req.prompt.len() && budget > 0 {
                    let n = (s.req.prompt.len() - s.fed).min(budget);
                    budget -= n;
                    feeds.push((i, s.req.prompt[s.fed..s.fed + n].to_vec()));
                }
            }
            if !feeds.is_empty() {
                let inputs: Vec<(u64, &[u32])> = feeds
                    .iter()
                    .map(|(i, t)| (active[*i].id, t.as_slice()))
                    .collect();
                exec.launch(&inputs, &free)?;
                free.clear();
                let mut ids = Vec::with_capacity(feeds.len());
                for (i, toks) in &feeds {
                    let s = &mut active[*i];
                    s.in_flight = true;
                    s.cached += toks.len();
                    ids.push((s.id, toks.len()));
                }
                in_flight.push_back(ids);
                continue;
            }
        }
        let Some(ids) = in_flight.pop_front() else {
            continue;
        };
        let logits = exec.finish()?;
        let mut done = vec![false; active.len()];
        for ((id, n), lg) in ids.iter().zip(&logits) {
            let Some(i) = active.iter().position(|s| s.id == *id) else {
                continue;
            };
            let s = &mut active[i];
            s.in_flight = false;
            if s.req.events.is_closed() {
                done[i] = true;
                continue;
            }
            let was_prompt = s.fed < s.req.prompt.len();
            if was_prompt {
                s.fed += n;
                if s.fed < s.req.prompt.len() {
                    continue;
                }
            }
            done[i] = step_seq(s, lg, tk, cfg.context, metrics);
        }
        let mut k = 0;
        active.retain(|s| {
            k += 1;
            if done[k - 1] {
                free.push(s.id);
            }
            !done[k - 1]
        });
        let used: usize = active.iter().map(|s| s.cached).sum();
        let cap = (cfg.max_batch.max(1) * cfg.context).max(1);
        metrics.kv_cache_usage.set(used as f64 / cap as f64);
        metrics.running.set(active.len() as i64);
    }
}

/// Sample one token for `s`, emit it, and say whether the sequence is finished.
fn step_seq(
    s: &mut Seq,
    logits: &[f32],
    tk: &ModelTokenizer,
    context: usize,
    metrics: &Metrics,
) -> bool {
    let mut history = s.req.prompt.clone();
    history.extend_from_slice(&s.generated);
    let tok = s.sampler.sample(logits, &history);
    let now = Instant::now();
    match s.last_token {
        None => metrics
            .ttft
            .observe(now.duration_since(s.submitted).as_secs_f64()),
        Some(t) => metrics
            .inter_token
            .observe(now.duration_since(t).as_secs_f64()),
    }
    s.last_token = Some(now);
    metrics.generated_tokens.inc();
    s.generated.push(tok);
    let (logprob, top) = match s.req.logprobs {
        Some(n) => {
            let lp = log_softmax(logits);
            let mk = |id: u32, v: f32| TokenLogprob {
                token: String::from_utf8_lossy(tk.token_bytes(id)).into_owned(),
                bytes: tk.token_bytes(id).to_vec(),
                logprob: v,
            };
            let chosen = mk(
                tok,
                lp.get(tok as usize).copied().unwrap_or(f32::NEG_INFINITY),
            );
            let top = top_logprobs(&lp, n)
                .into_iter()
                .map(|(id, v)| mk(id, v))
                .collect();
            (Some(chosen), top)
        }
        None => (None, Vec::new()),
    };
    let is_stop_token = tk.stop_ids.contains(&tok);
    let mut finish = None;
    if is_stop_token {
        finish = Some(FinishReason::Stop);
    } else {
        s.pending.extend_from_slice(tk.token_bytes(tok));
        let valid = match std::str::from_utf8(&s.pending) {
            Ok(v) => v.len(),
            Err(e) if e.error_len().is_some() => s.pending.len(),
            Err(e) => e.valid_up_to(),
        };
        let chunk: Vec<u8> = s.pending.drain(..valid).collect();
        s.text.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(at) = find_stop(&s.text[s.sent.min(s.text.len())..], &s.req.stop)
            .map(|a| a + s.sent)
            .or_else(|| find_stop(&s.text, &s.req.stop))
        {
            s.text.truncate(at.max(s.sent));
            finish = Some(FinishReason::Stop);
        }
    }
    if finish.is_none() && (s.generated.len() >= s.req.max_tokens || s.cached + 1 >= context) {
        finish = Some(FinishReason::Length);
        if !s.pending.is_empty() {
            let rest: Vec<u8> = std::mem::take(&mut s.pending);
            s.text.push_str(&String::from_utf8_lossy(&rest));
        }
    }
    let end = if finish.is_some() {
        s.text.len()
    } else {
        let mut e = s.text.len() - partial_stop_len(&s.text, &s.req.stop);
        while !s.text.is_char_boundary(e) {
            e -= 1;
        }
        e.max(s.sent)
    };
    let text = s.text[s.sent..end].to_string();
    s.sent = end;
    let _ = s.req.events.send(Event::Token { text, logprob, top });
    if let Some(finish_reason) = finish {
        let _ = s.req.events.send(Event::Done {
            finish_reason,
            prompt_tokens: s.req.prompt.len(),
            completion_tokens: s.generated.len(),
        });
        return true;
    }
    false
}
