//! The prewarmed pool of one environment: idle runners plus the ones being created.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::backend::Runner;
use crate::ids::RunnerId;

/// A task watching [`Runner::lost`]; dropping it stops watching.
#[derive(Debug)]
pub(crate) struct LostWatcher(JoinHandle<()>);

impl LostWatcher {
    pub(crate) fn new(task: JoinHandle<()>) -> Self {
        Self(task)
    }
}

impl Drop for LostWatcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A runner ready to be claimed.
pub(crate) struct IdleRunner {
    pub(crate) runner: Arc<dyn Runner>,
    pub(crate) watcher: LostWatcher,
}

/// Idle runners (oldest first) and a count of creations in flight (each creator task holds
/// one reservation while it creates or retries).
///
/// Creations count towards the pool so that it never over-provisions. The generation tells
/// creations that finish after the environment was replaced or deleted that they are stale.
pub(crate) struct Pool {
    idle: VecDeque<IdleRunner>,
    starting: usize,
    generation: u64,
}

impl Pool {
    pub(crate) fn new(generation: u64) -> Self {
        Self { idle: VecDeque::new(), starting: 0, generation }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.idle.len()
    }

    /// Reserves slots for new creations, at most up to `size` runners and `max_in_flight`
    /// creations at once, so that even a huge pool never spawns more creators than that;
    /// returns how many creators to start.
    pub(crate) fn reserve_creations(&mut self, size: usize, max_in_flight: usize) -> usize {
        let missing = size.saturating_sub(self.idle.len() + self.starting);
        let count = missing.min(max_in_flight.saturating_sub(self.starting));
        self.starting += count;
        count
    }

    /// A reserved creation succeeded. Returns whether a runner is still missing, in which case
    /// the creator keeps its reservation for the next one.
    pub(crate) fn add_created(&mut self, runner: IdleRunner, size: usize) -> bool {
        self.idle.push_back(runner);
        let still_missing = self.idle.len() + self.starting <= size;
        if !still_missing {
            self.starting = self.starting.saturating_sub(1);
        }
        still_missing
    }

    /// Takes a runner that survived a restart when the pool has room for it; gives it back
    /// otherwise (it is surplus).
    pub(crate) fn adopt_idle(&mut self, runner: IdleRunner, size: usize) -> Result<(), IdleRunner> {
        if self.idle.len() + self.starting >= size {
            return Err(runner);
        }
        self.idle.push_back(runner);
        Ok(())
    }

    /// Reserves one slot for a runner that was starting before a restart; `false` when the
    /// pool is full without it.
    pub(crate) fn reserve_starting(&mut self, size: usize) -> bool {
        let room = self.idle.len() + self.starting < size;
        if room {
            self.starting += 1;
        }
        room
    }

    pub(crate) fn take_idle(&mut self) -> Option<IdleRunner> {
        self.idle.pop_front()
    }

    pub(crate) fn remove_idle(&mut self, id: &RunnerId) -> Option<IdleRunner> {
        let position = self.idle.iter().position(|idle| idle.runner.id() == id)?;
        self.idle.remove(position)
    }

    /// Empties the pool; the runners are to be destroyed.
    pub(crate) fn drain(&mut self) -> Vec<Arc<dyn Runner>> {
        self.idle.drain(..).map(|idle| idle.runner).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_count_creations_in_flight_and_respect_the_bound() {
        let mut pool = Pool::new(1);
        assert_eq!(pool.reserve_creations(5, 2), 2);
        assert_eq!(pool.reserve_creations(5, 2), 0);
        assert_eq!(pool.reserve_creations(usize::MAX, 8), 6);
        let mut pool = Pool::new(1);
        assert_eq!(pool.reserve_creations(1, 8), 1);
        assert_eq!(pool.reserve_creations(1, 8), 0);
    }
}
