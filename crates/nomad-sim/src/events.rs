//! The event buffer and `GET /v1/event/stream`.
//!
//! Batches are kept in a bounded buffer (Nomad's `event_buffer_size`, default 100). A
//! subscriber starts at the first buffered batch whose index is at least the requested one
//! (inclusive), at the newest batch when the index is beyond the end, at the oldest for
//! `index=0`; then it follows new batches. One raft write can produce several lines with the
//! same index, so batches carry a private sequence number for the cursors.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// One event of a batch.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub topic: &'static str,
    pub kind: &'static str,
    pub key: String,
    pub namespace: String,
    pub filter_keys: Option<Vec<String>>,
    pub index: u64,
    pub payload: Value,
}

/// One line of the stream.
#[derive(Debug)]
pub(crate) struct Batch {
    seq: u64,
    index: u64,
    events: Vec<Event>,
}

/// The last batches, bounded.
#[derive(Debug)]
pub(crate) struct EventBuffer {
    size: usize,
    batches: VecDeque<Arc<Batch>>,
    next_seq: u64,
    published: watch::Sender<u64>,
}

/// Where a subscriber reads next: a batch sequence number.
pub(crate) type Cursor = u64;

impl EventBuffer {
    pub fn new(size: usize) -> EventBuffer {
        EventBuffer {
            size: size.max(1),
            batches: VecDeque::new(),
            next_seq: 0,
            published: watch::Sender::new(0),
        }
    }

    /// Appends one line; every event gets the batch's index.
    pub fn publish(&mut self, index: u64, mut events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        for event in &mut events {
            event.index = index;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.batches.push_back(Arc::new(Batch { seq, index, events }));
        while self.batches.len() > self.size {
            self.batches.pop_front();
        }
        self.published.send_replace(self.next_seq);
    }

    /// Forgets every buffered batch (a server restart); indexes continue.
    pub fn clear(&mut self) {
        self.batches.clear();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Nomad's `StartAtClosest` for a requested index.
    pub fn start(&self, index: u64) -> Cursor {
        if index == 0 {
            return self.batches.front().map_or(self.next_seq, |b| b.seq);
        }
        match self.batches.iter().find(|b| b.index >= index) {
            Some(batch) => batch.seq,
            None => self.batches.back().map_or(self.next_seq, |b| b.seq),
        }
    }

    /// Batches from `cursor` on, or `None` if the subscriber fell behind the buffer.
    pub fn read(&self, cursor: Cursor) -> Option<Vec<Arc<Batch>>> {
        if self.batches.front().is_some_and(|b| b.seq > cursor) {
            return None;
        }
        Some(self.batches.iter().filter(|b| b.seq >= cursor).cloned().collect())
    }
}

/// Which events a subscriber wants.
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    /// Topic → keys; `*` for any topic or key.
    topics: BTreeMap<String, BTreeSet<String>>,
    namespace: String,
}

impl Filter {
    /// From the `topic` parameters (`Topic:Key`, a bare topic meaning `Topic:*`).
    pub fn parse(topics: &[String], namespace: &str) -> Result<Filter, String> {
        let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for topic in topics {
            let (name, key) = topic.split_once(':').unwrap_or((topic.as_str(), "*"));
            if name.is_empty() || key.is_empty() {
                return Err(format!("Invalid topic query: invalid topic format {topic:?}"));
            }
            map.entry(name.to_owned()).or_default().insert(key.to_owned());
        }
        if map.is_empty() {
            map.insert("*".into(), BTreeSet::from(["*".to_owned()]));
        }
        Ok(Filter { topics: map, namespace: namespace.to_owned() })
    }

    fn matches(&self, event: &Event) -> bool {
        if self.namespace != "*" && !event.namespace.is_empty() && event.namespace != self.namespace
        {
            return false;
        }
        let keys = [self.topics.get(event.topic), self.topics.get("*")];
        keys.into_iter().flatten().any(|keys| {
            keys.contains("*")
                || keys.contains(&event.key)
                || event.filter_keys.iter().flatten().any(|k| keys.contains(k))
        })
    }

    /// The line for a batch, or `None` if nothing in it passes.
    pub fn line(&self, batch: &Batch) -> Option<Bytes> {
        let events: Vec<Value> = batch
            .events
            .iter()
            .filter(|e| self.matches(e))
            .map(|e| {
                json!({
                    "Topic": e.topic, "Type": e.kind, "Key": e.key, "Namespace": e.namespace,
                    "FilterKeys": e.filter_keys, "Index": e.index, "Payload": e.payload,
                })
            })
            .collect();
        if events.is_empty() {
            return None;
        }
        let mut line = serde_json::to_vec(&json!({"Index": batch.index, "Events": events}))
            .unwrap_or_default();
        line.push(b'\n');
        Some(Bytes::from(line))
    }
}

/// Why a subscription ends.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    /// The client went away.
    Closed,
    /// The subscriber fell behind the buffer, or the stream was dropped on purpose.
    Dropped,
}

/// What a stream producer needs from the simulator.
pub(crate) trait BatchSource: Send + Sync + 'static {
    fn read(&self, cursor: Cursor) -> Option<Vec<Arc<Batch>>>;
}

/// Writes heartbeats and matching batches to `out` until the client leaves, the
/// subscriber lags, or `dropped` changes.
pub(crate) async fn produce(
    source: Arc<dyn BatchSource>,
    mut cursor: Cursor,
    filter: Filter,
    heartbeat: Duration,
    mut published: watch::Receiver<u64>,
    mut dropped: watch::Receiver<u64>,
    out: mpsc::Sender<Bytes>,
) -> StreamEnd {
    const HEARTBEAT: &[u8] = b"{}\n";
    if out.send(Bytes::from_static(HEARTBEAT)).await.is_err() {
        return StreamEnd::Closed;
    }
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    loop {
        let Some(batches) = source.read(cursor) else {
            return StreamEnd::Dropped;
        };
        for batch in batches {
            cursor = batch.seq + 1;
            if let Some(line) = filter.line(&batch)
                && out.send(line).await.is_err()
            {
                return StreamEnd::Closed;
            }
        }
        tokio::select! {
            changed = published.changed() => {
                if changed.is_err() {
                    return StreamEnd::Dropped;
                }
            }
            _ = ticker.tick() => {
                if out.send(Bytes::from_static(HEARTBEAT)).await.is_err() {
                    return StreamEnd::Closed;
                }
            }
            _ = dropped.changed() => return StreamEnd::Dropped,
            () = out.closed() => return StreamEnd::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(topic: &'static str, key: &str, namespace: &str) -> Event {
        Event {
            topic,
            kind: "PlanResult",
            key: key.into(),
            namespace: namespace.into(),
            filter_keys: Some(vec!["job".into(), String::new()]),
            index: 0,
            payload: json!({}),
        }
    }

    #[test]
    fn start_is_inclusive_and_closest() {
        let mut buffer = EventBuffer::new(3);
        for index in [5, 5, 7, 9] {
            buffer.publish(index, vec![event("Job", "a", "default")]);
        }
        // Size 3: the first batch (index 5) is gone.
        assert_eq!(buffer.start(0), 1);
        assert_eq!(buffer.start(5), 1);
        assert_eq!(buffer.start(6), 2);
        assert_eq!(buffer.start(9), 3);
        assert_eq!(buffer.start(100), 3, "beyond the end: the newest batch again");
        assert!(buffer.read(0).is_none(), "a cursor behind the buffer has lagged");
        assert_eq!(buffer.read(2).map(|b| b.len()), Some(2));
    }

    #[test]
    fn filter_by_topic_key_and_namespace() {
        let filter = Filter::parse(&["Allocation:job".into(), "Job".into()], "poseidon").unwrap();
        assert!(filter.matches(&event("Allocation", "x", "poseidon")), "filter key");
        assert!(!filter.matches(&event("Allocation", "x", "default")), "namespace");
        assert!(!filter.matches(&event("Evaluation", "x", "poseidon")), "topic");
        assert!(filter.matches(&event("Job", "x", "poseidon")));
        assert!(Filter::parse(&[":x".into()], "default").is_err());
        let all = Filter::parse(&[], "*").unwrap();
        assert!(all.matches(&event("Evaluation", "x", "other")));
    }
}
