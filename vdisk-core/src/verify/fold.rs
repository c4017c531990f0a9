//! The in-order fold behind the digests: results computed in parallel, in any order, are folded
//! in position order through a bounded window.
//!
//! A thread deposits the result for `start..end` (positions in whatever unit the fold counts:
//! blocks, bytes). A deposit that starts where the fold stands is folded at once, with every
//! waiting deposit that continues it; one further ahead waits in a map; one more than `window`
//! ahead blocks its thread until the fold catches up, which bounds what the map holds. Callers
//! take work in position order, so the deposit the fold waits for is always within the window
//! and its thread never blocks: the wait cannot deadlock.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::error::{Error, ErrorKind, Result};

/// What a fold does with each result, in position order.
pub(crate) trait Fold<R> {
    /// Fold the next result.
    fn fold(&mut self, result: R);
}

struct State<R, F> {
    /// Position up to which everything has been folded.
    next: u64,
    /// Deposits ahead of `next`: start -> (end, result).
    pending: BTreeMap<u64, (u64, R)>,
    fold: F,
    stopped: bool,
}

/// See the module documentation.
pub(crate) struct OrderedFold<R, F> {
    state: Mutex<State<R, F>>,
    advanced: Condvar,
    window: u64,
}

impl<R, F: Fold<R>> OrderedFold<R, F> {
    /// A fold standing at position 0 that lets deposits run at most `window` positions ahead.
    pub(crate) fn new(window: u64, fold: F) -> Self {
        OrderedFold {
            state: Mutex::new(State { next: 0, pending: BTreeMap::new(), fold, stopped: false }),
            advanced: Condvar::new(),
            window,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<R, F>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hand over the result for `start..end`; blocks while `start` is more than the window ahead
    /// of the fold. Fails only once [`OrderedFold::stop`] was called, or on a deposit that
    /// overlaps what is already folded or waiting (a caller bug, reported rather than folded).
    pub(crate) fn deposit(&self, start: u64, end: u64, result: R) -> Result<()> {
        let mut state = self.lock();
        while start > state.next.saturating_add(self.window) && !state.stopped {
            state = self.advanced.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        if state.stopped {
            return Err(Error::new(ErrorKind::Cancelled, "stopped"));
        }
        let overlaps_next = state.pending.range(start..).next().is_some_and(|(&s, _)| s < end);
        let overlaps_prev = state.pending.range(..start).next_back().is_some_and(|(_, (e, _))| *e > start);
        if start < state.next || end < start || overlaps_next || overlaps_prev {
            return Err(Error::invalid(format!(
                "internal error: digest range {start:#x}..{end:#x} deposited twice (folded up to {:#x})",
                state.next
            )));
        }
        if start != state.next {
            state.pending.insert(start, (end, result));
            return Ok(());
        }
        let state = &mut *state;
        state.fold.fold(result);
        state.next = end;
        while let Some(entry) = state.pending.first_entry() {
            if *entry.key() != state.next {
                break;
            }
            let (end, result) = entry.remove();
            state.fold.fold(result);
            state.next = end;
        }
        self.advanced.notify_all();
        Ok(())
    }

    /// Release every waiting thread and refuse further deposits (the work is being abandoned).
    pub(crate) fn stop(&self) {
        self.lock().stopped = true;
        self.advanced.notify_all();
    }

    /// The position folded up to, whether anything is still waiting, and the fold.
    pub(crate) fn into_parts(self) -> (u64, bool, F) {
        let state = self.state.into_inner().unwrap_or_else(PoisonError::into_inner);
        (state.next, !state.pending.is_empty(), state.fold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Vec<u32>);

    impl Fold<u32> for Collect {
        fn fold(&mut self, r: u32) {
            self.0.push(r);
        }
    }

    #[test]
    fn folds_in_position_order_whatever_the_deposit_order() {
        let fold = OrderedFold::new(100, Collect(Vec::new()));
        fold.deposit(10, 20, 2).unwrap();
        fold.deposit(20, 25, 3).unwrap();
        fold.deposit(0, 10, 1).unwrap();
        fold.deposit(25, 26, 4).unwrap();
        assert!(fold.deposit(5, 8, 9).is_err());
        let (next, waiting, c) = fold.into_parts();
        assert_eq!((next, waiting, c.0), (26, false, vec![1, 2, 3, 4]));
    }

    #[test]
    fn a_deposit_past_the_window_waits_for_the_fold() {
        let fold = OrderedFold::new(10, Collect(Vec::new()));
        std::thread::scope(|s| {
            let far = s.spawn(|| fold.deposit(50, 60, 2));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!far.is_finished());
            fold.deposit(0, 50, 1).unwrap();
            far.join().unwrap().unwrap();
        });
        assert_eq!(fold.into_parts().2 .0, vec![1, 2]);
    }

    #[test]
    fn stop_releases_waiters() {
        let fold = OrderedFold::new(10, Collect(Vec::new()));
        std::thread::scope(|s| {
            let far = s.spawn(|| fold.deposit(50, 60, 2));
            std::thread::sleep(std::time::Duration::from_millis(20));
            fold.stop();
            assert_eq!(far.join().unwrap().unwrap_err().kind(), ErrorKind::Cancelled);
        });
    }
}
