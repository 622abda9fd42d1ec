//! SDK errors as store errors: timeouts, setups no retry can fix, and
//! failed conditions.

use std::fmt;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use cachegate_store::StoreError;

use crate::{DynamoStore, BACKEND};

impl DynamoStore {
    pub(crate) fn sdk_err<E, R>(&self, op: &'static str, e: SdkError<E, R>) -> StoreError
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        if let SdkError::TimeoutError(_) = e {
            return StoreError::Timeout {
                backend: BACKEND,
                after: self.inner.operation_timeout,
            };
        }
        // Errors no retry can fix: said shortly, with what to do (the SDK's
        // full context runs to a kilobyte and says neither).
        let table = &self.inner.table;
        let unusable = match e.code() {
            Some("ResourceNotFoundException") => Some(format!(
                "{op}: table `{table}` does not exist (in this region and endpoint): \
                 run `cachegate init` to create it, or set dynamodb.table"
            )),
            Some(
                code @ ("UnrecognizedClientException"
                | "InvalidSignatureException"
                | "AccessDeniedException"
                | "MissingAuthenticationTokenException"),
            ) => Some(format!(
                "{op}: credentials refused ({code}: {}); check the AWS credentials and the \
                 IAM policy for table `{table}`",
                e.message().unwrap_or("no message")
            )),
            _ => None,
        };
        match unusable {
            Some(message) => StoreError::Unusable {
                backend: BACKEND,
                message,
            },
            None => StoreError::backend(BACKEND, format!("{op}: {}", DisplayErrorContext(&e))),
        }
    }
}

/// True when `e` is a failed condition of a conditional write.
pub(crate) fn condition_failed<E, R>(e: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
{
    e.as_service_error()
        .is_some_and(|s| s.code() == Some("ConditionalCheckFailedException"))
}
