//! The API server under load, driven by kube-rs: watchers that fall behind are told so (never
//! dropped silently), concurrent writers and watchers lose, duplicate and reorder nothing, and
//! the work a request does is proportional to what it touches (counted, not timed).

mod common;

use common::{bounded, client};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::json;
use tokio::sync::Mutex;
use whaleflux_crds::LlmDeployment;
use whaleflux_e2e::ApiServer;

fn cm(name: &str, payload: usize, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "data": {"payload": "x".repeat(payload)},
    }))
    .expect("configmap")
}

fn rv_of(c: &ConfigMap) -> u64 {
    c.resource_version()
        .and_then(|r| r.parse().ok())
        .expect("numeric resourceVersion")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_gets_an_error_event_not_silence() {
    bounded(falls_behind()).await;
}

async fn falls_behind() {
    // A short history: a watcher that stops reading loses its place after 64 changes.
    let server = ApiServer::builder()
        .history(64)
        .start()
        .await
        .expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let start = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("list rv");
    let mut stream = api
        .watch(&WatchParams::default().timeout(60), &start)
        .await
        .expect("watch opens")
        .boxed();
    // Write far more than the history, the watch's buffers and the sockets hold, while the
    // watcher reads nothing.
    let total = 6000;
    let writers = (0..8).map(|w| {
        let api = api.clone();
        tokio::spawn(async move {
            for i in (w..total).step_by(8) {
                api.create(&PostParams::default(), &cm(&format!("c{i:05}"), 2048, &[]))
                    .await
                    .expect("created");
            }
        })
    });
    for w in writers.collect::<Vec<_>>() {
        w.await.expect("writer");
    }
    let mut seen = Vec::new();
    let mut error = None;
    while let Some(item) = stream.next().await {
        match item.expect("watch item decodes") {
            WatchEvent::Added(c) => seen.push(rv_of(&c)),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => {
                error = Some(e);
                break;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "events in order");
    assert!(
        seen.len() < total,
        "the watcher kept up with {total} writes it never read; the test did not make it fall behind"
    );
    let e = error.unwrap_or_else(|| {
        panic!(
            "the watch ended after {} of {total} events without an ERROR event: a lagging watcher was dropped silently",
            seen.len()
        )
    });
    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"), "{e:?}");
    assert!(
        e.message.contains("fell behind"),
        "the error says why: {}",
        e.message
    );
}

/// What a writer did: (resourceVersion it produced, object, deleted?).
type Write = (u64, String, bool);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_resuming_watchers_lose_and_reorder_nothing() {
    bounded(concurrent()).await;
}

async fn concurrent() {
    let server = Arc::new(
        ApiServer::builder()
            .history(100_000)
            .start()
            .await
            .expect("server starts"),
    );
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let log: Arc<Mutex<Vec<Write>>> = Arc::default();
    // Watchers start at different moments from their own list's version, and resume after
    // every interruption from the last version they saw (as kube-runtime's watcher does).
    let mut watchers = Vec::new();
    let spawn_watcher = |api: Api<ConfigMap>| {
        tokio::spawn(async move {
            let list = api.list(&ListParams::default()).await.expect("list");
            let start: u64 = list
                .metadata
                .resource_version
                .as_deref()
                .and_then(|r| r.parse().ok())
                .expect("list rv");
            let initial: BTreeMap<String, u64> = list
                .items
                .iter()
                .map(|c| (c.name_any(), rv_of(c)))
                .collect();
            let mut events: Vec<Write> = Vec::new();
            let mut last = start;
            let mut resumes = 0;
            'outer: loop {
                let mut stream = api
                    .watch(&WatchParams::default().timeout(30), &last.to_string())
                    .await
                    .expect("watch opens")
                    .boxed();
                loop {
                    // A watcher that never sees the last change ends with what it has, so the
                    // comparison below names what it missed.
                    let next = tokio::time::timeout(Duration::from_secs(20), stream.next());
                    let Ok(next) = next.await else { break 'outer };
                    match next {
                        Some(Ok(WatchEvent::Added(c) | WatchEvent::Modified(c))) => {
                            last = rv_of(&c);
                            events.push((last, c.name_any(), false));
                        }
                        Some(Ok(WatchEvent::Deleted(c))) => {
                            last = rv_of(&c);
                            let done = c.name_any() == "stop";
                            events.push((last, c.name_any(), true));
                            if done {
                                break 'outer;
                            }
                        }
                        Some(Ok(WatchEvent::Bookmark(b))) => {
                            last = b.metadata.resource_version.parse().expect("bookmark rv");
                        }
                        Some(Ok(WatchEvent::Error(e))) => panic!("watch error {e:?}"),
                        Some(Err(e)) => panic!("watch failed: {e}"),
                        None => {
                            resumes += 1;
                            continue 'outer;
                        }
                    }
                }
            }
            (start, initial, events, resumes)
        })
    };
    watchers.push(spawn_watcher(api.clone()));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let api = api.clone();
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..60 {
                    let name = format!("w{w}-{}", i % 7);
                    let result = match i % 3 {
                        0 => api
                            .create(&PostParams::default(), &cm(&name, 64, &[("w", "x")]))
                            .await
                            .map(|c| (rv_of(&c), false)),
                        1 => api
                            .patch(
                                &name,
                                &PatchParams::default(),
                                &Patch::Merge(json!({"data": {"i": i.to_string()}})),
                            )
                            .await
                            .map(|c| (rv_of(&c), false)),
                        _ => api
                            .delete(&name, &DeleteParams::default())
                            .await
                            .map(|d| (d.left().map(|c| rv_of(&c)).unwrap_or(0), true)),
                    };
                    // Spread the writes over the watchers' interruptions.
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    match result {
                        Ok((rv, deleted)) => log.lock().await.push((rv, name, deleted)),
                        // Creating what exists, patching or deleting what is gone: no change.
                        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                        Err(e) => panic!("write failed: {e}"),
                    }
                }
            })
        })
        .collect();
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        watchers.push(spawn_watcher(api.clone()));
        if round % 2 == 1 {
            server.faults().close_watches();
        }
    }
    for w in writers {
        w.await.expect("writer");
    }
    // A last change every watcher waits for.
    let stop = api
        .create(&PostParams::default(), &cm("stop", 1, &[]))
        .await
        .expect("created");
    api.delete("stop", &DeleteParams::default())
        .await
        .expect("deleted");
    let mut log = log.lock().await.clone();
    log.push((rv_of(&stop), "stop".into(), false));
    log.sort();
    let mut interrupted = 0;
    for w in watchers {
        let (start, initial, events, resumes) = w.await.expect("watcher");
        interrupted += resumes;
        // The list is the state at its version...
        let mut state: BTreeMap<String, u64> = BTreeMap::new();
        for (rv, name, deleted) in log.iter().filter(|l| l.0 <= start) {
            if *deleted {
                state.remove(name);
            } else {
                state.insert(name.clone(), *rv);
            }
        }
        assert_eq!(
            initial, state,
            "the list at {start} is the state at {start}"
        );
        // ...and the watch is every change after it, once, in order.
        let want: Vec<Write> = log.iter().filter(|l| l.0 > start).cloned().collect();
        let got: Vec<Write> = events
            .iter()
            .filter(|e| e.1 != "stop" || !e.2)
            .cloned()
            .collect();
        assert_eq!(
            got.iter().map(|e| (e.0, e.1.as_str())).collect::<Vec<_>>(),
            want.iter().map(|e| (e.0, e.1.as_str())).collect::<Vec<_>>(),
            "watcher from {start}: every change after its list, once, in order"
        );
        assert!(
            events.last().is_some_and(|e| e.1 == "stop" && e.2),
            "the stream ran to the last change"
        );
    }
    assert!(
        interrupted > 0,
        "closing the watches interrupted some watchers, which resumed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_is_proportional_to_what_a_request_touches() {
    bounded(proportional()).await;
}

async fn proportional() {
    let server = ApiServer::start().await.expect("server starts");
    let client = client(&server).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let stats = &server.store().stats;
    // Eight watchers of one resource: each change is encoded once, not once per watcher.
    let mut streams = Vec::new();
    for _ in 0..8 {
        streams.push(
            api.watch(&WatchParams::default().timeout(30), "0")
                .await
                .expect("watch")
                .boxed(),
        );
    }
    let before = stats.encoded_events.load(Ordering::Relaxed);
    for i in 0..50 {
        api.create(&PostParams::default(), &cm(&format!("p{i}"), 16, &[]))
            .await
            .expect("created");
    }
    for s in &mut streams {
        let mut n = 0;
        while n < 50 {
            match s.next().await {
                Some(Ok(WatchEvent::Added(_))) => n += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let encoded = stats.encoded_events.load(Ordering::Relaxed) - before;
    assert_eq!(
        encoded, 50,
        "50 changes watched 8 times were encoded {encoded} times"
    );
    // A label-selected list reads the objects carrying the label, not the whole resource.
    for i in 0..400 {
        let labels: &[(&str, &str)] = if i % 100 == 0 {
            &[("app", "rare")]
        } else {
            &[("app", "common")]
        };
        api.create(&PostParams::default(), &cm(&format!("l{i}"), 16, labels))
            .await
            .expect("created");
    }
    let before = stats.list_visits.load(Ordering::Relaxed);
    let rare = api
        .list(&ListParams::default().labels("app=rare"))
        .await
        .expect("list");
    assert_eq!(rare.items.len(), 4);
    let visits = stats.list_visits.load(Ordering::Relaxed) - before;
    assert_eq!(visits, 4, "a list of 4 of 450 objects visited {visits}");
    // A custom resource's schema is compiled once, however many objects are admitted.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let path = format!(
        "{}/../crds/manifests/llmdeployments.whaleflux.io.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&std::fs::read_to_string(path).expect("CRD file")).expect("CRD");
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("CRD");
    let llmds: Api<LlmDeployment> = Api::namespaced(client, "default");
    for i in 0..20 {
        let d: LlmDeployment = serde_json::from_value(json!({
            "apiVersion": "whaleflux.io/v1alpha1", "kind": "LlmDeployment",
            "metadata": {"name": format!("d{i}")},
            "spec": {"model": {"preset": "smollm2-135m", "weights": {"dtype": "q4_1", "source": {"path": "/m.gguf"}}},
                "gpuPool": "pool", "replicas": 1}
        }))
        .expect("deployment");
        llmds
            .create(&PostParams::default(), &d)
            .await
            .expect("created");
        llmds
            .patch(
                &format!("d{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 2}})),
            )
            .await
            .expect("patched");
    }
    assert_eq!(
        stats.schema_compilations.load(Ordering::Relaxed),
        1,
        "40 admissions of one kind compile its schema once"
    );
}
