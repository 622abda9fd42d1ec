//! A record as read, decoded once for each value the memory store holds
//! (when it is stored): a memory hit reuses the decoded record (no
//! checksum over the body, no parsing) and what the proxy derived from it
//! (its header map, built on the value's first hit), both dropped with the
//! value (prepared hits).

use std::any::Any;
use std::sync::{Arc, OnceLock};

use crate::{Record, WriteId};

/// A decoded record, and what a caller derived from it.
pub struct Found {
    record: Record,
    /// The write it was read from, when the backend names writes
    /// ([`crate::WriteId`]): a later read asks whether it is still current.
    write: Option<WriteId>,
    derived: OnceLock<Arc<dyn Any + Send + Sync>>,
}

/// Where the memory store keeps a value's [`Found`] once it is decoded.
pub type FoundSlot = Arc<OnceLock<Arc<Found>>>;

impl Found {
    pub fn new(record: Record) -> Self {
        Found::read(record, None)
    }

    /// A record read from the value of `write`.
    pub fn read(record: Record, write: Option<WriteId>) -> Self {
        Found {
            record,
            write,
            derived: OnceLock::new(),
        }
    }

    /// The write this record was read from, if the backend named it.
    pub fn write(&self) -> Option<&WriteId> {
        self.write.as_ref()
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The record, owned (a copy when it is shared).
    pub fn into_record(self: Arc<Self>) -> Record {
        match Arc::try_unwrap(self) {
            Ok(found) => found.record,
            Err(shared) => shared.record.clone(),
        }
    }

    /// What `derive` makes of the record: made once per value and kept
    /// with it (a second caller asking for another type gets its own,
    /// not kept).
    pub fn derived<T: Any + Send + Sync>(&self, derive: impl FnOnce(&Record) -> T) -> Arc<T> {
        if let Some(kept) = self.derived.get() {
            if let Ok(t) = kept.clone().downcast::<T>() {
                return t;
            }
        }
        let made = Arc::new(derive(&self.record));
        let _ = self.derived.set(made.clone());
        made
    }
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found")
            .field("record", &self.record)
            .field("derived", &self.derived.get().is_some())
            .finish()
    }
}
