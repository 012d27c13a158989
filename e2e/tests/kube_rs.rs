//! kube-rs against the in-memory API server: typed CRUD, optimistic concurrency, paging and
//! selectors, watches with bookmarks and 410 Gone, a reflector that relists after 410, a
//! `Controller` with `owns()`, garbage collection, fault injection and the audit log.

mod common;

use common::{bounded, client};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use whaleflux_crds::LlmDeployment;
use whaleflux_e2e::{ApiServer, RequestMatch};

const LIMIT: Duration = Duration::from_secs(20);

/// Poll `check` every 50 ms until it returns true, failing after `LIMIT`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for file in [
        "gpupools.whaleflux.io.yaml",
        "llmdeployments.whaleflux.io.yaml",
    ] {
        let path = format!("{}/../crds/manifests/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("CRD file");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD parses");
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("CRD created");
    }
}

fn llmd(name: &str, replicas: u32) -> LlmDeployment {
    serde_json::from_value(json!({
        "apiVersion": "whaleflux.io/v1alpha1", "kind": "LlmDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": {"preset": "smollm2-135m", "weights": {"dtype": "q4_1", "source": {"path": "/m.gguf"}}},
            "gpuPool": "pool", "replicas": replicas, "serving": {"maxContextLength": 2048, "maxConcurrentSequences": 8}}
    }))
    .expect("valid LlmDeployment")
}

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
        ..ConfigMap::default()
    }
}

#[tokio::test]
async fn crd_objects_get_defaults_generation_and_cel_errors() {
    bounded(crd_objects_get_defaults_generation_and_cel_errors_inner()).await;
}

async fn crd_objects_get_defaults_generation_and_cel_errors_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let client = client(&server).await;
    install_crds(&client).await;
    let api: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
    let created = api
        .create(&PostParams::default(), &llmd("a", 1))
        .await
        .expect("created");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let raw = serde_json::to_value(&created).expect("serializes");
    assert_eq!(
        raw["spec"]["failover"]["restartBudget"], 5,
        "schema default applied"
    );

    let status = PatchParams::default();
    api.patch_status(
        "a",
        &status,
        &Patch::Merge(json!({"status": {"phase": "Progressing"}})),
    )
    .await
    .expect("status patched");
    let after_status = api.get("a").await.expect("get");
    assert_eq!(
        after_status.metadata.generation,
        Some(1),
        "status changes do not bump generation"
    );
    let after_spec = api
        .patch(
            "a",
            &status,
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("spec patched");
    assert_eq!(
        after_spec.metadata.generation,
        Some(2),
        "spec changes bump generation"
    );
    let ignored = api
        .patch(
            "a",
            &status,
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .expect("patched");
    assert_eq!(
        serde_json::to_value(&ignored).expect("json")["status"]["phase"],
        "Progressing",
        "main resource ignores status"
    );

    let err = api.create(&PostParams::default(), &llmd("bad", 1)).await;
    assert!(err.is_ok(), "second object is fine");
    let mut negative = serde_json::to_value(llmd("neg", 1)).expect("json");
    negative["spec"]["replicas"] = json!(-1);
    let dynamic: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &kube::api::ApiResource::erase::<LlmDeployment>(&()),
    );
    let obj: kube::api::DynamicObject = serde_json::from_value(negative).expect("dynamic");
    match dynamic.create(&PostParams::default(), &obj).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422);
            assert_eq!(s.reason, "Invalid");
            assert!(
                s.message.contains("spec.replicas must be 0 or more"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 422 Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn stale_updates_conflict_and_duplicates_already_exist() {
    bounded(stale_updates_conflict_and_duplicates_already_exist_inner()).await;
}

async fn stale_updates_conflict_and_duplicates_already_exist_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let first = api
        .create(&PostParams::default(), &cm("c", &[]))
        .await
        .expect("created");
    match api.create(&PostParams::default(), &cm("c", &[])).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    let mut newer = first.clone();
    newer.data = Some(BTreeMap::from([("k".into(), "2".into())]));
    api.replace("c", &PostParams::default(), &newer)
        .await
        .expect("fresh update");
    let mut stale = first;
    stale.data = Some(BTreeMap::from([("k".into(), "3".into())]));
    match api.replace("c", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert!(
                s.message.contains("the object has been modified"),
                "{}",
                s.message
            );
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    match api.get("missing").await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
            assert_eq!(s.message, "configmaps \"missing\" not found");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    let other_ns: Api<ConfigMap> = Api::namespaced(client(&server).await, "nowhere");
    match other_ns.create(&PostParams::default(), &cm("x", &[])).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.message, "namespaces \"nowhere\" not found"),
        other => panic!("expected missing namespace, got {other:?}"),
    }
}

#[tokio::test]
async fn list_pages_and_selectors() {
    bounded(list_pages_and_selectors_inner()).await;
}

async fn list_pages_and_selectors_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    for i in 0..5 {
        let tier = if i % 2 == 0 { "even" } else { "odd" };
        api.create(
            &PostParams::default(),
            &cm(&format!("cm-{i}"), &[("tier", tier)]),
        )
        .await
        .expect("created");
    }
    let page1 = api
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    assert_eq!(page1.items.len(), 2);
    let token = page1.metadata.continue_.clone().expect("continue token");
    let page2 = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    let page3 = api
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(page2.metadata.continue_.as_deref().expect("token")),
        )
        .await
        .expect("page 3");
    let names: Vec<String> = page1
        .items
        .iter()
        .chain(&page2.items)
        .chain(&page3.items)
        .map(|c| c.name_any())
        .collect();
    assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);
    assert!(
        page3
            .metadata
            .continue_
            .as_deref()
            .unwrap_or_default()
            .is_empty()
    );
    let even = api
        .list(&ListParams::default().labels("tier=even"))
        .await
        .expect("labels");
    assert_eq!(even.items.len(), 3);
    let notin = api
        .list(&ListParams::default().labels("tier notin (even)"))
        .await
        .expect("set labels");
    assert_eq!(notin.items.len(), 2);
    let gone = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("tier=odd"),
        )
        .await
        .expect("deletecollection");
    assert_eq!(
        gone.left().map(|l| l.items.len()),
        Some(2),
        "the deleted objects come back"
    );
    assert_eq!(
        api.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        3
    );
    let one = api
        .list(&ListParams::default().fields("metadata.name=cm-4"))
        .await
        .expect("fields");
    assert_eq!(
        one.items.iter().map(|c| c.name_any()).collect::<Vec<_>>(),
        ["cm-4"]
    );
    server.faults().expire_resource_versions();
    api.create(&PostParams::default(), &cm("later", &[]))
        .await
        .expect("created");
    match api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410 for an expired continue token, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_resumes_sends_bookmarks_and_410_when_too_old() {
    bounded(watch_resumes_sends_bookmarks_and_410_when_too_old_inner()).await;
}

async fn watch_resumes_sends_bookmarks_and_410_when_too_old_inner() {
    let server = ApiServer::builder()
        .bookmark_interval(Duration::from_millis(200))
        .start()
        .await
        .expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let a = api
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .expect("created");
    let rv = a.resource_version().expect("rv");
    api.create(&PostParams::default(), &cm("b", &[]))
        .await
        .expect("created");
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .expect("watch")
        .boxed();
    let mut saw_b = false;
    let mut saw_bookmark = false;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !(saw_b && saw_bookmark) && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(LIMIT, stream.next()).await {
            Ok(Some(Ok(WatchEvent::Added(c)))) => {
                assert_eq!(
                    c.name_any(),
                    "b",
                    "only changes after the requested version"
                );
                saw_b = true;
            }
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => saw_bookmark = true,
            other => panic!("unexpected watch item {other:?}"),
        }
    }
    assert!(saw_b && saw_bookmark);
    server.faults().expire_resource_versions();
    let mut stale = api
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(LIMIT, stale.next()).await {
        Ok(Some(Ok(WatchEvent::Error(e)))) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn reflector_relists_after_410_gone() {
    bounded(reflector_relists_after_410_gone_inner()).await;
}

async fn reflector_relists_after_410_gone_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    api.create(&PostParams::default(), &cm("before", &[]))
        .await
        .expect("created");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream =
        reflector(writer, watcher(api.clone(), watcher::Config::default())).applied_objects();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    let has = |name: &'static str| {
        let reader = reader.clone();
        move || {
            let found = reader.state().iter().any(|c| c.name_any() == name);
            async move { found }
        }
    };
    eventually("the reflector to list `before`", has("before")).await;
    // A closed watch is resumed from the last version seen: a new watch, no relist.
    let count = |verb: &'static str| {
        server
            .audit()
            .resource_events()
            .iter()
            .filter(|e| e.verb == verb && e.resource == "configmaps")
            .count()
    };
    let (lists0, watches0) = (count("list"), count("watch"));
    server.faults().close_watches();
    eventually("the watcher to watch again after its stream closed", || {
        std::future::ready(count("watch") > watches0)
    })
    .await;
    assert_eq!(
        count("list"),
        lists0,
        "resuming after a closed watch needs no relist"
    );
    let lists_before = server
        .audit()
        .resource_events()
        .iter()
        .filter(|e| e.verb == "list" && e.resource == "configmaps")
        .count();
    server.faults().expire_resource_versions();
    api.create(&PostParams::default(), &cm("after", &[]))
        .await
        .expect("created");
    eventually("the reflector to relist and see `after`", has("after")).await;
    let lists_after = server
        .audit()
        .resource_events()
        .iter()
        .filter(|e| e.verb == "list" && e.resource == "configmaps")
        .count();
    assert!(
        lists_after > lists_before,
        "a 410 forces a relist ({lists_before} -> {lists_after})"
    );
    task.abort();
}

#[derive(Debug, thiserror::Error)]
#[error("reconcile failed: {0}")]
struct ReconcileError(#[from] kube::Error);

struct Ctx {
    client: Client,
    reconciles: AtomicUsize,
}

async fn reconcile(obj: Arc<LlmDeployment>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    ctx.reconciles.fetch_add(1, Ordering::SeqCst);
    let ns = obj.namespace().unwrap_or_default();
    let owner: OwnerReference = obj.controller_owner_ref(&()).unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let desired = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("{}-plan", obj.name_any()), "ownerReferences": [owner]},
        "data": {"replicas": obj.spec.replicas.to_string()},
    });
    cms.patch(
        &format!("{}-plan", obj.name_any()),
        &PatchParams::apply("test-controller").force(),
        &Patch::Apply(desired),
    )
    .await?;
    Ok(Action::await_change())
}

fn error_policy(_: Arc<LlmDeployment>, _: &ReconcileError, _: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(100))
}

#[tokio::test]
async fn controller_owns_configmaps_and_garbage_collection_cleans_up() {
    bounded(controller_owns_configmaps_and_garbage_collection_cleans_up_inner()).await;
}

async fn controller_owns_configmaps_and_garbage_collection_cleans_up_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let client = client(&server).await;
    install_crds(&client).await;
    let llmds: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        reconciles: AtomicUsize::new(0),
    });
    let controller = Controller::new(llmds.clone(), watcher::Config::default())
        .owns(cms.clone(), watcher::Config::default())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let task = tokio::spawn(controller);
    llmds
        .create(&PostParams::default(), &llmd("m", 1))
        .await
        .expect("created");
    let plan = |want: &'static str| {
        let cms = cms.clone();
        move || {
            let cms = cms.clone();
            async move {
                cms.get_opt("m-plan")
                    .await
                    .ok()
                    .flatten()
                    .and_then(|c| c.data)
                    .is_some_and(|d| d.get("replicas").map(String::as_str) == Some(want))
            }
        }
    };
    eventually("the controller to create m-plan", plan("1")).await;
    llmds
        .patch(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("patched");
    eventually("the controller to follow the spec", plan("3")).await;
    let before = ctx.reconciles.load(Ordering::SeqCst);
    cms.delete("m-plan", &DeleteParams::default())
        .await
        .expect("deleted");
    eventually(
        "owns() to trigger a reconcile that recreates m-plan",
        plan("3"),
    )
    .await;
    assert!(ctx.reconciles.load(Ordering::SeqCst) > before);
    let managers: Vec<String> = cms
        .get("m-plan")
        .await
        .expect("get")
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, ["test-controller"]);
    task.abort();
    llmds
        .delete("m", &DeleteParams::background())
        .await
        .expect("deleted");
    eventually("garbage collection to delete the owned ConfigMap", || {
        let cms = cms.clone();
        async move { matches!(cms.get_opt("m-plan").await, Ok(None)) }
    })
    .await;
}

#[tokio::test]
async fn foreground_deletion_waits_for_dependents_and_orphan_keeps_them() {
    bounded(foreground_deletion_waits_for_dependents_and_orphan_keeps_them_inner()).await;
}

async fn foreground_deletion_waits_for_dependents_and_orphan_keeps_them_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let owner_ref = |o: &ConfigMap| OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: o.name_any(),
        uid: o.uid().unwrap_or_default(),
        ..OwnerReference::default()
    };
    let owner = api
        .create(&PostParams::default(), &cm("owner", &[]))
        .await
        .expect("owner");
    let mut child = cm("child", &[]);
    child.metadata.finalizers = Some(vec!["test/hold".into()]);
    child.metadata.owner_references = Some(vec![owner_ref(&owner)]);
    api.create(&PostParams::default(), &child)
        .await
        .expect("child");
    api.delete("owner", &DeleteParams::foreground())
        .await
        .expect("delete");
    eventually("the child to be marked for deletion", || {
        let api = api.clone();
        async move {
            api.get("child")
                .await
                .is_ok_and(|c| c.metadata.deletion_timestamp.is_some())
        }
    })
    .await;
    let held = api
        .get("owner")
        .await
        .expect("owner waits for its dependents");
    assert!(
        held.finalizers()
            .contains(&"foregroundDeletion".to_string())
    );
    api.patch(
        "child",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("release");
    eventually("the owner to go once its dependents are gone", || {
        let api = api.clone();
        async move { matches!(api.get_opt("owner").await, Ok(None)) }
    })
    .await;

    let owner2 = api
        .create(&PostParams::default(), &cm("owner2", &[]))
        .await
        .expect("owner2");
    let mut kept = cm("kept", &[]);
    kept.metadata.owner_references = Some(vec![owner_ref(&owner2)]);
    api.create(&PostParams::default(), &kept)
        .await
        .expect("kept");
    api.delete("owner2", &DeleteParams::orphan())
        .await
        .expect("delete");
    // The collector must have had its chance at `kept`: a sentinel owned object deleted after
    // the orphaning is collected, so every change before it was looked at.
    let sentinel = api
        .create(&PostParams::default(), &cm("sentinel-owner", &[]))
        .await
        .expect("sentinel owner");
    let mut dep = cm("sentinel-dep", &[]);
    dep.metadata.owner_references = Some(vec![owner_ref(&sentinel)]);
    api.create(&PostParams::default(), &dep)
        .await
        .expect("sentinel dependent");
    api.delete("sentinel-owner", &DeleteParams::background())
        .await
        .expect("delete sentinel");
    eventually("the sentinel's dependent to be collected", || async {
        api.get_opt("sentinel-dep").await.expect("get").is_none()
    })
    .await;
    let orphan = api.get("kept").await.expect("orphaned dependents stay");
    assert!(orphan.owner_references().is_empty());
}

#[tokio::test]
async fn faults_and_audit_log() {
    bounded(faults_and_audit_log_inner()).await;
}

async fn faults_and_audit_log_inner() {
    let server = ApiServer::builder()
        .token("op-token", "system:serviceaccount:whaleflux:operator")
        .start()
        .await
        .expect("server starts");
    let mut config = kube::Config::new(server.url().parse().expect("url"));
    config.auth_info.token = Some("op-token".to_string().into());
    let client = Client::try_from(config).expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    server.faults().fail(
        RequestMatch::verb_resource("create", "configmaps"),
        500,
        Some(1),
    );
    match api.create(&PostParams::default(), &cm("x", &[])).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (500, "InternalError")),
        other => panic!("expected injected 500, got {other:?}"),
    }
    api.create(&PostParams::default(), &cm("x", &[]))
        .await
        .expect("the fault fired once");
    // kube-rs retries 429 (honouring Retry-After), so two throttled answers end in success.
    server.faults().fail(
        RequestMatch::verb_resource("get", "configmaps"),
        429,
        Some(2),
    );
    api.get("x").await.expect("retried through 429");
    server.faults().delay(
        RequestMatch::verb_resource("get", "configmaps"),
        Duration::from_millis(300),
        Some(1),
    );
    let started = std::time::Instant::now();
    api.get("x").await.expect("delayed get");
    assert!(started.elapsed() >= Duration::from_millis(300));
    api.patch(
        "x",
        &PatchParams::apply("op"),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"a": "b"}})),
    )
    .await
    .expect("applied");
    let seen: Vec<(String, String, String, String, String)> = server
        .audit()
        .resource_events()
        .into_iter()
        .map(|e| (e.user, e.verb, e.resource, e.namespace, e.name))
        .collect();
    let user = "system:serviceaccount:whaleflux:operator".to_string();
    let ev = |verb: &str, name: &str| {
        (
            user.clone(),
            verb.to_string(),
            "configmaps".to_string(),
            "default".to_string(),
            name.to_string(),
        )
    };
    assert_eq!(
        seen,
        vec![
            ev("create", ""),
            ev("create", ""),
            ev("get", "x"),
            ev("get", "x"),
            ev("get", "x"),
            ev("get", "x"),
            ev("patch", "x")
        ]
    );
    let codes: Vec<u16> = server
        .audit()
        .resource_events()
        .iter()
        .map(|e| e.code)
        .collect();
    assert_eq!(codes, [500, 201, 429, 429, 200, 200, 200]);

    let used: Vec<(String, String, String)> =
        server.audit().permissions_used(&user).into_iter().collect();
    let perm = |verb: &str| (String::new(), "configmaps".to_string(), verb.to_string());
    assert_eq!(used, vec![perm("create"), perm("get"), perm("patch")]);

    let mut bad = kube::Config::new(server.url().parse().expect("url"));
    bad.auth_info.token = Some("wrong".to_string().into());
    let denied: Api<ConfigMap> = Api::namespaced(Client::try_from(bad).expect("client"), "default");
    match denied.get("x").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 401),
        other => panic!("expected 401 for an unknown token, got {other:?}"),
    }
}

#[tokio::test]
async fn server_side_apply_owns_and_releases_fields() {
    bounded(server_side_apply_owns_and_releases_fields_inner()).await;
}

async fn server_side_apply_owns_and_releases_fields_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let apply = |data: serde_json::Value| {
        Patch::Apply(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "s"}, "data": data}),
        )
    };
    api.patch(
        "s",
        &PatchParams::apply("alice"),
        &apply(json!({"a": "1", "b": "2"})),
    )
    .await
    .expect("create by apply");
    match api
        .patch("s", &PatchParams::apply("bob"), &apply(json!({"a": "9"})))
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert!(
                s.message.contains("conflict with \"alice\"")
                    || s.message.contains("- alice: .data.a"),
                "{}",
                s.message
            );
        }
        other => panic!("expected an apply conflict, got {other:?}"),
    }
    api.patch("s", &PatchParams::apply("bob"), &apply(json!({"a": "1"})))
        .await
        .expect("same value co-owns");
    api.patch("s", &PatchParams::apply("alice"), &apply(json!({"b": "2"})))
        .await
        .expect("alice drops a");
    let s = api.get("s").await.expect("get");
    assert_eq!(
        s.data.unwrap_or_default().get("a").map(String::as_str),
        Some("1"),
        "bob still owns data.a"
    );
    api.patch("s", &PatchParams::apply("bob"), &apply(json!({})))
        .await
        .expect("bob drops a");
    let s = api.get("s").await.expect("get");
    assert_eq!(
        s.data
            .unwrap_or_default()
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        ["b"],
        "unowned fields are removed"
    );
}

/// One raw HTTP/1.1 request; returns (status code, body).
async fn raw(
    server: &ApiServer,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        whaleflux_e2e::ADMIN_TOKEN,
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        code,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn malformed_requests_get_4xx_status_objects() {
    bounded(malformed_requests_inner()).await;
}

async fn malformed_requests_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let cms = "/api/v1/namespaces/default/configmaps";
    let cases = [
        (
            "POST",
            cms.to_string(),
            "application/json",
            "{not json",
            400,
            "BadRequest",
        ),
        (
            "POST",
            cms.to_string(),
            "application/json",
            r#"{"metadata": 5}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            cms.to_string(),
            "application/json",
            r#"{"metadata": {"labels": {"a": 1}}}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            cms.to_string(),
            "application/json",
            r#"{"metadata": {}}"#,
            422,
            "Invalid",
        ),
        (
            "POST",
            cms.to_string(),
            "application/json",
            r#"{"metadata": {"name": "Bad_Name"}}"#,
            422,
            "Invalid",
        ),
        (
            "POST",
            cms.to_string(),
            "application/json",
            r#"{"metadata": {"name": "ok"}}"#,
            201,
            "",
        ),
        (
            "PATCH",
            format!("{cms}/ok"),
            "application/merge-patch+json",
            r#"{"metadata": "x"}"#,
            400,
            "BadRequest",
        ),
        (
            "PATCH",
            format!("{cms}/ok"),
            "application/json-patch+json",
            r#"{"op": "nope"}"#,
            400,
            "BadRequest",
        ),
        (
            "PATCH",
            format!("{cms}/ok"),
            "application/json-patch+json",
            r#"[{"op":"remove","path":"/nope"}]"#,
            422,
            "Invalid",
        ),
        (
            "PATCH",
            format!("{cms}/ok"),
            "text/plain",
            "x",
            415,
            "UnsupportedMediaType",
        ),
        (
            "PATCH",
            format!("{cms}/ok"),
            "application/apply-patch+yaml",
            "kind: ConfigMap\napiVersion: v1\n",
            422,
            "Invalid",
        ),
        (
            "GET",
            format!("{cms}?labelSelector=a%20in%20b"),
            "application/json",
            "",
            400,
            "BadRequest",
        ),
        (
            "GET",
            format!("{cms}?continue=garbage"),
            "application/json",
            "",
            400,
            "BadRequest",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/widgets".to_string(),
            "application/json",
            "",
            404,
            "NotFound",
        ),
        (
            "GET",
            format!("{cms}/ok/scale"),
            "application/json",
            "",
            404,
            "NotFound",
        ),
        (
            "PUT",
            cms.to_string(),
            "application/json",
            "{}",
            405,
            "MethodNotAllowed",
        ),
        ("GET", format!("{cms}/ok"), "application/json", "", 200, ""),
    ];
    for (method, path, ct, body, code, reason) in cases {
        let (got, status) = raw(&server, method, &path, ct, body).await;
        assert_eq!(got, code, "{method} {path} {body}: {status}");
        if !reason.is_empty() {
            assert_eq!(status["kind"], "Status", "{method} {path}");
            assert_eq!(status["reason"], reason, "{method} {path} {body}: {status}");
            assert_eq!(status["code"], code);
        }
    }
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_then_changes() {
    bounded(streaming_list_inner()).await;
}

async fn streaming_list_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    api.create(&PostParams::default(), &cm("first", &[]))
        .await
        .expect("created");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(
        writer,
        watcher(api.clone(), watcher::Config::default().streaming_lists()),
    )
    .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    let has = |name: &'static str| {
        let reader = reader.clone();
        move || std::future::ready(reader.state().iter().any(|c| c.name_any() == name))
    };
    eventually("the initial events to fill the store", has("first")).await;
    api.create(&PostParams::default(), &cm("second", &[]))
        .await
        .expect("created");
    eventually("the watch to deliver later changes", has("second")).await;
    let verbs: Vec<String> = server
        .audit()
        .resource_events()
        .into_iter()
        .filter(|e| e.resource == "configmaps")
        .map(|e| e.verb)
        .collect();
    assert!(
        !verbs.contains(&"list".to_string()),
        "a streaming list never lists: {verbs:?}"
    );
    task.abort();
}

#[tokio::test]
async fn metadata_only_reads_and_watches() {
    bounded(metadata_only_inner()).await;
}

async fn metadata_only_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    api.create(&PostParams::default(), &cm("a", &[("app", "x")]))
        .await
        .expect("created");
    let one = api.get_metadata("a").await.expect("metadata get");
    assert_eq!(
        one.metadata
            .labels
            .unwrap_or_default()
            .get("app")
            .map(String::as_str),
        Some("x")
    );
    let list = api
        .list_metadata(&ListParams::default())
        .await
        .expect("metadata list");
    assert_eq!(list.types.kind, "PartialObjectMetadataList");
    assert_eq!(
        list.items.iter().map(|m| m.name_any()).collect::<Vec<_>>(),
        ["a"]
    );
    let (reader, writer) = reflector::store();
    let meta_api: Api<kube::core::PartialObjectMeta<ConfigMap>> =
        Api::namespaced(client(&server).await, "default");
    let stream = reflector(writer, watcher(meta_api, watcher::Config::default())).applied_objects();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    api.create(&PostParams::default(), &cm("b", &[]))
        .await
        .expect("created");
    eventually("the metadata watcher to see b", || {
        std::future::ready(
            reader
                .state()
                .iter()
                .any(|m: &Arc<kube::core::PartialObjectMeta<ConfigMap>>| m.name_any() == "b"),
        )
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn concurrent_patches_do_not_lose_updates() {
    bounded(concurrent_patches_inner()).await;
}

async fn concurrent_patches_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    api.create(&PostParams::default(), &cm("shared", &[]))
        .await
        .expect("created");
    let writers = (0..24).map(|i| {
        let api = api.clone();
        tokio::spawn(async move {
            let patch = if i % 3 == 0 {
                Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"labels": {format!("l{i}"): "x"}}}))
            } else if i % 3 == 1 {
                Patch::Merge(json!({"metadata": {"labels": {format!("l{i}"): "x"}}}))
            } else {
                Patch::Json::<serde_json::Value>(serde_json::from_value(json!([{"op": "add", "path": format!("/data/k{i}"), "value": "v"}])).expect("json patch"))
            };
            let pp = if i % 3 == 0 { PatchParams::apply(&format!("m{i}")) } else { PatchParams::default() };
            api.patch("shared", &pp, &patch).await.expect("patch applies")
        })
    });
    for w in writers.collect::<Vec<_>>() {
        w.await.expect("writer finished");
    }
    let got = api.get("shared").await.expect("get");
    let labels = got.metadata.labels.unwrap_or_default();
    let data = got.data.unwrap_or_default();
    for i in 0..24 {
        if i % 3 == 2 {
            assert!(
                data.contains_key(&format!("k{i}")),
                "data k{i} kept: {data:?}"
            );
        } else {
            assert!(
                labels.contains_key(&format!("l{i}")),
                "label l{i} kept: {labels:?}"
            );
        }
    }
    match api
        .patch(
            "shared",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"x": "y"}})),
        )
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(
            (s.code, s.reason.as_str()),
            (409, "Conflict"),
            "a pinned stale version conflicts"
        ),
        other => panic!("expected a Conflict for a stale pinned resourceVersion, got {other:?}"),
    }
}

#[tokio::test]
async fn discovery_legacy_and_aggregated_agree_and_follow_crds() {
    bounded(discovery_inner()).await;
}

async fn discovery_inner() {
    let server = ApiServer::start().await.expect("server starts");
    let client = client(&server).await;
    install_crds(&client).await;
    let resources = |d: &kube::Discovery| {
        let mut v: Vec<String> = d
            .groups()
            .flat_map(|g| {
                g.recommended_resources()
                    .into_iter()
                    .map(|(r, caps)| format!("{}/{} {:?}", r.group, r.plural, caps.scope))
            })
            .collect();
        v.sort();
        v
    };
    let legacy = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("legacy discovery");
    let aggregated = kube::Discovery::new(client.clone())
        .run_aggregated()
        .await
        .expect("aggregated discovery");
    assert_eq!(resources(&legacy), resources(&aggregated));
    let all = resources(&aggregated);
    assert!(
        all.contains(&"whaleflux.io/llmdeployments Namespaced".to_string()),
        "{all:?}"
    );
    assert!(
        all.contains(&"whaleflux.io/gpupools Cluster".to_string()),
        "{all:?}"
    );
    assert!(
        all.contains(&"apps/statefulsets Namespaced".to_string()),
        "{all:?}"
    );
    let (_, caps) = aggregated
        .resolve_gvk(&kube::api::GroupVersionKind::gvk(
            "whaleflux.io",
            "v1alpha1",
            "LlmDeployment",
        ))
        .expect("llmd is served");
    let subs: Vec<String> = caps
        .subresources
        .iter()
        .map(|(r, _)| r.plural.clone())
        .collect();
    assert!(
        subs.iter().any(|s| s.ends_with("status")) && subs.iter().any(|s| s.ends_with("scale")),
        "{subs:?}"
    );
}

#[tokio::test]
async fn evictions_respect_the_pod_disruption_budget() {
    bounded(evictions_inner()).await;
}

async fn evictions_inner() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use kube::api::EvictParams;
    let server = ApiServer::start().await.expect("server starts");
    let client = common::client_without_retries(&server).await;
    let labels = json!({"app": "w"});
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    pdbs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "w"},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}}}))
        .expect("pdb"),
    )
    .await
    .expect("pdb created");
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for g in ["a", "b"] {
        let sts = sets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": g},
                    "spec": {"replicas": 1, "serviceName": g, "selector": {"matchLabels": labels},
                        "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}))
                .expect("sts"),
            )
            .await
            .expect("sts created");
        let mut pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": format!("{g}-0"), "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        )
        .expect("pod");
        pod.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "StatefulSet".into(),
            name: g.into(),
            uid: sts.uid().expect("uid"),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("pod");
        pods.patch_status(
            &format!("{g}-0"),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .expect("ready");
    }
    pods.evict("a-0", &EvictParams::default())
        .await
        .expect("one disruption is allowed");
    assert!(pods.get_opt("a-0").await.expect("get").is_none(), "evicted");
    // a-0 is gone and not replaced yet: its StatefulSet still expects it, so b-0 must stay.
    match pods.evict("b-0", &EvictParams::default()).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(
                (e.code, e.reason.as_str()),
                (429, "TooManyRequests"),
                "{e:?}"
            );
            assert!(e.message.contains("disruption budget"), "{e:?}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    assert!(pods.get_opt("b-0").await.expect("get").is_some());
}
