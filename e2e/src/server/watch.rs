//! `GET ...?watch=true`: a stream of watch events read from the resource's feed at the
//! watcher's own pace, with bookmarks, `sendInitialEvents`, tables and metadata-only views.
//!
//! A watcher that falls so far behind that the events it still needs have left the history is
//! told so with an `ERROR` event (410 Expired) and the stream ends, as kube-apiserver ends the
//! watches it cannot keep up: the client relists, and nothing is silently skipped.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{AppState, Req, Target, error_response, partial, selectors, served};
use crate::error::ApiError;
use crate::registry::ResourceInfo;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType, Store, watch_line};
use crate::table::{self, IncludeObject};

/// Events read from the feed at a time.
const BATCH: usize = 256;

/// What one watcher sees of each event.
struct View {
    info: Arc<ResourceInfo>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    table: bool,
    metadata_only: bool,
    include: IncludeObject,
}

impl View {
    /// The line for `obj`, or `None` when the selectors leave it out.
    fn render(&self, kind: EventType, obj: &Arc<Value>) -> Option<Bytes> {
        if !(self.labels.matches(obj) && self.fields.matches(obj)) {
            return None;
        }
        let obj = served(&self.info, obj.clone());
        let line = if self.table {
            watch_line(
                kind.as_str(),
                &table::table(&self.info, &[obj], self.include, json!({})),
            )
        } else if self.metadata_only {
            watch_line(kind.as_str(), &partial(&obj))
        } else {
            watch_line(kind.as_str(), &obj)
        };
        Some(line)
    }

    /// The line for a change: the shared encoding when the watcher wants the object as stored.
    fn event(&self, store: &Store, ev: &Event) -> Option<Bytes> {
        if self
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != ev.key.namespace)
        {
            return None;
        }
        let plain = !self.table
            && !self.metadata_only
            && ev.object["apiVersion"].as_str() == Some(self.info.api_version().as_str())
            && ev.object["kind"].as_str() == Some(self.info.kind.as_str());
        if plain {
            if !(self.labels.matches(&ev.object) && self.fields.matches(&ev.object)) {
                return None;
            }
            return Some(store.line(ev));
        }
        self.render(ev.kind, &ev.object)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let bm = json!({"kind": self.info.kind, "apiVersion": self.info.api_version(), "metadata": meta});
        watch_line("BOOKMARK", &bm)
    }
}

fn expired(message: String) -> Bytes {
    watch_line("ERROR", &ApiError::expired(message).to_status())
}

pub(super) fn watch(st: Arc<AppState>, req: &Req, t: Target) -> Response {
    let (labels, fields) = match selectors(req) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let from = match req
        .q("resourceVersion")
        .filter(|s| !s.is_empty() && *s != "0")
    {
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resource version: {s}"
                )));
            }
        },
        None => None,
    };
    let view = View {
        info: t.info.clone(),
        namespace: t.namespace.clone(),
        labels,
        fields,
        table: req.wants_table(),
        metadata_only: req.wants_metadata(),
        include: IncludeObject::parse(req.q("includeObject")),
    };
    let bookmarks = req.flag("allowWatchBookmarks");
    let initial_end = req.flag("sendInitialEvents");
    let timeout = req
        .q("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let start = st.store.watch(
        &t.info.group,
        &t.info.resource,
        t.namespace.as_deref(),
        from,
    );
    let mut closer = st.faults.closer();
    tokio::spawn(async move {
        let start = match start {
            Ok(s) => s,
            Err(floor) => {
                let why = format!(
                    "too old resource version: {} ({floor})",
                    from.unwrap_or_default()
                );
                let _ = tx.send(expired(why)).await;
                return;
            }
        };
        for obj in &start.current {
            if let Some(b) = view.render(EventType::Added, obj)
                && tx.send(b).await.is_err()
            {
                return;
            }
        }
        if initial_end && tx.send(view.bookmark(start.rv, true)).await.is_err() {
            return;
        }
        let mut cursor = start.cursor;
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(st.bookmark_interval);
        tick.tick().await;
        loop {
            if closer.has_changed().unwrap_or(true) {
                return;
            }
            let from = cursor.after;
            let batch = match st.store.next(&mut cursor, BATCH) {
                Ok(b) => b,
                Err(floor) => {
                    let why = format!(
                        "too old resource version: {from} ({floor}): the watcher fell behind the retained history"
                    );
                    tracing::info!(resource = %t.info.resource, "closing a watch that fell behind: {why}");
                    let _ = tx.send(expired(why)).await;
                    return;
                }
            };
            for ev in &batch.events {
                if let Some(b) = view.event(&st.store, ev)
                    && tx.send(b).await.is_err()
                {
                    return;
                }
            }
            if batch.caught_up.is_none() {
                continue;
            }
            tokio::select! {
                _ = cursor.changed() => {}
                _ = tick.tick(), if bookmarks => {
                    if tx.send(view.bookmark(cursor.after, false)).await.is_err() {
                        return;
                    }
                }
                _ = closer.changed() => return,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
