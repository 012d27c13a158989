//! Leader election against the in-memory API server: one winner among candidates, a held Lease
//! respected for its whole duration, takeover once renewals stop, loss detected when someone
//! else takes it, release only by the holder; a holder whose renewals hang gives up at the renew
//! deadline, before a standby takes over; the binary refuses inconsistent timings.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tokio::time::Instant;
use whaleflux_e2e::{ApiServer, RequestMatch};
use whaleflux_operator::controller::lease::{LeaseConfig, acquire, hold, release};

async fn leases(server: &ApiServer) -> Api<Lease> {
    let kc = Kubeconfig::read_from(server.kubeconfig()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Api::namespaced(Client::try_from(config).expect("client"), "default")
}

fn cfg(identity: &str) -> LeaseConfig {
    LeaseConfig {
        name: "whaleflux-operator".into(),
        namespace: "default".into(),
        identity: identity.into(),
        duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry_every: Duration::from_millis(200),
    }
}

async fn holder(api: &Api<Lease>) -> Option<String> {
    api.get("whaleflux-operator")
        .await
        .ok()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_candidate_wins_and_the_other_waits_out_the_whole_lease() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let server = ApiServer::start().await.expect("server");
        let api = leases(&server).await;
        let (a, b) = (cfg("a"), cfg("b"));
        let (api_a, api_b) = (api.clone(), api.clone());
        let mut ta = tokio::spawn(async move { acquire(&api_a, &a, || {}).await });
        let mut tb = tokio::spawn(async move { acquire(&api_b, &b, || {}).await });
        // Exactly one wins at once; the loser keeps trying.
        let (winner, loser_task, loser) = tokio::select! {
            h = &mut ta => (h.expect("a"), tb, "b"),
            h = &mut tb => (h.expect("b"), ta, "a"),
        };
        let win_id = if loser == "a" { "b" } else { "a" };
        assert_eq!(holder(&api).await.as_deref(), Some(win_id));
        // While the winner renews, the loser never gets it (2.5 durations).
        let renewing = {
            let api = api.clone();
            let c = cfg(win_id);
            tokio::spawn(async move { hold(&api, &c, winner, |_| {}).await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !loser_task.is_finished(),
            "{loser} took a Lease that was being renewed"
        );
        assert_eq!(holder(&api).await.as_deref(), Some(win_id));
        // The winner stops renewing (it died): the loser takes over, and not before the
        // Lease's duration has passed since it last changed.
        renewing.abort();
        let stopped = Instant::now();
        let held = tokio::time::timeout(Duration::from_secs(10), loser_task)
            .await
            .expect("takeover within 10 s")
            .expect("task");
        assert!(
            stopped.elapsed() >= Duration::from_millis(1500),
            "taken over {:?} after the last renewal, before the 2 s Lease ran out",
            stopped.elapsed()
        );
        drop(held);
        let lease = api.get("whaleflux-operator").await.expect("lease");
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some(loser));
        assert_eq!(spec.lease_transitions, Some(1));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_learns_it_lost_the_lease_and_only_the_holder_releases_it() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let server = ApiServer::start().await.expect("server");
        let api = leases(&server).await;
        let held = acquire(&api, &cfg("a"), || {}).await;
        // Someone else writes themselves in: the next renewal conflicts and says who.
        let mut l = api.get("whaleflux-operator").await.expect("lease");
        l.spec.as_mut().expect("spec").holder_identity = Some("intruder".into());
        api.replace("whaleflux-operator", &PostParams::default(), &l)
            .await
            .expect("overwrite");
        let why =
            tokio::time::timeout(Duration::from_secs(10), hold(&api, &cfg("a"), held, |_| {}))
                .await
                .expect("hold returns");
        assert_eq!(why, "the lease is now held by \"intruder\"");
        // A non-holder's release leaves the Lease alone...
        release(&api, &cfg("a")).await;
        assert_eq!(holder(&api).await.as_deref(), Some("intruder"));
        // ...the holder's empties it and shortens it, so a standby takes it at once.
        release(&api, &cfg("intruder")).await;
        let spec = api
            .get("whaleflux-operator")
            .await
            .expect("lease")
            .spec
            .expect("spec");
        assert_eq!(spec.holder_identity, None);
        assert_eq!(spec.lease_duration_seconds, Some(1));
        let t = Instant::now();
        let _b = acquire(&api, &cfg("b"), || {}).await;
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "a released Lease is free"
        );
        assert_eq!(holder(&api).await.as_deref(), Some("b"));
    })
    .await
    .expect("test timed out");
}

/// client-go's timings scaled down: lease 3 s, renew deadline 2 s, retry 0.3 s.
fn fast(identity: &str) -> LeaseConfig {
    LeaseConfig {
        duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_every: Duration::from_millis(300),
        ..cfg(identity)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_renewals_hang_stops_at_the_renew_deadline_before_a_standby_takes_over() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let server = ApiServer::start().await.expect("server");
        let api = leases(&server).await;
        let held = acquire(&api, &fast("a"), || {}).await;
        // Every successful renewal, as the holder reports it.
        let renewals: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let holding = {
            let (api, renewals) = (api.clone(), renewals.clone());
            tokio::spawn(async move {
                let why = hold(&api, &fast("a"), held, move |at| {
                    renewals.lock().expect("renewals").push(at);
                })
                .await;
                (why, Instant::now())
            })
        };
        // A standby polls meanwhile: it only reads while the Lease is renewed.
        let standby = {
            let api = api.clone();
            tokio::spawn(async move {
                let held = acquire(&api, &fast("b"), || {}).await;
                (held, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = renewals.lock().expect("renewals").len();
        assert!(
            before >= 3,
            "the holder renews every retry period: {before} renewals in 1.5 s"
        );
        assert!(!standby.is_finished(), "the standby took a renewed Lease");
        // The API server stops answering the holder's next renewal (held for a minute, as a
        // partition would): its only update while the standby just reads.
        server.faults().delay(
            RequestMatch::verb_resource("update", "leases"),
            Duration::from_secs(60),
            Some(1),
        );
        let (why, returned) = tokio::time::timeout(Duration::from_secs(10), holding)
            .await
            .expect("hold returns well before the delayed update is answered")
            .expect("hold task");
        let last = *renewals
            .lock()
            .expect("renewals")
            .last()
            .expect("a renewal");
        let since_last = returned - last;
        assert!(
            why.contains("renew deadline of 2s"),
            "the reason names the deadline: {why}"
        );
        assert!(
            since_last >= Duration::from_millis(1900),
            "hold returned {since_last:?} after the last renewal, before the 2 s renew deadline"
        );
        assert!(
            since_last < Duration::from_secs(3),
            "hold returned {since_last:?} after the last renewal: a standby may take over after 3 s"
        );
        // The standby takes over only after the Lease's duration, by when the old holder had
        // stopped.
        let (_held, taken) = tokio::time::timeout(Duration::from_secs(10), standby)
            .await
            .expect("the standby takes over")
            .expect("standby task");
        assert!(
            taken > returned,
            "the standby held the Lease {:?} before the old holder's hold() returned",
            returned - taken
        );
        assert!(
            taken - last >= Duration::from_secs(3),
            "taken over {:?} after the last renewal, inside the 3 s Lease",
            taken - last
        );
        assert_eq!(holder(&api).await.as_deref(), Some("b"));
    })
    .await
    .expect("test timed out");
}

#[test]
fn the_operator_refuses_inconsistent_lease_timings() {
    for (args, names) in [
        (
            &[
                "--lease-duration-seconds",
                "10",
                "--lease-renew-deadline-seconds",
                "10",
            ][..],
            &[
                "--lease-renew-deadline-seconds (10)",
                "--lease-duration-seconds (10)",
            ][..],
        ),
        (
            &[
                "--lease-renew-deadline-seconds",
                "4",
                "--lease-retry-seconds",
                "5",
            ][..],
            &[
                "--lease-retry-seconds (5)",
                "--lease-renew-deadline-seconds (4)",
            ][..],
        ),
    ] {
        let out = whaleflux_e2e::output_within(
            Command::new(env!("CARGO_BIN_EXE_whaleflux"))
                .arg("operator")
                .args(args)
                // Refused before any API server is asked.
                .env("KUBECONFIG", "/nonexistent/kubeconfig")
                .env_remove("POD_NAME")
                .env_remove("POD_NAMESPACE"),
            None,
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        for n in names {
            assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }
}
