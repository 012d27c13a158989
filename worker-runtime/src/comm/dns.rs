//! Finding a peer's address. Pods name their peers through the headless Service
//! (`sts-1.headless.ns.svc.cluster.local`); the system resolver answers that in a cluster. When
//! `WHALEFLUX_DNS_SERVER` is set (the test kubelet gives each pod its own DNS server instead of
//! touching the machine's resolver), an A query is sent to that server over UDP.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

/// Environment variable naming a DNS server (`ip:port`) to ask instead of the system resolver.
pub const DNS_SERVER_ENV: &str = "WHALEFLUX_DNS_SERVER";

/// Addresses of `host:port`. An empty list means the name exists but has no address yet (a pod
/// that is not scheduled); callers retry.
pub fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    match std::env::var(DNS_SERVER_ENV) {
        Ok(server) if !server.is_empty() => {
            let server: SocketAddr = server
                .parse()
                .map_err(|e| format!("{DNS_SERVER_ENV}={server:?} is not ip:port: {e}"))?;
            Ok(query_a(server, host, Duration::from_secs(1))?
                .into_iter()
                .map(|ip| SocketAddr::new(ip.into(), port))
                .collect())
        }
        _ => (host, port)
            .to_socket_addrs()
            .map(|a| a.collect())
            .map_err(|e| e.to_string()),
    }
}

/// Ask `server` for the A records of `name`.
pub fn query_a(server: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<Ipv4Addr>, String> {
    let id: u16 = rand::random();
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} is not a valid DNS name"));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let sock = UdpSocket::bind(bind).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    sock.send_to(&q, server)
        .map_err(|e| format!("cannot ask {server}: {e}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("no answer from {server}: {e}"))?;
        if from != server || n < 12 || buf[..2] != id.to_be_bytes() {
            continue;
        }
        return parse_answer(&buf[..n]);
    }
}

fn skip_name(b: &[u8], mut i: usize) -> Result<usize, String> {
    loop {
        let len = *b.get(i).ok_or("truncated name")? as usize;
        if len == 0 {
            return Ok(i + 1);
        }
        if len & 0xC0 == 0xC0 {
            return Ok(i + 2);
        }
        i += 1 + len;
    }
}

fn parse_answer(b: &[u8]) -> Result<Vec<Ipv4Addr>, String> {
    let rcode = b[3] & 0x0F;
    if rcode == 3 {
        return Ok(Vec::new());
    }
    if rcode != 0 {
        return Err(format!("DNS error code {rcode}"));
    }
    let qd = u16::from_be_bytes([b[4], b[5]]) as usize;
    let an = u16::from_be_bytes([b[6], b[7]]) as usize;
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(b, i)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(b, i)?;
        let rr = b.get(i..i + 10).ok_or("truncated record")?;
        let (ty, len) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            u16::from_be_bytes([rr[8], rr[9]]) as usize,
        );
        i += 10;
        let data = b.get(i..i + len).ok_or("truncated record data")?;
        if ty == 1 && len == 4 {
            out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_the_configured_server_and_reads_its_a_records() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = server.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).expect("query");
            let q = &buf[..n];
            // Echo the question, answer with a compressed name pointing at it.
            let mut r = q.to_vec();
            r[2] = 0x81;
            r[3] = 0x80;
            r[7] = 1;
            r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 9]);
            server.send_to(&r, from).expect("answer");
            String::from_utf8_lossy(&q[13..q.len() - 5]).into_owned()
        });
        let ips = query_a(
            addr,
            "sts-1.headless.ns.svc.cluster.local",
            Duration::from_secs(2),
        )
        .expect("answer");
        assert_eq!(ips, vec![Ipv4Addr::new(127, 0, 0, 9)]);
        assert!(t.join().expect("server").contains("headless"));
        assert_eq!(
            resolve("127.0.0.3", 80).expect("ip"),
            vec!["127.0.0.3:80".parse().expect("addr")]
        );
    }
}
