//! TCP transport between processes: one connection per pair of ranks that talk (the higher rank
//! dials the lower), opened with the group-secret handshake ([`super::handshake`]), then
//! length-prefixed frames ([`super::wire`]), each tagged with the link's session key. A reader
//! thread per connection drains the socket (so sends never deadlock on full buffers) and
//! enforces the peer timeout: heartbeats flow while a link is idle, so silence longer than the
//! timeout means the peer is stalled or dead; a reply a rank waits for inside a step
//! ([`Link::recv_reply`]) must come within the timeout too, so a peer whose heartbeats still
//! flow but whose engine no longer answers fails the group instead of hanging it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::handshake::{
    Bounded, DIGEST, HANDSHAKE_DEADLINE, Opener, Sealer, SessionKeys, TAG, handshake_accept,
    handshake_dial,
};
use super::wire::{self, MAX_FRAME};
use super::{Collective, CommError, Link, Msg, RankId, sum_in_rank_order};

/// Called once, from the connection's reader thread, when a peer fails (so a worker process can
/// exit at once even while it is idle and nobody is waiting on the link).
pub type FailHook = Arc<dyn Fn(&CommError) + Send + Sync>;

/// Settings shared by every connection of a process.
#[derive(Clone)]
pub struct TcpOptions {
    /// Replica group (peers of another group are refused).
    pub group: i32,
    /// The group secret.
    pub secret: Vec<u8>,
    /// How long a peer may take to connect, or stay silent once connected.
    pub timeout: Duration,
    /// What to do when a connected peer fails.
    pub on_fail: Option<FailHook>,
    /// When the peers must have connected by (the group's formation deadline, counted from
    /// the process's start); never sooner than `timeout` from the call to [`connect`].
    pub connect_by: Option<Instant>,
    /// Digest of the group's configuration (model, plan, serving limits, peers): ranks whose
    /// digests differ, such as pods of two configurations during a rollout, refuse to form.
    pub config_digest: [u8; DIGEST],
}

impl TcpOptions {
    /// Options with the secret from the environment; fails when it is unset or empty.
    pub fn from_env(group: i32, timeout: Duration) -> Result<Self, CommError> {
        let secret = std::env::var(whaleflux_crds::worker::GROUP_SECRET_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or(CommError::NoSecret)?;
        Ok(Self {
            group,
            secret: secret.into_bytes(),
            timeout,
            on_fail: None,
            connect_by: None,
            config_digest: [0; DIGEST],
        })
    }
}

/// A connection to one peer rank.
pub struct TcpConn {
    peer: RankId,
    addr: String,
    writer: Mutex<Writer>,
    rx: Mutex<Receiver<Result<Msg, CommError>>>,
    closed: Arc<AtomicBool>,
    stream: TcpStream,
    timeout: Duration,
}

/// The sending half of a link: frames are tagged and numbered in the order they are written.
struct Writer {
    s: TcpStream,
    seal: Sealer,
}

impl Writer {
    fn write_frame(&mut self, mut frame: Vec<u8>) -> std::io::Result<()> {
        self.seal.seal(&mut frame);
        self.s.write_all(&frame)
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn io_err(peer: RankId, addr: &str, timeout: Duration, e: &std::io::Error) -> CommError {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => CommError::Timeout {
            peer,
            addr: addr.into(),
            ms: timeout.as_millis() as u64,
        },
        _ => CommError::Closed {
            peer,
            addr: addr.into(),
            detail: e.to_string(),
        },
    }
}

impl TcpConn {
    fn start(
        peer: RankId,
        stream: TcpStream,
        keys: &SessionKeys,
        opts: &TcpOptions,
    ) -> Result<Arc<TcpConn>, CommError> {
        let addr = stream
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        let err = |e: std::io::Error| io_err(peer, &addr, opts.timeout, &e);
        stream.set_nodelay(true).map_err(err)?;
        stream.set_read_timeout(Some(opts.timeout)).map_err(err)?;
        stream.set_write_timeout(Some(opts.timeout)).map_err(err)?;
        let (tx, rx) = channel();
        let closed = Arc::new(AtomicBool::new(false));
        let mut reader = stream.try_clone().map_err(err)?;
        let mut opener = Opener::new(keys);
        let (r_closed, r_addr, timeout, hook) = (
            closed.clone(),
            addr.clone(),
            opts.timeout,
            opts.on_fail.clone(),
        );
        std::thread::Builder::new()
            .name(format!("wf-peer-rx-{}-{}", peer.stage, peer.tp_rank))
            .spawn(move || {
                let e = loop {
                    let mut len = [0u8; 4];
                    if let Err(e) = reader.read_exact(&mut len) {
                        break io_err(peer, &r_addr, timeout, &e);
                    }
                    let len = u32::from_le_bytes(len) as usize;
                    if len <= TAG || len > MAX_FRAME + TAG {
                        break CommError::Protocol {
                            peer,
                            detail: format!("frame of {len} bytes"),
                        };
                    }
                    let mut frame = vec![0u8; len];
                    if let Err(e) = reader.read_exact(&mut frame) {
                        break io_err(peer, &r_addr, timeout, &e);
                    }
                    let body = match opener.open(&frame) {
                        Ok(b) => b,
                        Err(detail) => break CommError::Protocol { peer, detail },
                    };
                    match wire::decode(body) {
                        Ok(None) => {}
                        Ok(Some(Msg::Abort(reason))) => {
                            break CommError::Closed {
                                peer,
                                addr: r_addr.clone(),
                                detail: format!("it failed: {reason}"),
                            };
                        }
                        // The peer shut the group down cleanly: what follows (its end of the
                        // connection closing) is not a failure.
                        Ok(Some(Msg::Shutdown)) => {
                            r_closed.store(true, Ordering::SeqCst);
                            let _ = tx.send(Ok(Msg::Shutdown));
                            return;
                        }
                        Ok(Some(m)) => {
                            if tx.send(Ok(m)).is_err() {
                                return;
                            }
                        }
                        Err(detail) => break CommError::Protocol { peer, detail },
                    }
                };
                if r_closed.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(h) = &hook {
                    h(&e);
                }
                let _ = tx.send(Err(e));
            })
            .map_err(err)?;
        let writer = Mutex::new(Writer {
            s: stream.try_clone().map_err(err)?,
            seal: Sealer::new(keys),
        });
        let conn = Arc::new(TcpConn {
            peer,
            addr: addr.clone(),
            writer,
            rx: Mutex::new(rx),
            closed: closed.clone(),
            stream,
            timeout: opts.timeout,
        });
        let weak = Arc::downgrade(&conn);
        {
            let mut all = CONNS.lock().unwrap_or_else(|p| p.into_inner());
            all.retain(|c| c.strong_count() > 0);
            all.push(weak.clone());
        }
        let every = (opts.timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        std::thread::Builder::new()
            .name(format!("wf-peer-hb-{}-{}", peer.stage, peer.tp_rank))
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    let Some(c) = weak.upgrade() else { return };
                    if c.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut w = c.writer.lock().unwrap_or_else(|p| p.into_inner());
                    if w.write_frame(wire::heartbeat().to_vec()).is_err() {
                        return;
                    }
                }
            })
            .map_err(err)?;
        Ok(conn)
    }

    /// Where the peer is.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Link for TcpConn {
    fn peer(&self) -> RankId {
        self.peer
    }

    fn send(&self, msg: &Msg) -> Result<(), CommError> {
        let frame = wire::encode(msg);
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_frame(frame)
            .map_err(|e| io_err(self.peer, &self.addr, Duration::ZERO, &e))
    }

    fn recv_reply(&self) -> Result<Msg, CommError> {
        self.next_msg(Some(self.timeout))
    }

    fn recv(&self) -> Result<Msg, CommError> {
        self.next_msg(None)
    }
}

impl TcpConn {
    /// The next message from the reader thread, waiting at most `limit` (`None`: for ever).
    fn next_msg(&self, limit: Option<Duration>) -> Result<Msg, CommError> {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let got = match limit {
            Some(t) => rx.recv_timeout(t),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(CommError::NoReply {
                peer: self.peer,
                addr: self.addr.clone(),
                ms: self.timeout.as_millis() as u64,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(CommError::Closed {
                peer: self.peer,
                addr: self.addr.clone(),
                detail: "the connection ended".into(),
            }),
        }
    }
}

/// Every live connection of this process, for [`abort_all`].
static CONNS: Mutex<Vec<std::sync::Weak<TcpConn>>> = Mutex::new(Vec::new());

/// Tell every connected peer that this process is failing, and why (best effort, never
/// blocks on a busy link): a peer that learns it this way reports the root cause rather than
/// only "connection closed".
pub fn abort_all(reason: &str) {
    let conns: Vec<Arc<TcpConn>> = CONNS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|c| c.upgrade())
        .collect();
    for c in conns {
        if let Ok(mut w) = c.writer.try_lock() {
            let _ = w.s.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = w.write_frame(wire::encode(&Msg::Abort(reason.to_string())));
        }
    }
}

/// Where to reach one peer.
#[derive(Debug, Clone)]
pub struct PeerEndpoint {
    /// Its rank.
    pub id: RankId,
    /// Host name or IP.
    pub host: String,
    /// Peer port.
    pub port: u16,
}

/// Open the peer listener on every address (before loading the model, so peers that are faster
/// can dial).
pub fn listen(port: u16) -> Result<TcpListener, CommError> {
    listen_on("0.0.0.0", port)
}

/// Open the peer listener on `host` only: processes that share one network (the e2e process
/// kubelet gives each pod its own loopback address) each bind their own address, so two stages
/// can use the same peer port.
pub fn listen_on(host: &str, port: u16) -> Result<TcpListener, CommError> {
    TcpListener::bind((host, port)).map_err(|source| CommError::Listen { port, source })
}

/// Connect this rank (`me`) to every peer in `peers`: dial those ordered before `me`, accept
/// those after it on `listener`. Waits at most `opts.timeout`.
pub fn connect(
    me: RankId,
    listener: TcpListener,
    peers: &[PeerEndpoint],
    opts: &TcpOptions,
) -> Result<HashMap<RankId, Arc<TcpConn>>, CommError> {
    let began = Instant::now();
    let deadline = opts
        .connect_by
        .map_or(began + opts.timeout, |by| by.max(began + opts.timeout));
    let window_ms = deadline.saturating_duration_since(began).as_millis() as u64;
    let port = listener.local_addr().map_or(0, |a| a.port());
    let expected: Vec<RankId> = peers.iter().map(|p| p.id).filter(|&id| id > me).collect();
    let acc_opts = opts.clone();
    let acceptor = std::thread::Builder::new()
        .name("wf-peer-accept".into())
        .spawn(move || -> Result<Vec<(RankId, TcpStream, SessionKeys)>, CommError> {
            let mut got: Vec<(RankId, TcpStream, SessionKeys)> = Vec::new();
            listener
                .set_nonblocking(true)
                .map_err(|source| CommError::Listen { port, source })?;
            // Each handshake runs on its own thread within its own deadline, so a peer that
            // drips bytes holds only its own connection, never the others' formation.
            type Done = (SocketAddr, TcpStream, Result<(RankId, SessionKeys), String>);
            let (done_tx, done_rx) = channel::<Done>();
            while got.len() < expected.len() {
                while let Ok((from, s, r)) = done_rx.try_recv() {
                    match r {
                        Ok((who, keys)) if expected.contains(&who) => {
                            got.retain(|(g, _, _)| *g != who);
                            got.push((who, s, keys));
                        }
                        Ok((who, _)) => {
                            tracing::warn!(%from, %who, "refused a peer this rank does not talk to")
                        }
                        Err(reason) => tracing::warn!(%from, %reason, "refused a peer connection"),
                    }
                }
                if got.len() >= expected.len() {
                    break;
                }
                let missing = || {
                    expected
                        .iter()
                        .copied()
                        .find(|id| !got.iter().any(|(g, _, _)| g == id))
                        .unwrap_or(me)
                };
                if Instant::now() >= deadline {
                    return Err(CommError::NoDialIn {
                        peer: missing(),
                        port,
                        ms: window_ms,
                    });
                }
                match listener.accept() {
                    Ok((mut s, from)) => {
                        let _ = s.set_nonblocking(false);
                        let (tx, o) = (done_tx.clone(), acc_opts.clone());
                        let _ = std::thread::Builder::new()
                            .name("wf-peer-handshake".into())
                            .spawn(move || {
                                let until = Instant::now() + HANDSHAKE_DEADLINE;
                                let r = handshake_accept(&mut Bounded { s: &mut s, until }, &o);
                                let _ = tx.send((from, s, r));
                            });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(source) => return Err(CommError::Listen { port, source }),
                }
            }
            Ok(got)
        })
        .map_err(|source| CommError::Listen { port, source })?;
    let mut out = HashMap::new();
    for p in peers.iter().filter(|p| p.id < me) {
        let (stream, keys) = dial(me, p, opts, deadline)?;
        out.insert(p.id, TcpConn::start(p.id, stream, &keys, opts)?);
    }
    let accepted = acceptor.join().map_err(|_| CommError::Handshake {
        addr: format!("port {port}"),
        reason: "the accept thread panicked".into(),
    })??;
    for (id, s, keys) in accepted {
        out.insert(id, TcpConn::start(id, s, &keys, opts)?);
    }
    Ok(out)
}

fn dial(
    me: RankId,
    p: &PeerEndpoint,
    opts: &TcpOptions,
    deadline: Instant,
) -> Result<(TcpStream, SessionKeys), CommError> {
    let mut last = String::from("not tried");
    let mut refusal: Option<String> = None;
    let mut logged = false;
    while Instant::now() < deadline {
        let addrs: Vec<SocketAddr> = match super::dns::resolve(&p.host, p.port) {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                last = "the name has no address yet".into();
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => {
                last = format!("cannot resolve {}: {e}", p.host);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        for a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(
                a,
                left.clamp(Duration::from_millis(1), Duration::from_secs(2)),
            ) {
                Ok(mut s) => {
                    let _ = s.set_nodelay(true);
                    let until = Instant::now() + HANDSHAKE_DEADLINE;
                    match handshake_dial(&mut Bounded { s: &mut s, until }, me, opts) {
                        Ok(keys) => {
                            tracing::info!(peer = %p.id, addr = %a, "connected to peer");
                            return Ok((s, keys));
                        }
                        Err(e) => {
                            let e = format!("handshake with {a}: {e}");
                            // A peer that answered and refused says more than a later attempt
                            // cut short (its listener closing at its own deadline).
                            if refusal.is_none() && !e.contains("no handshake reply") {
                                refusal = Some(e.clone());
                            }
                            last = e;
                        }
                    }
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        if !logged {
            tracing::info!(peer = %p.id, host = %p.host, port = p.port, reason = %last, "waiting for peer");
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(CommError::Connect {
        peer: p.id,
        addr: format!("{}:{}", p.host, p.port),
        ms: opts.timeout.as_millis() as u64,
        reason: refusal.unwrap_or(last),
    })
}

/// Tensor-parallel collectives over TCP: every rank sends its part to every other rank and sums
/// all parts in rank order (one round trip; identical results on every rank).
pub struct TcpGroup {
    rank: usize,
    size: usize,
    peers: Vec<Option<Arc<TcpConn>>>,
}

impl TcpGroup {
    /// `conns` must hold a connection to every other rank of the stage.
    pub fn new(me: RankId, size: usize, conns: &HashMap<RankId, Arc<TcpConn>>) -> Self {
        let peers = (0..size)
            .map(|r| {
                conns
                    .get(&RankId {
                        stage: me.stage,
                        tp_rank: r,
                    })
                    .cloned()
            })
            .collect();
        Self {
            rank: me.tp_rank,
            size,
            peers,
        }
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.size <= 1 {
            return Ok(());
        }
        let msg = Msg::Reduce(buf.to_vec());
        for p in self.peers.iter().flatten() {
            p.send(&msg)?;
        }
        let Msg::Reduce(mine) = msg else {
            unreachable!("built above")
        };
        let mut parts: Vec<Vec<f32>> = Vec::with_capacity(self.size);
        for (r, p) in self.peers.iter().enumerate() {
            match p {
                None if r == self.rank => parts.push(mine.clone()),
                None => {
                    return Err(CommError::Protocol {
                        peer: RankId {
                            stage: 0,
                            tp_rank: r,
                        },
                        detail: "no connection to this rank".into(),
                    });
                }
                Some(c) => match c.recv_reply()? {
                    Msg::Reduce(v) if v.len() == buf.len() => parts.push(v),
                    other => {
                        return Err(CommError::Protocol {
                            peer: c.peer(),
                            detail: format!(
                                "expected an all-reduce part of {} values, got {}",
                                buf.len(),
                                other.kind()
                            ),
                        });
                    }
                },
            }
        }
        sum_in_rank_order(buf, parts.iter().map(|p| p.as_slice()));
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.all_reduce_sum(&mut [])
    }
}

#[cfg(test)]
#[path = "tcp_tests.rs"]
mod tests;
