//! Cluster DNS for the processes the kubelet starts: a small UDP DNS server on loopback that
//! answers A queries for `<svc>.<ns>.svc.cluster.local` and
//! `<hostname>.<subdomain>.<ns>.svc.cluster.local` from the store. Processes learn its address
//! from the `WHALEFLUX_DNS_SERVER` env var (nothing on the machine is reconfigured).

use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::Value;
use tokio::net::UdpSocket;

use crate::selectors::LabelSelector;
use crate::server::AppState;
use crate::store::Key;

const SUFFIX: &str = ".svc.cluster.local";

/// Addresses for a name: `None` = no such name (NXDOMAIN), `Some(empty)` = exists, no address.
pub fn resolve(st: &AppState, name: &str) -> Option<Vec<Ipv4Addr>> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let rest = name.strip_suffix(SUFFIX)?;
    let parts: Vec<&str> = rest.split('.').collect();
    let ready = |p: &Value| {
        p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    };
    let ip = |p: &Value| {
        p["status"]["podIP"]
            .as_str()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
    };
    let service = |ns: &str, svc: &str| {
        st.store.get(&Key {
            group: String::new(),
            resource: "services".into(),
            namespace: ns.into(),
            name: svc.into(),
        })
    };
    match parts.as_slice() {
        [svc, ns] => {
            let s = service(ns, svc)?;
            let selector = LabelSelector::from_object(
                &serde_json::json!({"matchLabels": s["spec"]["selector"]}),
            );
            let all = s["spec"]["publishNotReadyAddresses"] == Value::Bool(true);
            let (pods, _) = st.store.list("", "pods", Some(ns));
            Some(
                pods.iter()
                    .map(|(_, p)| p)
                    .filter(|p| {
                        s["spec"]["selector"].is_object()
                            && selector.matches(p)
                            && (all || ready(p))
                    })
                    .filter_map(|p| ip(p))
                    .collect(),
            )
        }
        [host, sub, ns] => {
            let s = service(ns, sub)?;
            let all = s["spec"]["publishNotReadyAddresses"] == Value::Bool(true);
            let (pods, _) = st.store.list("", "pods", Some(ns));
            let pod = pods.iter().map(|(_, p)| p).find(|p| {
                let hostname = p["spec"]["hostname"]
                    .as_str()
                    .or(p["metadata"]["name"].as_str());
                hostname == Some(host) && p["spec"]["subdomain"].as_str() == Some(sub)
            })?;
            Some(if all || ready(pod) {
                ip(pod).into_iter().collect()
            } else {
                Vec::new()
            })
        }
        _ => None,
    }
}

/// Parse the question of a query: (name, qtype, end of question section).
fn question(q: &[u8]) -> Option<(String, u16, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).into_owned());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

/// The response to one query packet, or `None` for a packet that is not a query.
pub fn answer(st: &AppState, q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let (name, qtype, end) = question(q)?;
    let found = resolve(st, &name);
    let ips = if qtype == 1 {
        found.clone().unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut r = Vec::with_capacity(end + ips.len() * 16);
    r.extend_from_slice(&q[0..2]);
    let rd = q[2] & 0x01;
    r.push(0x84 | rd); // response, authoritative, recursion desired echoed
    r.push(if found.is_some() { 0x00 } else { 0x03 }); // NOERROR or NXDOMAIN
    r.extend_from_slice(&[0, 1]);
    r.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..end]);
    for ip in ips {
        r.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

/// Serve queries until the socket fails.
pub async fn serve(socket: UdpSocket, st: Arc<AppState>) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        if let Some(resp) = answer(&st, &buf[..n]) {
            let _ = socket.send_to(&resp, from).await;
        }
    }
}
