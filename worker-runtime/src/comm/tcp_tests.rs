//! Tests of the TCP transport: handshakes, formation deadlines, refusals, all-reduce.
use super::*;
use crate::comm::handshake::{MAGIC, NONCE, VERSION, version_mismatch};

fn opts(secret: &str) -> TcpOptions {
    TcpOptions {
        group: 0,
        secret: secret.as_bytes().to_vec(),
        timeout: Duration::from_secs(5),
        on_fail: None,
        connect_by: None,
        config_digest: [0; DIGEST],
    }
}

fn rank(r: usize) -> RankId {
    RankId {
        stage: 0,
        tp_rank: r,
    }
}

fn mesh(n: usize, secret: &[&str]) -> Vec<Result<HashMap<RankId, Arc<TcpConn>>, CommError>> {
    mesh_with(n, |r| opts(secret[r]))
}

fn mesh_with(
    n: usize,
    opts_of: impl Fn(usize) -> TcpOptions,
) -> Vec<Result<HashMap<RankId, Arc<TcpConn>>, CommError>> {
    mesh_on(
        (0..n).map(|_| listen(0).expect("listen")).collect(),
        opts_of,
    )
}

/// Every rank of `listeners` connected to every other, each on its own thread.
fn mesh_on(
    listeners: Vec<TcpListener>,
    opts_of: impl Fn(usize) -> TcpOptions,
) -> Vec<Result<HashMap<RankId, Arc<TcpConn>>, CommError>> {
    let eps: Vec<PeerEndpoint> = listeners
        .iter()
        .enumerate()
        .map(|(r, l)| PeerEndpoint {
            id: rank(r),
            host: "127.0.0.1".into(),
            port: l.local_addr().expect("addr").port(),
        })
        .collect();
    std::thread::scope(|sc| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let others: Vec<PeerEndpoint> =
                    eps.iter().filter(|e| e.id != rank(r)).cloned().collect();
                let mut o = opts_of(r);
                o.timeout = Duration::from_secs(2);
                sc.spawn(move || connect(rank(r), l, &others, &o))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    })
}

/// Gang start: rank 0 waits for a rank that starts dialing after its step timeout, up to
/// the group's formation deadline; past it, it fails naming the missing rank.
#[test]
fn a_slow_loading_peer_is_awaited_until_the_formation_deadline() {
    let form = |late: Duration, by: Duration| {
        let l0 = listen(0).expect("listen");
        let l1 = listen(0).expect("listen");
        let ep = |r: usize, l: &TcpListener| PeerEndpoint {
            id: rank(r),
            host: "127.0.0.1".into(),
            port: l.local_addr().expect("addr").port(),
        };
        let (e0, e1) = (ep(0, &l0), ep(1, &l1));
        std::thread::scope(|sc| {
            let first = sc.spawn(move || {
                let mut o = opts("s");
                o.timeout = Duration::from_millis(200);
                o.connect_by = Some(Instant::now() + by);
                connect(rank(0), l0, &[e1], &o).map(|c| c.len())
            });
            let slow = sc.spawn(move || {
                std::thread::sleep(late);
                let mut o = opts("s");
                o.timeout = Duration::from_secs(2);
                connect(rank(1), l1, &[e0], &o).map(|c| c.len())
            });
            (first.join().expect("rank 0"), slow.join().expect("rank 1"))
        })
    };
    let (a, b) = form(Duration::from_millis(700), Duration::from_secs(3));
    assert_eq!(
        (a.ok(), b.ok()),
        (Some(1), Some(1)),
        "formed within the deadline"
    );
    let (a, _) = form(Duration::from_millis(1500), Duration::from_millis(500));
    let err = a.expect_err("past the deadline");
    assert!(matches!(err, CommError::NoDialIn { .. }), "{err}");
}

#[test]
fn tcp_all_reduce_over_a_mesh_of_three_ranks() {
    let conns: Vec<_> = mesh(3, &["s3cret"; 3])
        .into_iter()
        .map(|c| c.expect("connected"))
        .collect();
    let outs: Vec<Vec<f32>> = std::thread::scope(|sc| {
        let hs: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(r, c)| {
                sc.spawn(move || {
                    let g = TcpGroup::new(rank(r), 3, c);
                    let mut b = vec![r as f32 + 0.5; 1000];
                    g.all_reduce_sum(&mut b).expect("reduce");
                    g.barrier().expect("barrier");
                    b
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    for o in outs {
        assert!(o.iter().all(|&v| v == 4.5), "{:?}", &o[..3]);
    }
}

#[test]
fn a_peer_without_the_secret_is_refused_and_named() {
    let res = mesh(2, &["right", "wrong"]);
    // Rank 1 (wrong secret) dials rank 0 and refuses its proof, naming it and why.
    match res[1].as_ref().err() {
        Some(CommError::Connect { peer, reason, .. }) => {
            assert_eq!(*peer, rank(0));
            assert!(
                reason.contains("does not know the group secret"),
                "{reason}"
            );
        }
        other => panic!(
            "rank 1 must refuse rank 0's proof, got {:?}",
            other.map(|e| e.to_string())
        ),
    }
    // Rank 0 admits nobody: rank 1 never dialled in with a valid proof.
    match res[0].as_ref().err() {
        Some(CommError::NoDialIn { peer, .. }) => assert_eq!(*peer, rank(1)),
        other => panic!(
            "rank 0 must not admit rank 1, got {:?}",
            other.map(|e| e.to_string())
        ),
    }
}

/// Ranks of two configurations (a rollout half done) know the secret but refuse to form,
/// each naming both digests.
#[test]
fn ranks_of_two_configurations_refuse_to_form_naming_both() {
    let res = mesh_with(2, |r| TcpOptions {
        config_digest: [r as u8 + 1; DIGEST],
        ..opts("s")
    });
    match res[1].as_ref().err() {
        Some(CommError::Connect { peer, reason, .. }) => {
            assert_eq!(*peer, rank(0));
            assert!(
                reason
                    .contains("group configuration 0101010101010101, this worker 0202020202020202"),
                "{reason}"
            );
        }
        other => panic!("rank 1 must refuse, got {:?}", other.map(|e| e.to_string())),
    }
    assert!(res[0].is_err(), "rank 0 must not admit rank 1");
}

/// A connection that drips its hello a byte at a time neither holds the others' formation
/// nor lives past the handshake deadline.
#[test]
fn a_peer_that_drips_bytes_cannot_hold_formation() {
    let listeners: Vec<TcpListener> = (0..2).map(|_| listen(0).expect("listen")).collect();
    let port0 = listeners[0].local_addr().expect("addr").port();
    // The drip starts first, so an acceptor that handshakes one connection at a time
    // would serve it before the honest rank.
    let drip = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port0)).expect("connect");
        let t0 = Instant::now();
        for b in MAGIC.iter().chain([VERSION].iter()).cycle().take(200) {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            if t0.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        t0.elapsed()
    });
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let res = mesh_on(listeners, |_| opts("s"));
    assert!(res.iter().all(Result::is_ok), "the group formed");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "formation waited {:?} for a dripping peer",
        t0.elapsed()
    );
    let dripped = drip.join().expect("drip");
    assert!(
        dripped < HANDSHAKE_DEADLINE + Duration::from_secs(2),
        "the dripping connection lived {dripped:?}"
    );
}

/// A peer of another protocol version is refused, and both sides learn both versions.
#[test]
fn a_peer_of_another_protocol_version_is_refused_naming_both() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let old = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut hello = MAGIC.to_vec();
        hello.push(1);
        hello.extend_from_slice(&[0u8; 12 + NONCE]);
        s.write_all(&hello).expect("hello");
        let mut v = [0u8; 1];
        s.read_exact(&mut v).map(|()| v[0]).ok()
    });
    let (mut s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let err = handshake_accept(&mut s, &opts("s")).expect_err("version 1");
    assert!(
        err.contains(&format!("peer protocol version 1, this worker {VERSION}")),
        "{err}"
    );
    assert_eq!(old.join().expect("old peer"), Some(VERSION));
    // And a dialer told another version by its listener names both too.
    let other = VERSION + 1;
    assert!(version_mismatch(other).contains(&format!("version {other}, this worker {VERSION}")));
}

/// A dialer that says the right hello but cannot prove the secret is refused by the
/// listener (the check an honest dialer with a wrong secret never reaches).
#[test]
fn the_listener_refuses_a_dialer_that_cannot_prove_the_secret() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let rogue = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut hello = MAGIC.to_vec();
        hello.push(VERSION);
        hello.extend_from_slice(&0i32.to_le_bytes());
        hello.extend_from_slice(&0u32.to_le_bytes());
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&[0u8; DIGEST]);
        hello.extend_from_slice(&[7u8; NONCE]);
        s.write_all(&hello).expect("hello");
        let mut reply = [0u8; 1 + DIGEST + NONCE + 32];
        s.read_exact(&mut reply).expect("the listener's proof");
        s.write_all(&[0u8; 32]).expect("a made-up proof");
        let mut ok = [0u8; 1];
        s.read(&mut ok).map(|n| (n, ok[0])).ok()
    });
    let (mut s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let err = handshake_accept(&mut s, &opts("right")).expect_err("a made-up proof");
    assert!(err.contains("does not know the group secret"), "{err}");
    drop(s);
    let told = rogue.join().expect("rogue");
    assert_ne!(told, Some((1, 1)), "the rogue was told it was admitted");
}

#[test]
fn a_dead_peer_fails_the_receiver_fast_and_names_it() {
    let mut conns: Vec<_> = mesh(2, &["s"; 2])
        .into_iter()
        .map(|c| c.expect("connected"))
        .collect();
    let c1 = conns.pop().expect("rank 1");
    let c0 = conns.pop().expect("rank 0");
    let link = c0.get(&rank(1)).expect("link").clone();
    let t0 = Instant::now();
    drop(c1);
    let err = link.recv().expect_err("peer is gone");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(err.to_string().contains("stage 0 TP rank 1"), "{err}");
}

/// Rank 0 accepts rank 1 on a real listener, while the test plays rank 1 by hand on a raw
/// socket: the handshake from this module, then whatever frames the test writes. Returns
/// rank 0's link to rank 1, the raw socket and rank 1's keys.
fn hand_played_peer(timeout: Duration) -> (Arc<TcpConn>, TcpStream, SessionKeys) {
    let l = listen_on("127.0.0.1", 0).expect("listen");
    let port = l.local_addr().expect("addr").port();
    let me = std::thread::spawn(move || {
        let mut o = opts("s");
        o.timeout = timeout;
        let ep = PeerEndpoint {
            id: rank(1),
            host: "127.0.0.1".into(),
            port: 0,
        };
        connect(rank(0), l, &[ep], &o).expect("rank 0 formed")
    });
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("dial");
    let keys = handshake_dial(&mut s, rank(1), &opts("s")).expect("handshake");
    let link = me.join().expect("rank 0")[&rank(1)].clone();
    (link, s, keys)
}

/// Frames after the handshake carry a tag over their sequence number: a frame tagged with the
/// link's key is taken; one altered, replayed or tagged with another key ends the link with an
/// error saying so (a host that cannot know the secret cannot inject into a formed group).
#[test]
fn frames_must_carry_the_links_tag_in_order() {
    let frame = |seal: &mut Sealer, m: &Msg| {
        let mut f = wire::encode(m);
        seal.seal(&mut f);
        f
    };
    // Taken in order.
    let (link, mut s, keys) = hand_played_peer(Duration::from_secs(5));
    let mut seal = Sealer::new(&keys);
    let first = frame(&mut seal, &Msg::Ready);
    s.write_all(&first).expect("write");
    s.write_all(&frame(&mut seal, &Msg::Reduce(vec![1.5])))
        .expect("write");
    assert_eq!(link.recv().expect("ready"), Msg::Ready);
    assert_eq!(link.recv().expect("reduce"), Msg::Reduce(vec![1.5]));
    // A replay of the first frame is refused.
    s.write_all(&first).expect("write");
    let err = link.recv().expect_err("a replayed frame");
    assert!(err.to_string().contains("frame 2 fails its tag"), "{err}");

    // One bit changed in the activations.
    let (link, mut s, keys) = hand_played_peer(Duration::from_secs(5));
    let mut f = frame(&mut Sealer::new(&keys), &Msg::Reduce(vec![1.5, 2.5]));
    f[12] ^= 1;
    s.write_all(&f).expect("write");
    let err = link.recv().expect_err("an altered frame");
    assert!(err.to_string().contains("fails its tag"), "{err}");

    // Tagged with the key of another link (or no key at all: an untagged frame).
    let (link, mut s, keys) = hand_played_peer(Duration::from_secs(5));
    let other = SessionKeys {
        send: keys.recv,
        recv: keys.send,
    };
    s.write_all(&frame(&mut Sealer::new(&other), &Msg::Ready))
        .expect("write");
    let err = link.recv().expect_err("another key");
    assert!(err.to_string().contains("fails its tag"), "{err}");
    let (link, mut s, _) = hand_played_peer(Duration::from_secs(5));
    s.write_all(&wire::encode(&Msg::Reduce(vec![0.0; 8])))
        .expect("write");
    assert!(link.recv().is_err(), "an untagged frame was taken");
}

/// A peer whose heartbeats flow but which never sends the all-reduce part it owes: the wait
/// inside the step fails within the peer timeout, naming it, instead of hanging.
#[test]
fn a_peer_that_heartbeats_but_never_replies_fails_the_step_within_the_timeout() {
    let timeout = Duration::from_millis(600);
    let (link, s, keys) = hand_played_peer(timeout);
    let stop = Arc::new(AtomicBool::new(false));
    let beat = {
        let stop = stop.clone();
        let mut s = s.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut seal = Sealer::new(&keys);
            while !stop.load(Ordering::SeqCst) {
                let mut f = wire::heartbeat().to_vec();
                seal.seal(&mut f);
                if s.write_all(&f).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let group = TcpGroup::new(rank(0), 2, &HashMap::from([(rank(1), link.clone())]));
    let t0 = Instant::now();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut buf = [1.0f32; 4];
        let _ = tx.send(group.all_reduce_sum(&mut buf));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the all-reduce still waits 10 s on a peer that never answers");
    let err = r.expect_err("no part came");
    let took = t0.elapsed();
    assert!(matches!(err, CommError::NoReply { .. }), "{err}");
    assert!(err.to_string().contains("stage 0 TP rank 1"), "{err}");
    assert!(
        took >= timeout && took < timeout * 4,
        "failed after {took:?}, the timeout is {timeout:?}"
    );
    // Heartbeats alone kept the link itself alive: an idle wait is not bounded.
    assert!(
        link.rx
            .lock()
            .expect("rx")
            .recv_timeout(Duration::from_millis(800))
            .is_err_and(|e| e == RecvTimeoutError::Timeout),
        "the link failed while heartbeats flowed"
    );
    stop.store(true, Ordering::SeqCst);
    beat.join().expect("heartbeats");
    let _ = s.shutdown(Shutdown::Both);
}
