//! Running units of work on a fixed set of threads, taken in order from one planner, while the
//! calling thread reports progress and watches for cancellation (the same division of labour as
//! the copy engine, for checksum and compare).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::copy::Progress;

/// How the calling thread reports.
#[derive(Clone, Copy)]
pub(crate) struct Reporting<'a> {
    /// Called with (done, total) at most every `interval`, and once at the end of a success.
    pub(crate) progress: Option<Progress<'a>>,
    /// Set from any thread to stop.
    pub(crate) cancel: Option<&'a AtomicBool>,
    pub(crate) interval: Duration,
}

/// Take units from `units` (in order, under a lock) on `threads` threads and run `work` on each
/// with a per-thread state from `init`. The first error stops the others and is returned (then
/// `on_stop` runs, to release threads that wait on one another); cancellation returns
/// `cancelled()`. `done` is the progress counter `work` advances, out of `total`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<U, S, E>(
    threads: usize,
    units: impl Iterator<Item = Result<U, E>> + Send,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, U) -> Result<(), E> + Sync,
    on_stop: impl Fn() + Sync,
    cancelled: impl Fn() -> E,
    done: &AtomicU64,
    total: u64,
    reporting: &Reporting<'_>,
) -> Result<(), E>
where
    U: Send,
    E: Send,
{
    let units = Mutex::new(units);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    let fail = |e: E| {
        let mut first = first_error.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(e);
        }
        drop(first);
        stop.store(true, Relaxed);
        on_stop();
    };
    let mut user_cancelled = false;
    std::thread::scope(|s| {
        let (alive_tx, alive_rx) = mpsc::channel::<()>();
        for i in 0..threads.max(1) {
            let alive = alive_tx.clone();
            let (units, stop, fail, init, work) = (&units, &stop, &fail, &init, &work);
            let spawned = std::thread::Builder::new().name(format!("vdisk-verify-{i}")).spawn_scoped(s, move || {
                let _alive = alive;
                let mut state = init();
                while !stop.load(Relaxed) {
                    let next = units.lock().unwrap_or_else(PoisonError::into_inner).next();
                    match next {
                        None => break,
                        Some(Err(e)) => fail(e),
                        Some(Ok(unit)) => {
                            if let Err(e) = work(&mut state, unit) {
                                fail(e);
                            }
                        }
                    }
                }
            });
            if spawned.is_err() && i == 0 {
                // Not even one thread: run on this one.
                let mut state = init();
                while let Some(next) = units.lock().unwrap_or_else(PoisonError::into_inner).next() {
                    match next.and_then(|unit| work(&mut state, unit)) {
                        Ok(()) => {}
                        Err(e) => {
                            fail(e);
                            break;
                        }
                    }
                }
            }
        }
        drop(alive_tx);
        let mut last = Instant::now();
        let tick = reporting.interval.min(Duration::from_millis(50)).max(Duration::from_millis(1));
        while let Err(mpsc::RecvTimeoutError::Timeout) = alive_rx.recv_timeout(tick) {
            if !user_cancelled && reporting.cancel.is_some_and(|c| c.load(Relaxed)) {
                user_cancelled = true;
                stop.store(true, Relaxed);
                on_stop();
            }
            if let Some(progress) = reporting.progress {
                if last.elapsed() >= reporting.interval {
                    last = Instant::now();
                    progress(done.load(Relaxed).min(total), total);
                }
            }
        }
    });
    if user_cancelled {
        return Err(cancelled());
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(e);
    }
    if let Some(progress) = reporting.progress {
        progress(total, total);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_unit_and_returns_the_first_error() {
        let done = AtomicU64::new(0);
        let sum = AtomicU64::new(0);
        let reporting = Reporting { progress: None, cancel: None, interval: Duration::from_millis(10) };
        let units = (1..=100u64).map(Ok::<u64, String>);
        run(
            4,
            units,
            || (),
            |_, u| {
                sum.fetch_add(u, Relaxed);
                Ok(())
            },
            || {},
            || "cancelled".to_string(),
            &done,
            0,
            &reporting,
        )
        .unwrap();
        assert_eq!(sum.load(Relaxed), 5050);
        let units = (1..=100u64).map(Ok::<u64, String>);
        let err = run(
            3,
            units,
            || (),
            |_, u| if u == 7 { Err(format!("bad {u}")) } else { Ok(()) },
            || {},
            || "cancelled".to_string(),
            &done,
            0,
            &reporting,
        )
        .unwrap_err();
        assert_eq!(err, "bad 7");
    }
}
