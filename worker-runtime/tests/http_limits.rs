//! The worker's HTTP port under clients that hold it: headers that never finish, a body that
//! never arrives, more connections than the limit. Raw TCP sockets against the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::procs::WorkerProc;

fn scratch() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wf-http-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// Reads until the server closes (or `within` passes); returns what came and when it ended.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, Option<Duration>) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&out).into(), Some(t0.elapsed())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (String::from_utf8_lossy(&out).into(), Some(t0.elapsed())),
        }
    }
    (String::from_utf8_lossy(&out).into(), None)
}

#[test]
fn slow_heads_and_bodies_are_cut_and_connections_are_limited() {
    let dir = scratch();
    let w = WorkerProc::start(
        &dir,
        &[
            "--header-timeout-seconds".as_ref(),
            "1".as_ref(),
            "--body-timeout-seconds".as_ref(),
            "1".as_ref(),
            "--max-connections".as_ref(),
            "3".as_ref(),
        ],
        &[],
    );
    w.wait_for("ready", |w| w.get("/readyz").is_some());

    // Headers that never end: the connection is closed after the header deadline.
    let mut s = TcpStream::connect(&w.addr).expect("connect");
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .expect("partial head");
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(10));
    let closed = closed.expect("a connection with an unfinished head must be closed");
    assert!(closed < Duration::from_secs(4), "closed after {closed:?}");

    // A body that never arrives: 408 with an OpenAI error object.
    let mut s = TcpStream::connect(&w.addr).expect("connect");
    s.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .expect("partial body");
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // Three connections are the limit: a fourth waits until one of them closes. The held
    // ones each send a request head slowly enough not to finish, within the deadline.
    let hold: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut h = TcpStream::connect(&w.addr).expect("connect");
            h.write_all(b"GET /healthz HTTP/1.1\r\n").expect("start");
            h
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = TcpStream::connect(&w.addr).expect("the kernel queues it");
    fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    // The held ones are cut by the header deadline (1 s); until then the fourth waits.
    let t0 = Instant::now();
    let (answer, _) = read_until_closed(&mut fourth, Duration::from_secs(10));
    let waited = t0.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        waited >= Duration::from_millis(500),
        "the fourth connection was served at once ({waited:?}) past a limit of 3"
    );
    drop(hold);
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}
