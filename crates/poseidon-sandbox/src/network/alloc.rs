//! Allocation of runner addresses (as offsets into the subnet) and host ports.

use std::collections::BTreeSet;

/// Numbers `first..=last`, handed out round-robin so that a freed address or port is not
/// reused at once (stale connection-tracking entries and clients of the previous runner
/// would otherwise reach the next one).
#[derive(Debug)]
pub(super) struct Pool {
    first: u32,
    last: u32,
    next: u32,
    used: BTreeSet<u32>,
}

impl Pool {
    pub(super) fn new(first: u32, last: u32) -> Pool {
        Pool { first, last, next: first, used: BTreeSet::new() }
    }

    pub(super) fn take(&mut self) -> Option<u32> {
        let size = self.last.checked_sub(self.first)? + 1;
        let candidate = (0..size)
            .map(|i| self.first + (self.next - self.first + i) % size)
            .find(|n| !self.used.contains(n))?;
        self.used.insert(candidate);
        self.next = if candidate == self.last { self.first } else { candidate + 1 };
        Some(candidate)
    }

    pub(super) fn give_back(&mut self, n: u32) {
        self.used.remove(&n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_handed_out_round_robin_until_exhausted() {
        let mut pool = Pool::new(5, 7);
        assert_eq!([pool.take(), pool.take()], [Some(5), Some(6)]);
        pool.give_back(5);
        assert_eq!(pool.take(), Some(7));
        assert_eq!(pool.take(), Some(5));
        assert_eq!(pool.take(), None);
        pool.give_back(6);
        assert_eq!(pool.take(), Some(6));
    }
}
