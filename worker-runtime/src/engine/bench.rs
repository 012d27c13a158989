//! `whaleflux-worker bench-shard`: what sharding costs and gains on this machine, each figure
//! next to the single rank's in the same run. Per-token decode time and the share of it spent in
//! all-reduce for TP=3 (ranks as threads sharing memory, and ranks talking TCP over loopback),
//! and generated tokens per second for PP=2 against PP=1 with concurrent requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::group::{load_rank, local_group, spawn_follower};
use super::pipeline::{Executor, Leader, Rank};
use super::sampling::{SamplingParams, argmax};
use super::scheduler::{Event, GenRequest, SchedulerConfig, spawn};
use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::bringup::StartError;
use crate::comm::tcp::{PeerEndpoint, TcpGroup, TcpOptions, connect, listen};
use crate::comm::{Link, RankId, Timed};
use crate::metrics::Metrics;
use crate::model::gguf::Gguf;
use crate::model::tokenizer::ModelTokenizer;
use crate::shard::fixed_plan;

/// Milliseconds per decoded token of one sequence after a short prompt.
fn per_token_ms(exec: &mut dyn Executor, prompt: &[u32], tokens: usize) -> Result<f64, StartError> {
    exec.launch(&[(1, prompt)], &[])?;
    let mut t = argmax(&exec.finish()?[0]);
    // Warm-up steps are not timed.
    for _ in 0..4 {
        exec.launch(&[(1, &[t])], &[])?;
        t = argmax(&exec.finish()?[0]);
    }
    let t0 = Instant::now();
    for _ in 0..tokens {
        exec.launch(&[(1, &[t])], &[])?;
        t = argmax(&exec.finish()?[0]);
    }
    exec.launch(&[], &[1])?;
    exec.finish()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3 / tokens as f64)
}

/// TP=3 ranks as threads of this process talking TCP over loopback (the transport of one
/// process per TP rank).
fn tcp_tp_group(g: &Gguf, tp: usize, nanos: Arc<AtomicU64>) -> Result<Leader, StartError> {
    let plan = fixed_plan(
        "bench",
        crate::model::config::LlamaConfig::from_gguf(g)?.n_layers,
        tp,
        1,
    );
    let listeners = (0..tp).map(|_| listen(0)).collect::<Result<Vec<_>, _>>()?;
    let eps: Vec<PeerEndpoint> = listeners
        .iter()
        .enumerate()
        .map(|(r, l)| PeerEndpoint {
            id: RankId {
                stage: 0,
                tp_rank: r,
            },
            host: "127.0.0.1".into(),
            port: l.local_addr().map_or(0, |a| a.port()),
        })
        .collect();
    let opts = TcpOptions {
        group: 0,
        secret: rand::random::<[u8; 16]>().to_vec(),
        timeout: Duration::from_secs(30),
        on_fail: None,
        connect_by: None,
        config_digest: [0; crate::comm::handshake::DIGEST],
    };
    let conns = std::thread::scope(|sc| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let me = RankId {
                    stage: 0,
                    tp_rank: r,
                };
                let others: Vec<PeerEndpoint> =
                    eps.iter().filter(|e| e.id != me).cloned().collect();
                let o = opts.clone();
                sc.spawn(move || connect(me, l, &others, &o))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| unreachable!("connect does not panic"))
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    let mut leader = None;
    for (r, c) in conns.iter().enumerate() {
        let me = RankId {
            stage: 0,
            tp_rank: r,
        };
        let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(1)?);
        let mut rank = Rank::new(me, Arc::new(load_rank(g, &plan, 0, r)?), be);
        let group = TcpGroup::new(me, tp, c);
        rank.tp = Some(if r == 0 {
            Box::new(Timed {
                inner: group,
                nanos: nanos.clone(),
            })
        } else {
            Box::new(group)
        });
        let link = |t: usize| {
            c.get(&RankId {
                stage: 0,
                tp_rank: t,
            })
            .map(|l| l.clone() as Arc<dyn Link>)
        };
        rank.tp_links = if r == 0 {
            (1..tp).filter_map(link).collect()
        } else {
            link(0).into_iter().collect()
        };
        if r == 0 {
            leader = Some(rank);
        } else {
            spawn_follower(rank)?;
        }
    }
    let Some(rank) = leader else {
        unreachable!("rank 0 exists")
    };
    let l = Leader::new(rank, 1);
    l.await_ready()?;
    Ok(l)
}

/// Generated tokens per second with `n` concurrent requests of `max_tokens` each.
fn throughput(
    exec: Box<dyn Executor>,
    tk: &Arc<ModelTokenizer>,
    n: usize,
    max_tokens: usize,
) -> Result<f64, StartError> {
    let engine = spawn(
        exec,
        tk.clone(),
        SchedulerConfig {
            max_batch: n,
            max_queue: n,
            context: 1024,
            prefill_chunk: 512,
        },
        Arc::new(Metrics::new()),
        None,
    )?;
    let t0 = Instant::now();
    let mut rxs = Vec::new();
    for i in 0..n {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt = tk
            .encode(&format!(
                "Write a long story about the number {i}. Once upon a time"
            ))
            .map_err(|e| StartError::Thread(std::io::Error::other(e.to_string())))?;
        let _ = engine.submit(GenRequest {
            prompt,
            params: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            max_tokens,
            stop: Vec::new(),
            logprobs: None,
            events: tx,
        });
        rxs.push(rx);
    }
    let mut generated = 0usize;
    for mut rx in rxs {
        while let Some(ev) = rx.blocking_recv() {
            if let Event::Done {
                completion_tokens, ..
            } = ev
            {
                generated += completion_tokens;
                break;
            }
        }
    }
    Ok(generated as f64 / t0.elapsed().as_secs_f64())
}

/// Run the benchmark on the model at `g` with `threads` CPU threads in all; returns the JSON.
pub fn run(
    g: &Gguf,
    threads: usize,
    tokens: usize,
    concurrent: usize,
) -> Result<Value, StartError> {
    let tk = Arc::new(
        ModelTokenizer::from_gguf(g)
            .map_err(|e| StartError::Thread(std::io::Error::other(e.to_string())))?,
    );
    let n_layers = crate::model::config::LlamaConfig::from_gguf(g)?.n_layers;
    let prompt = tk
        .encode("The capital of France is")
        .map_err(|e| StartError::Thread(std::io::Error::other(e.to_string())))?;
    let single = || -> Result<Leader, StartError> {
        let m = Arc::new(load_rank(g, &fixed_plan("bench", n_layers, 1, 1), 0, 0)?);
        Ok(Leader::single(m, Arc::new(CpuBackend::new(threads)?)))
    };
    let tp1_ms = per_token_ms(&mut single()?, &prompt, tokens)?;

    let nanos = Arc::new(AtomicU64::new(0));
    let (mut l, followers) = local_group(
        g,
        &fixed_plan("bench", n_layers, 3, 1),
        (threads / 3).max(1),
        Some(nanos.clone()),
    )?;
    let t0 = Instant::now();
    nanos.store(0, Ordering::SeqCst);
    let tp3_ms = per_token_ms(&mut l, &prompt, tokens)?;
    let total = t0.elapsed().as_nanos() as f64;
    let threads_share = nanos.load(Ordering::SeqCst) as f64 / total;
    l.shutdown();
    drop(l);
    for f in followers {
        let _ = f.join();
    }

    let nanos_tcp = Arc::new(AtomicU64::new(0));
    let mut l = tcp_tp_group(g, 3, nanos_tcp.clone())?;
    let t0 = Instant::now();
    nanos_tcp.store(0, Ordering::SeqCst);
    let tcp_ms = per_token_ms(&mut l, &prompt, tokens)?;
    let tcp_share = nanos_tcp.load(Ordering::SeqCst) as f64 / t0.elapsed().as_nanos() as f64;
    l.shutdown();
    drop(l);

    let pp1 = throughput(Box::new(single()?), &tk, concurrent, tokens)?;
    let (l, followers) = local_group(
        g,
        &fixed_plan("bench", n_layers, 1, 2),
        (threads / 2).max(1),
        None,
    )?;
    let pp2 = throughput(Box::new(l), &tk, concurrent, tokens)?;
    for f in followers {
        let _ = f.join();
    }
    Ok(json!({
        "engine": "whaleflux",
        "threads": threads,
        "decode_tokens": tokens,
        "tp1": {"ms_per_token": tp1_ms},
        "tp3_threads": {
            "ms_per_token": tp3_ms,
            "all_reduce_share": threads_share,
            "threads_per_rank": (threads / 3).max(1),
            "vs_tp1": tp1_ms / tp3_ms,
        },
        "tp3_tcp": {
            "transport": "TCP over loopback, ranks as threads of the bench process",
            "ms_per_token": tcp_ms,
            "all_reduce_share": tcp_share,
            "vs_tp1": tp1_ms / tcp_ms,
        },
        "pp": {
            "concurrent_requests": concurrent,
            "max_tokens": tokens,
            "pp1_tokens_per_s": pp1,
            "pp2_tokens_per_s": pp2,
            "pp2_vs_pp1": pp2 / pp1,
            "threads_per_stage": (threads / 2).max(1),
        },
    }))
}
