//! The audit log: events are logged at once as structured events (target `smartdb::audit`)
//! and stored in batches by a background writer, so a flood of failed calls never waits on
//! the store. Old events are trimmed by age and count.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::store::{AuditRecord, EdgeStore};

/// Events waiting to be stored; beyond this they are dropped (and counted), never blocking.
const QUEUE: usize = 10_000;
/// Most events stored in one write.
const BATCH: usize = 500;
/// How often old events are trimmed.
const TRIM_EVERY: Duration = Duration::from_secs(60);

enum Message {
    Event(AuditRecord),
    Flush(oneshot::Sender<()>),
}

/// Handle to the audit writer.
pub struct Auditor {
    tx: mpsc::Sender<Message>,
}

impl Auditor {
    /// Starts the writer over `store`, keeping events for `retention` and at most `max_events`.
    pub fn start(store: Arc<dyn EdgeStore>, retention: Duration, max_events: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(store, rx, retention, max_events));
        Self { tx }
    }

    /// Logs an event and queues it for storing.
    pub fn record(&self, event: AuditRecord) {
        tracing::info!(
            target: "smartdb::audit",
            action = %event.action,
            outcome = %event.outcome,
            key_id = %event.key_id,
            tenant = %event.tenant,
            peer = %event.peer,
            method = %event.method,
            detail = %event.detail,
            "audit"
        );
        if self.tx.try_send(Message::Event(event)).is_err() {
            metrics::counter!("smartdb_audit_dropped_total").increment(1);
        }
    }

    /// Waits until every event recorded so far is stored.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn write(
    store: Arc<dyn EdgeStore>,
    mut rx: mpsc::Receiver<Message>,
    retention: Duration,
    max_events: usize,
) {
    let mut last_trim = std::time::Instant::now() - TRIM_EVERY;
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Event(e) => batch.push(e),
                Message::Flush(done) => flushes.push(done),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = store.append_audit(&batch).await {
                metrics::counter!("smartdb_audit_dropped_total").increment(batch.len() as u64);
                tracing::error!(error = %e, events = batch.len(), "cannot store audit events");
            }
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        if last_trim.elapsed() >= TRIM_EVERY {
            last_trim = std::time::Instant::now();
            let before = SystemTime::now()
                .checked_sub(retention)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            match store.trim_audit(before, max_events).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(events = n, "trimmed the audit log"),
                Err(e) => tracing::warn!(error = %e, "cannot trim the audit log"),
            }
        }
    }
}
