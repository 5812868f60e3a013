//! Every deadline of the core in one ordered set, served by one task (mini-redis'
//! `purge_expired_tasks`): inactivity timeouts of claimed runners and the expiry of stored
//! executions.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::time::Instant;

use crate::ids::{ExecutionId, RunnerId};
use crate::manager::Shared;

/// What a deadline is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TimerKey {
    Inactivity(RunnerId),
    StoredExecution(RunnerId, ExecutionId),
}

/// Deadlines ordered by time.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    set: BTreeSet<(Instant, TimerKey)>,
}

impl Deadlines {
    /// Adds a deadline; `true` when it became the earliest, so the timer task must wake up.
    pub(crate) fn insert(&mut self, at: Instant, key: TimerKey) -> bool {
        let earliest = self.next().is_none_or(|next| at < next);
        self.set.insert((at, key));
        earliest
    }

    pub(crate) fn remove(&mut self, at: Instant, key: TimerKey) {
        self.set.remove(&(at, key));
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.set.first().map(|(at, _)| *at)
    }

    /// Removes and returns every deadline at or before `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Vec<TimerKey> {
        let mut expired = Vec::new();
        while let Some((at, _)) = self.set.first() {
            if *at > now {
                break;
            }
            let (_, key) = self.set.pop_first().expect("checked above");
            expired.push(key);
        }
        expired
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set.len()
    }
}

/// The timer task: handles what expired, then sleeps until the next deadline or a wake-up.
pub(crate) async fn run(shared: Arc<Shared>) {
    loop {
        let next = shared.expire_due(Instant::now());
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shared.stopping.cancelled() => return,
            () = sleep => {}
            () = shared.timer_wakeup.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ids::EnvironmentId;

    #[test]
    fn expired_deadlines_pop_in_order_and_later_ones_stay() {
        let now = Instant::now();
        let runner = RunnerId::new(EnvironmentId(1));
        let execution = ExecutionId::new();
        let mut deadlines = Deadlines::default();
        assert!(
            deadlines.insert(now + Duration::from_secs(5), TimerKey::Inactivity(runner.clone()))
        );
        assert!(
            !deadlines.insert(now + Duration::from_secs(9), TimerKey::Inactivity(runner.clone()))
        );
        assert!(deadlines.insert(now, TimerKey::StoredExecution(runner.clone(), execution)));
        assert_eq!(
            deadlines.pop_expired(now + Duration::from_secs(5)),
            vec![
                TimerKey::StoredExecution(runner.clone(), execution),
                TimerKey::Inactivity(runner.clone())
            ]
        );
        assert_eq!(deadlines.next(), Some(now + Duration::from_secs(9)));
        deadlines.remove(now + Duration::from_secs(9), TimerKey::Inactivity(runner));
        assert_eq!(deadlines.len(), 0);
    }
}
