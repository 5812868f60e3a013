//! Tearing down destroyed runners' network shares in batches, off the destroy path.
//!
//! Removing a veth pair or a port mapping makes the kernel wait for RCU grace periods while it
//! holds the locks that setting up the next runner needs (`rtnl`, the nftables commit mutex):
//! done one runner at a time, every destroy stalled the creations around it. A destroyed
//! runner's veth pair goes away with its namespace anyway; what remains (port mappings,
//! neighbour entries, a veth the kernel has not freed yet) is removed here, many runners per
//! batch, before their addresses and host ports are handed out again.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{Allocations, Attachment, NetworkError, reclaim};

/// How long the reclaimer gathers a batch; also gives the kernel time to free namespaces.
const BATCH_DELAY: Duration = Duration::from_millis(50);
/// Most runners per batch (one nft transaction, one netlink session).
const MAX_BATCH: usize = 256;

/// The reclaiming thread. The queue needs no bound of its own: each queued attachment holds
/// an address of the finite subnet.
#[derive(Debug)]
pub(super) struct Reclaimer {
    queue: Sender<Attachment>,
    thread: JoinHandle<()>,
}

impl Reclaimer {
    pub(super) fn start(
        bridge: &str,
        bridge_index: u32,
        allocations: Arc<Allocations>,
    ) -> Result<Reclaimer, NetworkError> {
        let (queue, receiver) = mpsc::channel();
        let bridge = bridge.to_owned();
        let thread = thread::Builder::new()
            .name(format!("{bridge}-reclaim"))
            .spawn(move || run(&receiver, &bridge, bridge_index, &allocations))
            .map_err(|e| NetworkError::Netlink {
                step: "start the reclaimer",
                reason: e.to_string(),
            })?;
        Ok(Reclaimer { queue, thread })
    }

    pub(super) fn send(&self, attachment: Attachment) {
        // The thread only ends once the queue is closed, in `finish`.
        let _ = self.queue.send(attachment);
    }

    /// Reclaims everything queued, then stops.
    pub(super) fn finish(self) {
        drop(self.queue);
        let _ = self.thread.join();
    }
}

fn run(
    receiver: &Receiver<Attachment>,
    bridge: &str,
    bridge_index: u32,
    allocations: &Allocations,
) {
    while let Ok(first) = receiver.recv() {
        thread::sleep(BATCH_DELAY);
        let mut batch = vec![first];
        batch.extend(receiver.try_iter().take(MAX_BATCH - 1));
        let refs: Vec<&Attachment> = batch.iter().collect();
        if reclaim(bridge, bridge_index, &refs) {
            allocations.give_back(&batch);
        } else {
            tracing::warn!(runners = batch.len(), "runners' addresses and ports stay reserved");
        }
    }
}
