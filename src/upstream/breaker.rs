//! One upstream breaker (the guard keeps one for the upstream host and one
//! per endpoint, see `proxy::guard`). Like resilience4j's, it opens on a
//! failure *rate*, never on N failures in a row: when, over the last
//! `window`, at least `min_calls` calls were reported and `failure_rate`
//! percent or more of them failed, it opens and nothing is sent for
//! `open_for`; then one request goes through as a probe. Its success
//! closes the breaker (with an empty window), its failure opens it again.
//! A probe that never reports (its task was dropped) is given up after
//! `open_for`, and another request probes.
//!
//! The window is kept as ten slices of `window / 10` (calls and failures
//! counted per slice), so a breaker is a few hundred bytes whatever the
//! traffic, and a slice older than the window drops out as a whole.
//!
//! The clock is passed in, so the states are tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a breaker opens, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerRules {
    /// Percent (1–100) of the calls in the window that must have failed.
    pub failure_rate: u8,
    /// Calls the window must hold before the rate counts; 0: never opens.
    pub min_calls: u32,
    pub window: Duration,
    pub open_for: Duration,
}

const SLICES: usize = 10;

#[derive(Debug)]
pub struct Breaker {
    rules: BreakerRules,
    /// Slice numbers count from here.
    epoch: Instant,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slice {
    /// Which slice of time since `epoch` this one counts.
    number: u64,
    calls: u32,
    failures: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { slices: [Slice; SLICES] },
    Open { until: Instant },
    Probing { since: Instant },
}

const CLOSED: State = State::Closed {
    slices: [Slice {
        number: 0,
        calls: 0,
        failures: 0,
    }; SLICES],
};

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
    pub fn new(rules: BreakerRules, now: Instant) -> Self {
        Breaker {
            rules,
            epoch: now,
            state: Mutex::new(CLOSED),
        }
    }

    /// Whether the breaker is closed (for callers that may drop an idle
    /// breaker: a closed one with an empty window loses nothing).
    pub fn is_closed(&self) -> bool {
        matches!(
            *self.state.lock().unwrap_or_else(|p| p.into_inner()),
            State::Closed { .. }
        )
    }

    pub fn admit(&self, now: Instant) -> Admit {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let open_for = self.rules.open_for;
        match *state {
            State::Closed { .. } => Admit::Go,
            State::Open { until } if now < until => Admit::Refused {
                retry_in: until - now,
            },
            State::Probing { since } if now < since + open_for => Admit::Refused {
                retry_in: since + open_for - now,
            },
            State::Open { .. } | State::Probing { .. } => {
                *state = State::Probing { since: now };
                Admit::Probe
            }
        }
    }

    /// An admitted request that will not be sent after all (held back by
    /// the request budget), or whose outcome says nothing about this
    /// breaker's scope: if it was the probe, the next request probes.
    pub fn abandon(&self, admitted: Admit, now: Instant) {
        if admitted != Admit::Probe {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Probing { .. } = *state {
            *state = State::Open { until: now };
        }
    }

    /// The slice `now` falls in.
    fn slice_number(&self, now: Instant) -> u64 {
        let slice = (self.rules.window / SLICES as u32).max(Duration::from_millis(1));
        (now.saturating_duration_since(self.epoch).as_nanos() / slice.as_nanos()) as u64
    }

    /// Report how an admitted request went (`failed`: a failure of this
    /// breaker's scope). Returns true when this report opened the breaker.
    pub fn report(&self, admitted: Admit, failed: bool, now: Instant) -> bool {
        let number = self.slice_number(now);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            State::Closed { slices } => {
                let slot = &mut slices[(number % SLICES as u64) as usize];
                if slot.number != number {
                    *slot = Slice {
                        number,
                        ..Slice::default()
                    };
                }
                slot.calls = slot.calls.saturating_add(1);
                slot.failures = slot.failures.saturating_add(u32::from(failed));
                if !failed || self.rules.min_calls == 0 {
                    return false;
                }
                let (calls, failures) = slices
                    .iter()
                    .filter(|s| number.saturating_sub(s.number) < SLICES as u64 && s.calls > 0)
                    .fold((0u64, 0u64), |(c, f), s| {
                        (c + u64::from(s.calls), f + u64::from(s.failures))
                    });
                if calls < u64::from(self.rules.min_calls)
                    || failures * 100 < calls * u64::from(self.rules.failure_rate)
                {
                    return false;
                }
                *state = State::Open {
                    until: now + self.rules.open_for,
                };
                true
            }
            // Only the probe's outcome counts; a request admitted before
            // the breaker opened that ends late changes nothing.
            State::Probing { .. } if admitted == Admit::Probe => {
                *state = if failed {
                    State::Open {
                        until: now + self.rules.open_for,
                    }
                } else {
                    CLOSED
                };
                failed
            }
            State::Open { .. } | State::Probing { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(10);
    const RULES: BreakerRules = BreakerRules {
        failure_rate: 50,
        min_calls: 4,
        window: Duration::from_secs(10),
        open_for: OPEN_FOR,
    };

    fn breaker(rules: BreakerRules, t: Instant) -> Breaker {
        Breaker::new(rules, t)
    }

    /// Report `failed` outcomes in turn at `t`.
    fn feed(b: &Breaker, t: Instant, outcomes: &[bool]) {
        for &failed in outcomes {
            b.report(Admit::Go, failed, t);
        }
    }

    #[test]
    fn opens_on_the_failure_rate_once_min_calls_are_in() {
        let t = Instant::now();
        let b = breaker(RULES, t);
        // Three failures in a row: fewer calls than min_calls.
        feed(&b, t, &[true, true, true]);
        assert_eq!(b.admit(t), Admit::Go);
        // The fourth call is a failure too: 4 of 4.
        assert!(b.report(Admit::Go, true, t));
        assert_eq!(
            b.admit(t + Duration::from_secs(4)),
            Admit::Refused {
                retry_in: Duration::from_secs(6)
            }
        );
    }

    #[test]
    fn failures_among_many_successes_never_open() {
        let t = Instant::now();
        let b = breaker(RULES, t);
        // One failure in four, a hundred times over: 25 failures, well
        // past min_calls, never half of the window.
        for _ in 0..100 {
            feed(&b, t, &[true, false, false, false]);
        }
        assert_eq!(b.admit(t), Admit::Go);
        // Exactly the rate opens: 2 failures of 4.
        let b = breaker(RULES, t);
        feed(&b, t, &[false, true, false]);
        assert!(b.report(Admit::Go, true, t));
    }

    #[test]
    fn calls_older_than_the_window_drop_out() {
        let t = Instant::now();
        let b = breaker(RULES, t);
        feed(&b, t, &[true, true, true]);
        // Past the window, those three no longer count: three more
        // failures are three calls, under min_calls.
        let later = t + RULES.window + Duration::from_secs(1);
        feed(&b, later, &[true, true, true]);
        assert_eq!(b.admit(later), Admit::Go);
        // Within the window they count together.
        let b = breaker(RULES, t);
        feed(&b, t, &[true, true]);
        feed(&b, t + Duration::from_secs(8), &[true, true]);
        assert!(matches!(
            b.admit(t + Duration::from_secs(8)),
            Admit::Refused { .. }
        ));
    }

    #[test]
    fn one_probe_then_closed_or_open_again() {
        let t = Instant::now();
        let b = breaker(RULES, t);
        feed(&b, t, &[true; 4]);
        let later = t + OPEN_FOR;
        assert_eq!(b.admit(later), Admit::Probe);
        // Only one probe at a time.
        assert!(matches!(b.admit(later), Admit::Refused { .. }));
        assert!(b.report(Admit::Probe, true, later));
        assert!(matches!(
            b.admit(later + Duration::from_secs(9)),
            Admit::Refused { .. }
        ));
        let again = later + OPEN_FOR;
        assert_eq!(b.admit(again), Admit::Probe);
        b.report(Admit::Probe, false, again);
        assert_eq!(b.admit(again), Admit::Go);
        // Closed with an empty window: the failures before do not count.
        feed(&b, again, &[true, true, true]);
        assert_eq!(b.admit(again), Admit::Go);
    }

    #[test]
    fn a_late_failure_does_not_reopen_during_the_probe() {
        let t = Instant::now();
        let b = breaker(RULES, t);
        feed(&b, t, &[true; 4]);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Probe);
        b.report(Admit::Go, true, t + OPEN_FOR); // admitted long before
        b.report(Admit::Probe, false, t + OPEN_FOR);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Go);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let t = Instant::now();
        let b = breaker(RULES, t);
        feed(&b, t, &[true; 4]);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Probe);
        b.abandon(Admit::Probe, t + OPEN_FOR);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Probe);
        b.abandon(Admit::Go, t + OPEN_FOR); // not the probe: no change
        assert!(matches!(b.admit(t + OPEN_FOR), Admit::Refused { .. }));
    }

    #[test]
    fn a_lost_probe_is_replaced() {
        let t = Instant::now();
        let b = breaker(RULES, t);
        feed(&b, t, &[true; 4]);
        assert_eq!(b.admit(t + OPEN_FOR), Admit::Probe);
        // Never reported: after another open_for, someone else probes.
        assert_eq!(b.admit(t + OPEN_FOR * 2), Admit::Probe);
    }

    #[test]
    fn min_calls_zero_never_opens() {
        let t = Instant::now();
        let b = breaker(
            BreakerRules {
                min_calls: 0,
                ..RULES
            },
            t,
        );
        feed(&b, t, &[true; 100]);
        assert_eq!(b.admit(t), Admit::Go);
    }
}
