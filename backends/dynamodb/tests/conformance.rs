//! The shared conformance suite against a DynamoDB-compatible server
//! (dynalite, started by scripts/services/dynamodb.sh).

mod common;

cachegate_store::conformance_tests!(common::store());
