//! What the e2e test files share: a bound on every test and a kube-rs client for a server.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use whaleflux_e2e::ApiServer;

/// Every test runs under this bound so a server bug fails the test instead of hanging it.
pub async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .expect("test timed out");
}

/// A kube-rs client authenticated as the server's admin.
pub async fn client(server: &ApiServer) -> Client {
    Client::try_from(config(server).await).expect("client")
}

/// Like [`client`], without kube-rs's retries of 429/503/504: for calls whose 429 is an answer
/// (an eviction a disruption budget refuses), not a hint to try again.
pub async fn client_without_retries(server: &ApiServer) -> Client {
    let mut config = config(server).await;
    config.default_retry = false;
    Client::try_from(config).expect("client")
}

async fn config(server: &ApiServer) -> kube::Config {
    let kc = Kubeconfig::read_from(server.kubeconfig()).expect("kubeconfig parses");
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config")
}
