//! The upstream breaker of one instance: after `threshold` failures in a
//! row (refused connections, timeouts, 502/503/504) it opens and nothing
//! is sent for `open_for`; then one request goes through as a probe. Its
//! success closes the breaker, its failure opens it again. A probe that
//! never reports (its task was dropped) is given up after `open_for`, and
//! another request probes.
//!
//! The clock is passed in, so the states are tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Breaker {
    /// Failures in a row that open it; 0 never opens.
    threshold: u32,
    open_for: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    Probing { since: Instant },
}

/// Whether a request may go to the upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// Go, as the one request that tests an open breaker.
    Probe,
    /// Don't: the breaker is open for about this much longer.
    Refused {
        retry_in: Duration,
    },
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Breaker {
            threshold,
            open_for,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub fn admit(&self, now: Instant) -> Admit {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *state {
            State::Closed { .. } => Admit::Go,
            State::Open { until } if now < until => Admit::Refused {
                retry_in: until - now,
            },
            State::Probing { since } if now < since + self.open_for => Admit::Refused {
                retry_in: since + self.open_for - now,
            },
            State::Open { .. } | State::Probing { .. } => {
                *state = State::Probing { since: now };
                Admit::Probe
            }
        }
    }

    /// An admitted request that will not be sent after all (held back by
    /// the request budget): if it was the probe, the next request probes.
    pub fn abandon(&self, admitted: Admit, now: Instant) {
        if admitted != Admit::Probe {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Probing { .. } = *state {
            *state = State::Open { until: now };
        }
    }

    /// Report how an admitted request went (`failed`: refused, timed out or
    /// a gateway failure).
    pub fn report(&self, admitted: Admit, failed: bool, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match (*state, failed) {
            (_, false) => *state = State::Closed { failures: 0 },
            (State::Closed { failures }, true) => {
                let failures = failures.saturating_add(1);
                *state = if self.threshold > 0 && failures >= self.threshold {
                    tracing::warn!(
                        failures,
                        open_for = ?self.open_for,
                        "upstream breaker open: not calling the upstream; answering stale where allowed"
                    );
                    State::Open {
                        until: now + self.open_for,
                    }
                } else {
                    State::Closed { failures }
                };
            }
            // Only the probe's failure reopens; a request admitted before
            // the breaker opened that fails late changes nothing.
            (State::Probing { .. }, true) if admitted == Admit::Probe => {
                tracing::warn!(open_for = ?self.open_for, "upstream probe failed: breaker open again");
                *state = State::Open {
                    until: now + self.open_for,
                };
            }
            (State::Open { .. } | State::Probing { .. }, true) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(10);

    #[test]
    fn opens_after_threshold_failures_in_a_row() {
        let b = Breaker::new(3, OPEN_FOR);
        let t = Instant::now();
        b.report(Admit::Go, true, t);
        b.report(Admit::Go, true, t);
        b.report(Admit::Go, false, t); // a success resets the run
        b.report(Admit::Go, true, t);
        b.report(Admit::Go, true, t);
        assert_eq!(b.admit(t), Admit::Go);
        b.report(Admit::Go, true, t);
        assert_eq!(
            b.admit(t + Duration::from_secs(4)),
            Admit::Refused {
                retry_in: Duration::from_secs(6)
            }
        );
    }

    #[test]
    fn one_probe_then_closed_or_open_again() {
        let b = Breaker::new(1, OPEN_FOR);
        let t = Instant::now();
        b.report(Admit::Go, true, t);
        let later = t + OPEN_FOR;
        assert_eq!(b.admit(later), Admit::Probe);
        // Only one probe at a time.
        assert!(matches!(b.admit(later), Admit::Refused { .. }));
        b.report(Admit::Probe, true, later);
        assert!(matches!(
            b.admit(later + Duration::from_secs(9)),
            Admit::Refused { .. }
        ));
        let again = later + OPEN_FOR;
        assert_eq!(b.admit(again), Admit::Probe);
        b.report(Admit::Probe, false, again);
        assert_eq!(b.admit(again), Admit::Go);
    }

    #[test]
    fn a_late_failure_does_not_reopen_during_the_probe() {
        let b = Breaker::new(1, OPEN_FOR);
        let t = Instant::now();
        b.report(Admit::Go, true, t);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Probe);
        b.report(Admit::Go, true, t + OPEN_FOR); // admitted long before
        b.report(Admit::Probe, false, t + OPEN_FOR);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Go);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let b = Breaker::new(1, OPEN_FOR);
        let t = Instant::now();
        b.report(Admit::Go, true, t);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Probe);
        b.abandon(Admit::Probe, t + OPEN_FOR);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Probe);
        b.abandon(Admit::Go, t + OPEN_FOR); // not the probe: no change
        assert!(matches!(b.admit(t + OPEN_FOR), Admit::Refused { .. }));
    }

    #[test]
    fn a_lost_probe_is_replaced() {
        let b = Breaker::new(1, OPEN_FOR);
        let t = Instant::now();
        b.report(Admit::Go, true, t);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Probe);
        // Never reported: after another open_for, someone else probes.
        assert_eq!(b.admit(t + OPEN_FOR * 2), Admit::Probe);
    }

    #[test]
    fn threshold_zero_never_opens() {
        let b = Breaker::new(0, OPEN_FOR);
        let t = Instant::now();
        for _ in 0..100 {
            b.report(Admit::Go, true, t);
        }
        assert_eq!(b.admit(t), Admit::Go);
    }
}
