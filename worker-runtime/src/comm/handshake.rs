//! The peer handshake and the per-connection frame keys. A dialer and a listener prove to each
//! other that they know the group secret (HMAC-SHA256 over fresh nonces from both sides), that
//! they speak one protocol version and run one group configuration; both then derive a session
//! key from the secret and both nonces, one key per direction. Every frame after the handshake
//! carries a tag over a per-direction sequence number and its bytes ([`Sealer`], [`Opener`]), so
//! a host on the pod network that cannot know the secret can neither inject, replay, reorder nor
//! alter activations, steps or logits on a formed link.
//!
//! Why tags and not TLS (rustls): the threat on the peer port is injection into a group, not
//! eavesdropping on activations inside the cluster network (a NetworkPolicy already limits the
//! port to the group's pods); TLS would need certificates per group (rustls has no external
//! PSK for TLS 1.3) and a crypto provider build (aws-lc-rs/ring) for what the shared secret and
//! the HMAC we already use give. With SHA extensions a tag costs ~1 ms per MB of frame.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::RankId;
use super::tcp::TcpOptions;

pub(crate) const MAGIC: &[u8; 4] = b"WFLX";
/// The peer protocol's version: the hello, the frames and the messages. Ranks of one group must
/// speak the same one (version 2 added the configuration digest to the hello; version 3 the
/// frame tags and the `formed` message).
pub const VERSION: u8 = 3;
pub(crate) const NONCE: usize = 32;
/// Bytes of a group configuration digest.
pub const DIGEST: usize = 8;
/// The hello after the magic and the version: group, stage, TP rank, digest, nonce.
pub(crate) const HELLO_REST: usize = 12 + DIGEST + NONCE;

type HmacSha256 = Hmac<Sha256>;

/// The HMAC of one handshake proof: who proves (`role`), in which group, for which rank, over
/// the challenge `a` and the answer `b`.
fn proof(secret: &[u8], role: u8, group: i32, who: RankId, a: &[u8], b: &[u8]) -> HmacSha256 {
    let mut m = keyed(secret);
    m.update(&[role]);
    m.update(&group.to_le_bytes());
    m.update(&(who.stage as u32).to_le_bytes());
    m.update(&(who.tp_rank as u32).to_le_bytes());
    m.update(a);
    m.update(b);
    m
}

fn mac(secret: &[u8], role: u8, group: i32, who: RankId, a: &[u8], b: &[u8]) -> [u8; 32] {
    proof(secret, role, group, who, a, b)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `tag` is the proof (compared in constant time).
fn verify(
    secret: &[u8],
    role: u8,
    group: i32,
    who: RankId,
    a: &[u8],
    b: &[u8],
    tag: &[u8],
) -> bool {
    proof(secret, role, group, who, a, b)
        .verify_slice(tag)
        .is_ok()
}

/// Dialer side: say who we are, check the listener knows the secret, prove we do; returns the
/// link's frame keys.
pub fn handshake_dial<S: Read + Write>(
    s: &mut S,
    me: RankId,
    opts: &TcpOptions,
) -> Result<SessionKeys, String> {
    let nd: [u8; NONCE] = rand::random();
    let mut hello = Vec::with_capacity(5 + HELLO_REST);
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.extend_from_slice(&opts.group.to_le_bytes());
    hello.extend_from_slice(&(me.stage as u32).to_le_bytes());
    hello.extend_from_slice(&(me.tp_rank as u32).to_le_bytes());
    hello.extend_from_slice(&opts.config_digest);
    hello.extend_from_slice(&nd);
    s.write_all(&hello).map_err(|e| e.to_string())?;
    // The listener answers its version first, so a mismatch is named on both sides.
    let mut version = [0u8; 1];
    s.read_exact(&mut version)
        .map_err(|e| format!("no handshake reply: {e}"))?;
    if version[0] != VERSION {
        return Err(version_mismatch(version[0]));
    }
    let mut reply = [0u8; DIGEST + NONCE + 32];
    s.read_exact(&mut reply)
        .map_err(|e| format!("no handshake reply: {e}"))?;
    let (digest, rest) = reply.split_at(DIGEST);
    let (nl, tag) = rest.split_at(NONCE);
    let theirs = [digest, nl].concat();
    if !verify(&opts.secret, b'L', opts.group, me, &nd, &theirs, tag) {
        return Err("the peer does not know the group secret".into());
    }
    if digest != opts.config_digest {
        return Err(digest_mismatch(digest, &opts.config_digest));
    }
    let ours = [&opts.config_digest[..], &nd].concat();
    s.write_all(&mac(&opts.secret, b'D', opts.group, me, nl, &ours))
        .map_err(|e| e.to_string())?;
    let mut ok = [0u8; 1];
    s.read_exact(&mut ok)
        .map_err(|e| format!("the peer refused us: {e}"))?;
    if ok[0] != 1 {
        return Err("the peer refused us".into());
    }
    Ok(Session::derive(opts, me, &nd, nl).dialer())
}

pub(crate) fn version_mismatch(theirs: u8) -> String {
    format!(
        "the peer speaks peer protocol version {theirs}, this worker {VERSION}: run one WhaleFlux version in every rank of a group"
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn digest_mismatch(theirs: &[u8], ours: &[u8]) -> String {
    format!(
        "the peer runs group configuration {}, this worker {}: ranks of two configurations (a rollout in progress, or a stale pod) cannot form one group",
        hex(theirs),
        hex(ours)
    )
}

/// Listener side: read who dials, prove we know the secret, check they do; returns who dialed
/// and the link's frame keys.
pub fn handshake_accept<S: Read + Write>(
    s: &mut S,
    opts: &TcpOptions,
) -> Result<(RankId, SessionKeys), String> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)
        .map_err(|e| format!("no hello: {e}"))?;
    if &head[..4] != MAGIC {
        return Err("not a WhaleFlux peer (bad magic)".into());
    }
    // Answer our version before anything else, so the dialer can say which versions differ.
    s.write_all(&[VERSION]).map_err(|e| e.to_string())?;
    if head[4] != VERSION {
        return Err(version_mismatch(head[4]));
    }
    let mut hello = [0u8; HELLO_REST];
    s.read_exact(&mut hello)
        .map_err(|e| format!("no hello: {e}"))?;
    let int = |i: usize| [hello[i], hello[i + 1], hello[i + 2], hello[i + 3]];
    let group = i32::from_le_bytes(int(0));
    let who = RankId {
        stage: u32::from_le_bytes(int(4)) as usize,
        tp_rank: u32::from_le_bytes(int(8)) as usize,
    };
    if group != opts.group {
        return Err(format!(
            "peer of replica group {group}, this is group {}",
            opts.group
        ));
    }
    let (digest, nd) = hello[12..].split_at(DIGEST);
    let nl: [u8; NONCE] = rand::random();
    let ours = [&opts.config_digest[..], &nl].concat();
    let mut reply = Vec::with_capacity(DIGEST + NONCE + 32);
    reply.extend_from_slice(&opts.config_digest);
    reply.extend_from_slice(&nl);
    reply.extend_from_slice(&mac(&opts.secret, b'L', group, who, nd, &ours));
    s.write_all(&reply).map_err(|e| e.to_string())?;
    let mut tag = [0u8; 32];
    s.read_exact(&mut tag)
        .map_err(|e| format!("no proof: {e}"))?;
    let theirs = [digest, nd].concat();
    if !verify(&opts.secret, b'D', group, who, &nl, &theirs, &tag) {
        return Err(format!("{who} does not know the group secret"));
    }
    if digest != opts.config_digest {
        return Err(format!(
            "{who}: {}",
            digest_mismatch(digest, &opts.config_digest)
        ));
    }
    s.write_all(&[1]).map_err(|e| e.to_string())?;
    Ok((who, Session::derive(opts, who, nd, &nl).listener()))
}

/// How long one handshake may take in all, however its peer paces its bytes.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// A stream whose reads and writes all end by `until`: each sets its socket timeout to the
/// time left, so a peer that sends a byte now and then cannot stretch a handshake.
pub(crate) struct Bounded<'a> {
    pub(crate) s: &'a mut TcpStream,
    pub(crate) until: Instant,
}

impl Bounded<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the handshake took more than {} s",
                    HANDSHAKE_DEADLINE.as_secs()
                ),
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.s.set_read_timeout(Some(left))?;
        self.s.read(buf)
    }
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.s.set_write_timeout(Some(left))?;
        self.s.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// Bytes of a frame's tag (HMAC-SHA256 truncated, as RFC 2104 allows down to half the output).
pub const TAG: usize = 16;

/// The two frame keys of one link, from this end's point of view.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Tags frames this end sends.
    pub send: [u8; 32],
    /// Checks frames this end receives.
    pub recv: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// The session secret of one link and its dialer, before it is split by direction.
struct Session([u8; 32]);

impl Session {
    /// Both nonces are fresh per connection, so every link (and every reconnection) gets its own
    /// keys, and frames of one link are worthless on another.
    fn derive(opts: &TcpOptions, dialer: RankId, nd: &[u8], nl: &[u8]) -> Session {
        Session(mac(
            &opts.secret,
            b'S',
            opts.group,
            dialer,
            &[nd, nl].concat(),
            &opts.config_digest,
        ))
    }

    fn key(&self, direction: &[u8]) -> [u8; 32] {
        let mut m = keyed(&self.0);
        m.update(direction);
        m.finalize().into_bytes().into()
    }

    fn dialer(self) -> SessionKeys {
        SessionKeys {
            send: self.key(b"dialer to listener"),
            recv: self.key(b"listener to dialer"),
        }
    }

    fn listener(self) -> SessionKeys {
        SessionKeys {
            send: self.key(b"listener to dialer"),
            recv: self.key(b"dialer to listener"),
        }
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// Tags the frames one end sends, numbering them.
pub struct Sealer {
    key: HmacSha256,
    seq: u64,
}

impl Sealer {
    /// A sealer for the frames sent with `keys`.
    pub fn new(keys: &SessionKeys) -> Self {
        Self {
            key: keyed(&keys.send),
            seq: 0,
        }
    }

    /// Append the tag to a whole frame (`u32` length prefix and body, as [`super::wire::encode`]
    /// makes it) and fix the length to include it.
    pub fn seal(&mut self, frame: &mut Vec<u8>) {
        let mut m = self.key.clone();
        m.update(&self.seq.to_le_bytes());
        m.update(&frame[4..]);
        let tag = m.finalize().into_bytes();
        frame.extend_from_slice(&tag[..TAG]);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        self.seq += 1;
    }
}

/// Checks the frames one end receives, in order.
pub struct Opener {
    key: HmacSha256,
    seq: u64,
}

impl Opener {
    /// An opener for the frames received with `keys`.
    pub fn new(keys: &SessionKeys) -> Self {
        Self {
            key: keyed(&keys.recv),
            seq: 0,
        }
    }

    /// The body of a received frame (what followed the length prefix) without its tag, when the
    /// tag is right for the next sequence number.
    pub fn open<'a>(&mut self, frame: &'a [u8]) -> Result<&'a [u8], String> {
        if frame.len() <= TAG {
            return Err(format!(
                "frame {} of {} bytes is shorter than its tag",
                self.seq,
                frame.len()
            ));
        }
        let (body, tag) = frame.split_at(frame.len() - TAG);
        let mut m = self.key.clone();
        m.update(&self.seq.to_le_bytes());
        m.update(body);
        m.verify_truncated_left(tag).map_err(|_| {
            format!(
                "frame {} fails its tag: it was altered, replayed or sent by someone without this link's key",
                self.seq
            )
        })?;
        self.seq += 1;
        Ok(body)
    }
}
