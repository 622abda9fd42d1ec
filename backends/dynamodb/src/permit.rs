//! Rate budgets ([`CacheStore::take_permit`](cachegate_store::CacheStore::take_permit)):
//! one item per budget, advanced by conditional UpdateItems.

use std::time::Duration;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{ReturnValue, ReturnValuesOnConditionCheckFailure};
use cachegate_store::rate::{gcra, max_wait_us, unix_micros, Step};
use cachegate_store::{Permit, Rate, StoreError, StoreKey};

use crate::items::{from_item, key_of, num, permit_pk, ttl_secs, Item, PermitItem, PERMIT_SK};
use crate::{DynamoStore, BACKEND};

/// Conditional writes tried per call before the call is denied. A write
/// that fails its condition either finds the budget spent (denied at once)
/// or finds it crossed between idle and busy since it was read (see
/// [`DynamoStore::take_permit_step`]), so two or three do when few callers
/// contend. Many callers on a budget that keeps going idle (a round trip
/// longer than one emission) can each lose every idle write to another
/// caller's: those others took the slots, so running out is a denial for
/// one emission, never a grant the condition did not confirm. (It used to
/// be an error, and the guard answers a store error with the instance's
/// own `fallback_rps`: contention then let each instance send at its
/// fallback rate beside the shared one.)
pub(crate) const PERMIT_ATTEMPTS: usize = 8;

/// How long a budget's item outlives its TAT (through `ttl`, which
/// DynamoDB applies lazily; a TAT in the past reads as no budget anyway).
const PERMIT_SLACK_MS: u64 = 60_000;

/// Which of the two writes a GCRA step is, by where the stored TAT is
/// relative to `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// No TAT, or one in the past: the new TAT is `now + emission`.
    Idle,
    /// A TAT at or after `now`, within tolerance + max_wait of it: the new
    /// TAT is the stored one + emission, added by DynamoDB itself.
    Busy,
}

impl DynamoStore {
    /// One GCRA step on the client's clock (instances' clocks must agree to
    /// within what the budget may be off by), as one conditional UpdateItem
    /// whose condition is the step's own case: busy (`now <= tat <= now +
    /// tolerance + max_wait`: `SET tat = tat + emission`) or idle (no `tat`
    /// or `tat < now`: `SET tat = now + emission`). DynamoDB checks and
    /// applies it atomically, so concurrent grants on a busy budget never
    /// conflict (each adds its emission), and no grant goes past the rate.
    /// A failed condition tells which case holds (DynamoDB hands back the
    /// item; servers that do not get a strongly consistent read): the other
    /// case is tried, or the call is denied having written nothing.
    pub(crate) async fn take_permit_step(
        &self,
        key: &StoreKey,
        rate: Rate,
        max_wait: Duration,
    ) -> Result<Permit, StoreError> {
        rate.check(BACKEND)?;
        let pk = permit_pk(key);
        let (emission, tolerance, max_wait) = (
            rate.emission_us(),
            rate.tolerance_us(),
            max_wait_us(max_wait),
        );
        // The stored TAT once a write failed, with the time it was current
        // at (`None`: no item). A busy budget is the common case, so the
        // first write assumes it unread.
        let mut known: Option<(Option<u64>, u64)> = None;
        for _ in 0..PERMIT_ATTEMPTS {
            let now = unix_micros();
            let case = match known {
                None => Case::Busy,
                Some((stored, at)) => {
                    // Denied as of when the TAT was read: a fresher `now`
                    // would turn "just over" into "just under" and chase
                    // the slot other callers are taking.
                    let step = gcra(stored, at, emission, tolerance, max_wait);
                    if let Step::Deny { .. } = step {
                        return Ok(step.permit());
                    }
                    if stored.is_some_and(|t| t >= now) {
                        Case::Busy
                    } else {
                        Case::Idle
                    }
                }
            };
            let limit = now + tolerance + max_wait;
            // An upper bound of the new TAT either way.
            let ttl = ttl_secs((limit + emission) / 1000 + PERMIT_SLACK_MS);
            let update = self
                .inner
                .client
                .update_item()
                .table_name(&self.inner.table)
                .set_key(Some(key_of(&pk, PERMIT_SK)))
                .expression_attribute_names("#tat", "tat")
                .expression_attribute_names("#ttl", "ttl")
                .expression_attribute_values(":now", num(now))
                .expression_attribute_values(":ttl", num(ttl))
                .return_values(ReturnValue::UpdatedNew)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            let update = match case {
                Case::Busy => update
                    .update_expression("SET #tat = #tat + :e, #ttl = :ttl")
                    .condition_expression("#tat >= :now AND #tat <= :limit")
                    .expression_attribute_values(":e", num(emission))
                    .expression_attribute_values(":limit", num(limit)),
                Case::Idle => update
                    .update_expression("SET #tat = :new, #ttl = :ttl")
                    .expression_attribute_values(":new", num(now + emission))
                    .condition_expression("attribute_not_exists(#tat) OR #tat < :now"),
            };
            let returned = match update.send().await {
                Ok(out) => {
                    let new_tat = out
                        .attributes
                        .as_ref()
                        .and_then(|a| a.get("tat"))
                        .and_then(|n| n.as_n().ok())
                        .and_then(|n| n.parse::<u64>().ok())
                        .ok_or_else(|| {
                            StoreError::backend(BACKEND, "UpdateItem (permit) returned no tat")
                        })?;
                    // allow_at = old tat − tolerance; old tat = new − emission.
                    let wait = (new_tat - emission).saturating_sub(now + tolerance);
                    return Ok(Permit::Granted {
                        wait: Duration::from_micros(wait),
                    });
                }
                Err(SdkError::ServiceError(e))
                    if e.err().is_conditional_check_failed_exception() =>
                {
                    match e.into_err() {
                        UpdateItemError::ConditionalCheckFailedException(c) => c.item,
                        _ => None,
                    }
                }
                Err(e) => return Err(self.sdk_err("UpdateItem (permit)", e)),
            };
            known = Some(match returned {
                // The item the condition failed on, just after `now`.
                Some(item) => (Some(from_item::<PermitItem>(item, "permit")?.tat), now),
                // No item: none stored, or a server that does not return it.
                None => {
                    let at = unix_micros();
                    (self.read_permit_tat(&pk).await?, at)
                }
            });
        }
        tracing::debug!(
            attempts = PERMIT_ATTEMPTS,
            "permit: other callers took the budget's slots under every conditional write; denied"
        );
        Ok(Permit::Denied {
            retry_in: Duration::from_micros(emission),
        })
    }

    async fn read_permit_tat(&self, pk: &str) -> Result<Option<u64>, StoreError> {
        let out = self
            .inner
            .client
            .get_item()
            .table_name(&self.inner.table)
            .set_key(Some(key_of(pk, PERMIT_SK)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.sdk_err("GetItem (permit)", e))?;
        out.item
            .map(|item: Item| from_item::<PermitItem>(item, "permit").map(|p| p.tat))
            .transpose()
    }
}
