//! Fuzz the peer handshake (`comm::handshake`) over in-memory streams.
//!
//! The first byte picks the mode:
//! - 0: this rank accepts, the rest is what the dialing peer sends;
//! - 1: this rank dials, the rest is what the listening peer answers;
//! - else: an honest dialer and an honest listener (groups, ranks and secrets from the input)
//!   talk through a man in the middle that flips the bytes the input names. Every byte either
//!   side sends is checked or covered by the other's MAC, so: the listener admits only the
//!   dialer's own identity, and only when nothing the dialer sent was changed; the dialer
//!   succeeds only when nothing the listener sent was changed; untouched, both succeed exactly
//!   when their groups and secrets agree, and then each side's sending key is the other's
//!   receiving key. None of this depends on the byte layout.
#![no_main]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use whaleflux_worker::comm::RankId;
use whaleflux_worker::comm::handshake::{handshake_accept, handshake_dial};
use whaleflux_worker::comm::tcp::TcpOptions;

/// Options as a worker builds them (from the environment), with this group and secret.
fn opts(group: i32, secret: &[u8]) -> TcpOptions {
    static BASE: OnceLock<TcpOptions> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        // SAFETY: set once, before any thread of this target reads the environment.
        unsafe { std::env::set_var("WHALEFLUX_GROUP_SECRET", "unused") };
        TcpOptions::from_env(0, Duration::from_secs(1)).expect("options from the environment")
    });
    TcpOptions {
        group,
        secret: secret.to_vec(),
        ..base.clone()
    }
}

/// A peer that says the fuzzer's bytes and swallows whatever it is told.
struct Scripted<'a> {
    input: &'a [u8],
    written: Vec<u8>,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One end of an in-memory duplex pipe; bytes it writes pass through `tamper` (the byte's
/// offset in this direction's stream, and the byte).
struct End {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    pending: VecDeque<u8>,
    sent: usize,
    flips: Vec<(usize, u8)>,
    /// Whether a flip changed a byte this end really sent.
    tampered: bool,
}

impl Read for End {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            match self.rx.recv_timeout(Duration::from_secs(5)) {
                Ok(v) => self.pending.extend(v),
                // The other side returned: end of stream.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(0),
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            }
        }
        let n = buf.len().min(self.pending.len());
        for (b, p) in buf.iter_mut().zip(self.pending.drain(..n)) {
            *b = p;
        }
        Ok(n)
    }
}

impl Write for End {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut v = buf.to_vec();
        for (i, b) in v.iter_mut().enumerate() {
            for &(at, x) in &self.flips {
                if at == self.sent + i {
                    *b ^= x;
                    self.tampered = true;
                }
            }
        }
        self.sent += v.len();
        self.tx
            .send(v)
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn pipe(dial_flips: Vec<(usize, u8)>, accept_flips: Vec<(usize, u8)>) -> (End, End) {
    let (a_tx, b_rx) = channel();
    let (b_tx, a_rx) = channel();
    (
        End {
            tx: a_tx,
            rx: a_rx,
            pending: VecDeque::new(),
            sent: 0,
            flips: dial_flips,
            tampered: false,
        },
        End {
            tx: b_tx,
            rx: b_rx,
            pending: VecDeque::new(),
            sent: 0,
            flips: accept_flips,
            tampered: false,
        },
    )
}

#[derive(Arbitrary, Debug)]
struct Meddled {
    dial_group: i8,
    accept_group: i8,
    stage: u16,
    tp_rank: u16,
    same_secret: bool,
    /// (offset, xor) on the bytes the dialer sends.
    dial_flips: Vec<(u8, u8)>,
    /// (offset, xor) on the bytes the listener sends.
    accept_flips: Vec<(u8, u8)>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let o = opts(0, b"s3cret");
    match mode {
        0 => {
            let mut peer = Scripted {
                input: rest,
                written: Vec::new(),
            };
            // The fuzzer cannot forge the HMAC over this side's fresh nonce.
            let r = handshake_accept(&mut peer, &o);
            assert!(
                r.is_err(),
                "admitted a peer that cannot know the secret: {r:?}"
            );
        }
        1 => {
            let mut peer = Scripted {
                input: rest,
                written: Vec::new(),
            };
            let me = RankId {
                stage: 1,
                tp_rank: 2,
            };
            let r = handshake_dial(&mut peer, me, &o);
            assert!(r.is_err(), "trusted a listener that cannot know the secret");
            assert!(peer.written.starts_with(b"WFLX"));
        }
        _ => {
            let Ok(m) = Meddled::arbitrary_take_rest(Unstructured::new(rest)) else {
                return;
            };
            // One XOR per offset (two flips of one byte may cancel), none that change nothing.
            let flips = |f: &[(u8, u8)]| -> Vec<(usize, u8)> {
                let mut by_offset = std::collections::BTreeMap::new();
                for &(at, x) in f.iter().take(4) {
                    *by_offset.entry(usize::from(at)).or_insert(0u8) ^= x;
                }
                by_offset.into_iter().filter(|&(_, x)| x != 0).collect()
            };
            let (df, af) = (flips(&m.dial_flips), flips(&m.accept_flips));
            let me = RankId {
                stage: m.stage.into(),
                tp_rank: m.tp_rank.into(),
            };
            let dial_opts = opts(m.dial_group.into(), b"s3cret");
            let accept_opts = opts(
                m.accept_group.into(),
                if m.same_secret { b"s3cret" } else { b"other!" },
            );
            let (mut d, mut a) = pipe(df, af);
            let ((dialed, dial_tampered), (accepted, accept_tampered)) = std::thread::scope(|s| {
                let dialer = s.spawn(move || {
                    let r = handshake_dial(&mut d, me, &dial_opts);
                    (r, d.tampered)
                });
                let r = handshake_accept(&mut a, &accept_opts);
                let tampered = a.tampered;
                drop(a);
                (dialer.join().expect("the dialer panicked"), (r, tampered))
            });
            let agree = m.same_secret && m.dial_group == m.accept_group;
            if let Ok((who, _)) = &accepted {
                assert_eq!(*who, me, "admitted a peer under another identity");
                assert!(agree, "admitted a peer of another group or secret");
                assert!(!dial_tampered, "admitted a dialer whose bytes were changed");
            }
            if dialed.is_ok() {
                assert!(agree, "joined a listener of another group or secret");
                assert!(
                    !accept_tampered,
                    "trusted a listener whose bytes were changed"
                );
            }
            if !dial_tampered && !accept_tampered {
                assert_eq!(accepted.is_ok(), agree, "listener: {accepted:?}");
                assert_eq!(dialed.is_ok(), agree, "dialer: {dialed:?}");
            }
            if let (Ok((_, theirs)), Ok(ours)) = (&accepted, &dialed) {
                assert!(
                    ours.send == theirs.recv && ours.recv == theirs.send && ours.send != ours.recv,
                    "the two ends derived different frame keys"
                );
            }
        }
    }
});
