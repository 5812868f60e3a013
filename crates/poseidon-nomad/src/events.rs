//! The event stream consumer: allocation and job events into the [`Tracker`], resumption by
//! index after a dropped stream, and a full reconciliation after every (re)connection and
//! periodically, because the stream is a change feed with gaps, not a log (nomad-api §3.3).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::client::{NomadClient, NomadError};
use crate::tracker::{Allocation, Tracker};

/// Nomad sends a heartbeat every 30 s; a stream silent for longer is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(70);
/// A batch line longer than this is refused (Nomad's job payloads are far smaller).
const MAX_LINE: usize = 16 << 20;
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(200);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
struct Batch {
    #[serde(rename = "Index", default)]
    index: u64,
    #[serde(rename = "Events", default)]
    events: Option<Vec<Event>>,
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "Topic", default)]
    topic: String,
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Key", default)]
    key: String,
    #[serde(rename = "Payload", default)]
    payload: Value,
}

/// Follows the event stream until `stop`; reconnects with back-off, resuming after the last
/// index seen.
pub(crate) async fn follow(
    client: NomadClient,
    tracker: Arc<Tracker>,
    reconcile_interval: Duration,
    stop: CancellationToken,
) {
    let mut next_index = 0;
    let mut delay = FIRST_RECONNECT_DELAY;
    while !stop.is_cancelled() {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            stream = client.event_stream(next_index) => stream,
        };
        match stream {
            Ok(stream) => {
                delay = FIRST_RECONNECT_DELAY;
                tracing::debug!(index = next_index, "following Nomad's event stream");
                reconcile(&client, &tracker).await;
                let consumer =
                    consume(stream, &client, &tracker, reconcile_interval, &mut next_index);
                let ended = tokio::select! {
                    () = stop.cancelled() => return,
                    ended = consumer => ended,
                };
                tracing::warn!(reason = %ended, "Nomad's event stream ended; resubscribing");
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?delay, "cannot subscribe to Nomad's events")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

/// Lists every allocation of the namespace and applies it to the tracked runners.
pub(crate) async fn reconcile(client: &NomadClient, tracker: &Tracker) {
    if tracker.is_empty() {
        return;
    }
    match client.allocations().await {
        Ok((allocations, _)) => {
            let allocations: Vec<Allocation> = allocations
                .into_iter()
                .filter_map(|allocation| serde_json::from_value(allocation).ok())
                .collect();
            tracker.reconcile(&allocations);
        }
        Err(error) => tracing::warn!(%error, "cannot reconcile with Nomad's allocations"),
    }
}

/// Reads batches until the stream ends; returns why it ended.
async fn consume(
    stream: impl Stream<Item = reqwest::Result<bytes::Bytes>>,
    client: &NomadClient,
    tracker: &Tracker,
    reconcile_interval: Duration,
    next_index: &mut u64,
) -> String {
    let mut stream = std::pin::pin!(stream);
    let mut buffer = BytesMut::new();
    let mut reconciliation = tokio::time::interval(reconcile_interval);
    reconciliation.reset();
    loop {
        let chunk = tokio::select! {
            _ = reconciliation.tick() => {
                reconcile(client, tracker).await;
                continue;
            }
            chunk = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => chunk,
        };
        let chunk = match chunk {
            Err(_) => return format!("no heartbeat for {IDLE_TIMEOUT:?}"),
            Ok(None) => return "end of stream".to_owned(),
            Ok(Some(Err(error))) => return NomadError::Unreachable(error.to_string()).to_string(),
            Ok(Some(Ok(chunk))) => chunk,
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|byte| *byte == b'\n') {
            let line = buffer.split_to(end + 1);
            if let Err(error) = handle_line(&line[..end], tracker, next_index) {
                return error;
            }
        }
        if buffer.len() > MAX_LINE {
            buffer.advance(buffer.len());
            return format!("an event line exceeded {MAX_LINE} bytes");
        }
    }
}

fn handle_line(line: &[u8], tracker: &Tracker, next_index: &mut u64) -> Result<(), String> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(());
    }
    let batch: Batch =
        serde_json::from_slice(line).map_err(|error| format!("undecodable event: {error}"))?;
    let events = batch.events.unwrap_or_default();
    if batch.index == 0 && events.is_empty() {
        return Ok(());
    }
    for event in events {
        handle_event(event, tracker);
    }
    *next_index = (*next_index).max(batch.index + 1);
    Ok(())
}

fn handle_event(event: Event, tracker: &Tracker) {
    match (event.topic.as_str(), event.kind.as_str()) {
        ("Allocation", _) => {
            let allocation = event.payload.get("Allocation").cloned().unwrap_or(Value::Null);
            match serde_json::from_value::<Allocation>(allocation) {
                Ok(allocation) => tracker.apply(&allocation),
                Err(error) => tracing::warn!(%error, "undecodable allocation event"),
            }
        }
        ("Job", "JobDeregistered") => tracker.job_deregistered(&event.key),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::Phase;

    #[test]
    fn batches_update_runners_and_advance_the_index_heartbeats_do_not() {
        let tracker = Tracker::default();
        let phase = tracker.watch("1-a");
        let mut index = 0;
        handle_line(b"{}", &tracker, &mut index).unwrap();
        assert_eq!(index, 0);
        let running = br#"{"Index":31,"Events":[{"Topic":"Allocation","Type":"AllocationUpdated",
            "Key":"A","Namespace":"default","FilterKeys":["1-a",""],"Index":31,
            "Payload":{"Allocation":{"ID":"A","JobID":"1-a","TaskGroup":"default-group",
            "ClientStatus":"running","DesiredStatus":"run","CreateIndex":30,"ModifyIndex":31}}}]}"#;
        handle_line(
            &running.iter().copied().filter(|b| *b != b'\n').collect::<Vec<_>>(),
            &tracker,
            &mut index,
        )
        .unwrap();
        assert_eq!(index, 32);
        assert_eq!(*phase.borrow(), Phase::Running { allocation: "A".into() });
        let deregistered = br#"{"Index":40,"Events":[{"Topic":"Job","Type":"JobDeregistered","Key":"1-a","Payload":{"Job":{}}}]}"#;
        handle_line(deregistered, &tracker, &mut index).unwrap();
        assert_eq!(index, 41);
        assert!(matches!(*phase.borrow(), Phase::Ended(_)));
        assert!(handle_line(b"{not json", &tracker, &mut index).is_err());
    }
}
