//! The shared conformance suite on the embedded memory backend.

use cachegate_store::memory::MemoryStore;

cachegate_store::conformance_tests!(async { MemoryStore::new(64 * 1024 * 1024, 8 * 1024 * 1024) });
