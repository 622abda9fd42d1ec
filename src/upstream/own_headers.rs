//! cachegate's own upstream credentials (`upstream.headers`): request
//! headers added to every upstream call, with values that are literals or
//! read from the environment, AWS Secrets Manager or SSM Parameter Store.
//!
//! - Read at start-up: a value that cannot be read stops start-up, naming
//!   the header and where it was looked for (never the value).
//! - Read again every `upstream.headers_refresh` (the first call after the
//!   interval starts the read; calls meanwhile use the old values), and at
//!   once when the upstream answers 401 or 403 (at most once every
//!   [`FORCED_REFRESH_MIN`]): a rotated secret is picked up without a
//!   restart. A read that fails keeps the old values and is logged.
//! - Never logged (values are marked sensitive, `Debug` shows names only),
//!   never part of a key: the proxy drops a client's own copy of these
//!   headers before anything reads the request
//!   ([`OwnHeaders::drop_client_copies`]), and they are added only to the
//!   request that goes upstream ([`OwnHeaders::apply`]). Requests so sent
//!   are made with cachegate's identity: their answers are shared across
//!   clients like any other.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::OwnHeaderSource;

/// The least time between two reads forced by 401/403 answers, so a
/// credential the upstream keeps refusing does not turn every request
/// into a Secrets Manager call.
pub const FORCED_REFRESH_MIN: Duration = Duration::from_secs(10);

/// The headers and their current values.
pub struct OwnHeaders {
    sources: Vec<(HeaderName, OwnHeaderSource)>,
    current: RwLock<Arc<HeaderMap>>,
    every: Duration,
    /// When the values were last read, and when a forced read last ran.
    read_at: Mutex<(Instant, Option<Instant>)>,
    /// Held while a read runs: one at a time.
    reading: tokio::sync::Mutex<()>,
    readers: Readers,
}

impl std::fmt::Debug for OwnHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnHeaders")
            .field("sources", &self.sources)
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

impl OwnHeaders {
    /// Read every value once; `None` when there are no such headers.
    /// `Err` names the header and the source that could not be read.
    pub async fn load(
        sources: Vec<(HeaderName, OwnHeaderSource)>,
        every: Duration,
    ) -> Result<Option<Arc<OwnHeaders>>, String> {
        if sources.is_empty() {
            return Ok(None);
        }
        let readers = Readers::default();
        let values = read_all(&sources, &readers).await?;
        Ok(Some(Arc::new(OwnHeaders {
            sources,
            current: RwLock::new(Arc::new(values)),
            every,
            read_at: Mutex::new((Instant::now(), None)),
            reading: tokio::sync::Mutex::new(()),
            readers,
        })))
    }

    /// The header names.
    pub fn names(&self) -> impl Iterator<Item = &HeaderName> {
        self.sources.iter().map(|(n, _)| n)
    }

    /// Remove a client's own copies of these headers: the upstream sees
    /// only cachegate's, and the request is not taken for a personal one.
    pub fn drop_client_copies(&self, headers: &mut HeaderMap) {
        for name in self.names() {
            headers.remove(name);
        }
    }

    /// Set the current values on a request about to go upstream; start a
    /// read in the background when the values are due for one.
    pub fn apply(self: &Arc<Self>, headers: &mut HeaderMap) {
        let current = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, value) in current.iter() {
            headers.insert(name.clone(), value.clone());
        }
        if self.refreshes() && self.due() {
            let this = self.clone();
            tokio::spawn(async move {
                this.read_again(false).await;
            });
        }
    }

    /// The upstream refused the credentials (401, 403): read them again
    /// now, unless that was done less than [`FORCED_REFRESH_MIN`] ago.
    /// Whether the values changed (then the request may be sent again).
    pub async fn refused(&self) -> bool {
        if !self.refreshes() {
            return false;
        }
        {
            let read_at = self.read_at.lock().unwrap_or_else(|p| p.into_inner());
            if read_at.1.is_some_and(|t| t.elapsed() < FORCED_REFRESH_MIN) {
                return false;
            }
        }
        self.read_again(true).await
    }

    fn refreshes(&self) -> bool {
        self.sources.iter().any(|(_, s)| s.refreshes())
    }

    fn due(&self) -> bool {
        let read_at = self.read_at.lock().unwrap_or_else(|p| p.into_inner());
        read_at.0.elapsed() >= self.every
    }

    /// Read every value again; keep the old ones when that fails.
    /// Whether any value changed.
    async fn read_again(&self, forced: bool) -> bool {
        let Ok(_reading) = self.reading.try_lock() else {
            return false;
        };
        {
            let mut read_at = self.read_at.lock().unwrap_or_else(|p| p.into_inner());
            read_at.0 = Instant::now();
            if forced {
                read_at.1 = Some(Instant::now());
            }
        }
        match read_all(&self.sources, &self.readers).await {
            Ok(values) => {
                let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
                let changed = **current != values;
                if changed {
                    tracing::info!(headers = ?self.names().collect::<Vec<_>>(), "upstream.headers read again: values changed");
                }
                *current = Arc::new(values);
                changed
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream.headers could not be read again; keeping the values read before");
                false
            }
        }
    }
}

/// Every value, as sensitive header values.
async fn read_all(
    sources: &[(HeaderName, OwnHeaderSource)],
    readers: &Readers,
) -> Result<HeaderMap, String> {
    let mut values = HeaderMap::with_capacity(sources.len());
    for (name, source) in sources {
        let text = read_one(source, readers)
            .await
            .map_err(|e| format!("upstream.headers.{name}: {e}"))?;
        let mut value = HeaderValue::from_str(text.trim()).map_err(|_| {
            format!("upstream.headers.{name}: the value read from {source:?} is not a header value")
        })?;
        value.set_sensitive(true);
        values.insert(name.clone(), value);
    }
    Ok(values)
}

async fn read_one(source: &OwnHeaderSource, readers: &Readers) -> Result<String, String> {
    match source {
        OwnHeaderSource::Literal(v) => Ok(v.clone()),
        OwnHeaderSource::Env(var) => std::env::var(var)
            .map_err(|_| format!("the environment variable {var} is not set (or not UTF-8)")),
        OwnHeaderSource::SecretsManager { id, field } => {
            let secret = readers.secret(id).await?;
            match field {
                None => Ok(secret),
                Some(field) => json_field(&secret, field).ok_or_else(|| {
                    format!(
                        "the secret {id} is not a JSON object with a string or number `{field}`"
                    )
                }),
            }
        }
        OwnHeaderSource::Ssm(name) => readers.parameter(name).await,
    }
}

/// `field` of a JSON object, as text (a string, or a number written out).
fn json_field(json: &str, field: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(json)
        .ok()?
        .get(field)?
    {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The AWS clients, made on first use (most configurations never need
/// them).
#[derive(Default)]
struct Readers {
    #[cfg(feature = "upstream-secrets")]
    sdk: tokio::sync::OnceCell<aws_config::SdkConfig>,
}

#[cfg(feature = "upstream-secrets")]
impl Readers {
    async fn sdk(&self) -> &aws_config::SdkConfig {
        self.sdk
            .get_or_init(|| async {
                aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .http_client(cachegate_aws_http::https_client())
                    .load()
                    .await
            })
            .await
    }

    async fn secret(&self, id: &str) -> Result<String, String> {
        let client = aws_sdk_secretsmanager::Client::new(self.sdk().await);
        let out = client
            .get_secret_value()
            .secret_id(id)
            .send()
            .await
            .map_err(|e| format!("Secrets Manager GetSecretValue {id}: {}", sdk_error(&e)))?;
        out.secret_string.ok_or_else(|| {
            format!("the secret {id} has no SecretString (binary secrets are not read)")
        })
    }

    async fn parameter(&self, name: &str) -> Result<String, String> {
        let client = aws_sdk_ssm::Client::new(self.sdk().await);
        let out = client
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| format!("SSM GetParameter {name}: {}", sdk_error(&e)))?;
        out.parameter
            .and_then(|p| p.value)
            .ok_or_else(|| format!("the parameter {name} has no value"))
    }
}

#[cfg(feature = "upstream-secrets")]
fn sdk_error<E, R>(e: &aws_sdk_ssm::error::SdkError<E, R>) -> String
where
    E: aws_sdk_ssm::error::ProvideErrorMetadata,
{
    use aws_sdk_ssm::error::SdkError;
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "{}: {}",
                err.code().unwrap_or("error"),
                err.message().unwrap_or("(no message)")
            )
        }
        other => format!("{other}"),
    }
}

#[cfg(not(feature = "upstream-secrets"))]
impl Readers {
    async fn secret(&self, id: &str) -> Result<String, String> {
        Err(format!(
            "secretsmanager:{id} needs the `upstream-secrets` feature, which this build left out"
        ))
    }
    async fn parameter(&self, name: &str) -> Result<String, String> {
        Err(format!(
            "ssm:{name} needs the `upstream-secrets` feature, which this build left out"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_are_strings_or_numbers() {
        assert_eq!(
            json_field(r#"{"key":"abc"}"#, "key").as_deref(),
            Some("abc")
        );
        assert_eq!(json_field(r#"{"key":42}"#, "key").as_deref(), Some("42"));
        assert_eq!(json_field(r#"{"key":{"a":1}}"#, "key"), None);
        assert_eq!(json_field("not json", "key"), None);
        assert_eq!(json_field(r#"{"other":"x"}"#, "key"), None);
    }

    #[tokio::test]
    async fn values_are_sensitive_and_never_in_debug() {
        std::env::set_var("CG_TEST_OWN_HEADER", "from-env-1");
        let own = OwnHeaders::load(
            vec![
                (
                    HeaderName::from_static("x-api-key"),
                    OwnHeaderSource::Literal("literal-secret".into()),
                ),
                (
                    HeaderName::from_static("x-env-key"),
                    OwnHeaderSource::Env("CG_TEST_OWN_HEADER".into()),
                ),
            ],
            Duration::from_secs(300),
        )
        .await
        .unwrap()
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("the-clients"));
        own.drop_client_copies(&mut h);
        assert!(h.is_empty());
        own.apply(&mut h);
        assert_eq!(h["x-api-key"], "literal-secret");
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(h["x-env-key"], "from-env-1");
        let debug = format!("{own:?}");
        assert!(!debug.contains("literal-secret"), "{debug}");
        // A refusal re-reads the environment: a rotated value is used.
        std::env::set_var("CG_TEST_OWN_HEADER", "from-env-2");
        assert!(own.refused().await);
        own.apply(&mut h);
        assert_eq!(h["x-env-key"], "from-env-2");
        // Not again within FORCED_REFRESH_MIN.
        std::env::set_var("CG_TEST_OWN_HEADER", "from-env-3");
        assert!(!own.refused().await);
        // A missing variable stops loading, naming the header.
        let err = OwnHeaders::load(
            vec![(
                HeaderName::from_static("x-k"),
                OwnHeaderSource::Env("CG_TEST_SURELY_UNSET_VARIABLE".into()),
            )],
            Duration::from_secs(300),
        )
        .await
        .unwrap_err();
        assert!(err.contains("upstream.headers.x-k"), "{err}");
    }
}
