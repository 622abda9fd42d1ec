//! A rate budget shared by everyone using a store: [`CacheStore::take_permit`](crate::CacheStore::take_permit).
//!
//! The proxy limits how many requests per second all instances sharing a
//! backend send upstream. Each budget is one number per key, its
//! *theoretical arrival time* (TAT), kept by the generic cell rate
//! algorithm (GCRA): with `emission = 1 / per_second` and
//! `tolerance = emission × (burst − 1)`, a request at `now` may go at
//! `allow_at = max(tat, now) − tolerance`. If that is within the caller's
//! `max_wait`, the slot is reserved by moving the TAT on by one emission
//! and the caller goes at `allow_at` (or at once when that has passed);
//! otherwise nothing changes. Over any window of `T` seconds, at most
//! `burst + T × per_second` granted requests have their go-time in it,
//! however many callers there are, as long as each step is atomic, which
//! every backend guarantees (a mutex, one Lua script, a conditional write).
//!
//! Whose clock `now` is: memory's own monotonic clock; Redis the server's
//! `TIME` (the instances' clocks do not matter); DynamoDB each caller's
//! wall clock, so an instance whose clock runs `d` ahead of the others
//! acts as if its burst were `d × per_second` larger (the bound becomes
//! `burst + (T + d) × per_second`), and one running behind gets less.
//!
//! Time is counted in whole microseconds; `emission` is rounded *up* to a
//! microsecond so rounding never lets more through than the rate. The
//! arithmetic lives here once ([`gcra`]); Redis repeats it in its Lua
//! script (it must run on the server, against the server's clock).

use std::time::Duration;

use crate::StoreError;

/// Rate: `per_second` permits a second on average (> 0, finite), at most
/// `burst` (>= 1) at once.
///
/// Valid rates (see [`Rate::check`]) also keep `emission × (burst − 1)`
/// within [`MAX_SPAN`]: a budget never needs to look further ahead than
/// that, and the numbers stay exact in every backend (Lua numbers are
/// doubles). Time is whole microseconds, so a rate above a million a
/// second acts as a million, and any other is kept at or just below
/// what it says (3/s: one per 333 334 µs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Permits a second on average (> 0).
    pub per_second: f64,
    /// Permits that may be handed out at once after an idle spell (>= 1).
    pub burst: u32,
}

/// The outcome of [`CacheStore::take_permit`](crate::CacheStore::take_permit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Go after `wait` ([`Duration::ZERO`] = now); the slot is reserved,
    /// whether or not the caller then uses it.
    Granted { wait: Duration },
    /// No slot within `max_wait`; nothing was reserved. `retry_in` is the
    /// time until a call with the same `max_wait` would be granted if
    /// nobody else takes a permit meanwhile (never zero).
    Denied { retry_in: Duration },
}

/// The furthest ahead a budget looks: tolerance and `max_wait` are capped
/// here (2^48 µs, about 8.9 years).
pub const MAX_SPAN: Duration = Duration::from_micros(1 << 48);

const MAX_SPAN_US: u64 = 1 << 48;

impl Rate {
    /// `per_second` on average, `burst` at once (checked by [`Rate::check`]
    /// where it is used, not here).
    pub fn new(per_second: f64, burst: u32) -> Self {
        Rate { per_second, burst }
    }

    /// Microseconds between two permits, rounded up (at least 1).
    pub fn emission_us(&self) -> u64 {
        let us = (1e6 / self.per_second).ceil();
        if us.is_finite() && us >= 1.0 {
            (us as u64).min(MAX_SPAN_US)
        } else {
            1
        }
    }

    /// Microseconds a request may be ahead of the steady pace: `burst − 1`
    /// emissions.
    pub fn tolerance_us(&self) -> u64 {
        self.emission_us()
            .saturating_mul(u64::from(self.burst.saturating_sub(1)))
            .min(MAX_SPAN_US)
    }

    /// A rate the backends can keep exactly, or why not: `per_second`
    /// must be finite and > 0, `burst` >= 1, and the burst must span at
    /// most [`MAX_SPAN`]. Every backend checks before touching its server.
    pub fn check(&self, backend: &'static str) -> Result<(), StoreError> {
        let emission = 1e6 / self.per_second;
        let invalid = if !(self.per_second.is_finite() && self.per_second > 0.0) {
            Some("per_second must be finite and > 0")
        } else if self.burst == 0 {
            Some("burst must be >= 1")
        } else if !(emission * f64::from(self.burst - 1) <= MAX_SPAN_US as f64
            && emission <= MAX_SPAN_US as f64)
        {
            Some("burst / per_second spans more than MAX_SPAN")
        } else {
            None
        };
        match invalid {
            Some(why) => Err(StoreError::Backend {
                backend,
                message: format!("invalid rate {self:?}: {why}"),
            }),
            None => Ok(()),
        }
    }
}

/// The wall clock in unix microseconds, for backends that keep budgets on
/// their clients' clocks.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `max_wait` in whole microseconds (rounded down: never waits longer than
/// asked), capped at [`MAX_SPAN`].
pub fn max_wait_us(max_wait: Duration) -> u64 {
    u64::try_from(max_wait.as_micros())
        .unwrap_or(u64::MAX)
        .min(MAX_SPAN_US)
}

/// One GCRA step, decided from the stored TAT (`None` when there is none
/// or it expired) at `now`; all in microseconds on one clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Store `new_tat` and hand out the permit.
    Grant { new_tat: u64, wait_us: u64 },
    /// Store nothing.
    Deny { retry_in_us: u64 },
}

/// The GCRA step (see the module docs). `emission_us`, `tolerance_us` and
/// `max_wait_us` as from [`Rate::emission_us`], [`Rate::tolerance_us`],
/// [`max_wait_us`].
pub fn gcra(
    stored_tat: Option<u64>,
    now: u64,
    emission_us: u64,
    tolerance_us: u64,
    max_wait_us: u64,
) -> Step {
    let tat = stored_tat.map_or(now, |t| t.max(now));
    // How far ahead of now the request may go (tat >= now, so this is
    // allow_at − now, or 0 when allow_at has passed).
    let ahead = tat - now;
    if ahead <= tolerance_us.saturating_add(max_wait_us) {
        Step::Grant {
            new_tat: tat + emission_us,
            wait_us: ahead.saturating_sub(tolerance_us),
        }
    } else {
        Step::Deny {
            retry_in_us: ahead - tolerance_us - max_wait_us,
        }
    }
}

impl Step {
    /// The step as the caller sees it.
    pub fn permit(self) -> Permit {
        match self {
            Step::Grant { wait_us, .. } => Permit::Granted {
                wait: Duration::from_micros(wait_us),
            },
            Step::Deny { retry_in_us } => Permit::Denied {
                retry_in: Duration::from_micros(retry_in_us),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emission_rounds_up_and_tolerance_spans_the_burst() {
        let r = Rate::new(3.0, 4);
        assert_eq!(r.emission_us(), 333_334);
        assert_eq!(r.tolerance_us(), 3 * 333_334);
        assert_eq!(Rate::new(50.0, 1).tolerance_us(), 0);
        assert_eq!(Rate::new(2e9, 1).emission_us(), 1);
    }

    #[test]
    fn invalid_rates_are_refused() {
        for bad in [
            Rate::new(0.0, 1),
            Rate::new(-1.0, 1),
            Rate::new(f64::NAN, 1),
            Rate::new(f64::INFINITY, 1),
            Rate::new(10.0, 0),
            Rate::new(1e-9, 2),
            Rate::new(1.0, u32::MAX),
        ] {
            assert!(bad.check("test").is_err(), "{bad:?} accepted");
        }
        assert!(Rate::new(1e-3, 100).check("test").is_ok());
        assert!(Rate::new(50.0, 1).check("test").is_ok());
    }

    /// The burst goes at once, then one per emission; a denial stores
    /// nothing and its retry_in is exactly when the same call succeeds.
    #[test]
    fn burst_then_pace_and_exact_retry() {
        let (e, tol) = (100, 200); // burst 3
        let mut tat = None;
        for _ in 0..3 {
            match gcra(tat, 1_000, e, tol, 0) {
                Step::Grant { new_tat, wait_us } => {
                    assert_eq!(wait_us, 0);
                    tat = Some(new_tat);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(tat, Some(1_300));
        assert_eq!(gcra(tat, 1_000, e, tol, 0), Step::Deny { retry_in_us: 100 });
        assert_eq!(gcra(tat, 1_000, e, tol, 30), Step::Deny { retry_in_us: 70 });
        assert!(matches!(
            gcra(tat, 1_070, e, tol, 30),
            Step::Grant { wait_us: 30, .. }
        ));
        assert!(matches!(
            gcra(tat, 1_100, e, tol, 0),
            Step::Grant {
                wait_us: 0,
                new_tat: 1_400
            }
        ));
        // Waiting callers are spaced by one emission.
        assert_eq!(
            gcra(tat, 1_000, e, tol, 1_000),
            Step::Grant {
                new_tat: 1_400,
                wait_us: 100
            }
        );
        assert_eq!(
            gcra(Some(1_400), 1_000, e, tol, 1_000),
            Step::Grant {
                new_tat: 1_500,
                wait_us: 200
            }
        );
        // An old TAT counts as none: the full burst again.
        assert!(matches!(
            gcra(Some(5), 10_000, e, tol, 0),
            Step::Grant {
                wait_us: 0,
                new_tat: 10_100
            }
        ));
    }
}
