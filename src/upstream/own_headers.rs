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

/// Reads Secrets Manager and SSM: one signed JSON call each
/// (`GetSecretValue`, `GetParameter`), with the region and credential
/// chain of the AWS configuration (made on first use: most
/// configurations never need it), over the HTTPS client the SDKs use.
/// Not the two SDK crates: they did the same for 1.15 MB of the function
/// binary.
#[derive(Default)]
struct Readers {
    #[cfg(feature = "upstream-secrets")]
    aws: tokio::sync::OnceCell<Aws>,
}

#[cfg(feature = "upstream-secrets")]
struct Aws {
    sdk: aws_config::SdkConfig,
    http: reqwest::Client,
}

/// Longest one Secrets Manager or SSM call may take.
#[cfg(feature = "upstream-secrets")]
const AWS_CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(feature = "upstream-secrets")]
impl Readers {
    async fn aws(&self) -> Result<&Aws, String> {
        self.aws
            .get_or_try_init(|| async {
                let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .http_client(cachegate_aws_http::https_client())
                    .load()
                    .await;
                crate::tls::install_crypto_provider();
                let http = reqwest::Client::builder()
                    .timeout(AWS_CALL_TIMEOUT)
                    .build()
                    .map_err(|e| format!("HTTPS client: {e}"))?;
                Ok(Aws { sdk, http })
            })
            .await
    }

    async fn secret(&self, id: &str) -> Result<String, String> {
        let out = self
            .aws()
            .await?
            .call(
                AwsService::SecretsManager,
                "secretsmanager.GetSecretValue",
                serde_json::json!({ "SecretId": id }),
            )
            .await
            .map_err(|e| format!("Secrets Manager GetSecretValue {id}: {e}"))?;
        out.get("SecretString")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                format!("the secret {id} has no SecretString (binary secrets are not read)")
            })
    }

    async fn parameter(&self, name: &str) -> Result<String, String> {
        let out = self
            .aws()
            .await?
            .call(
                AwsService::Ssm,
                "AmazonSSM.GetParameter",
                serde_json::json!({ "Name": name, "WithDecryption": true }),
            )
            .await
            .map_err(|e| format!("SSM GetParameter {name}: {e}"))?;
        out.pointer("/Parameter/Value")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("the parameter {name} has no value"))
    }
}

/// The two services read, as SigV4 and the endpoint resolver name them.
#[cfg(feature = "upstream-secrets")]
#[derive(Debug, Clone, Copy)]
enum AwsService {
    SecretsManager,
    Ssm,
}

#[cfg(feature = "upstream-secrets")]
impl AwsService {
    /// The signing name and endpoint prefix.
    fn name(self) -> &'static str {
        match self {
            AwsService::SecretsManager => "secretsmanager",
            AwsService::Ssm => "ssm",
        }
    }

    /// The service-specific endpoint variable the SDKs read
    /// (`AWS_ENDPOINT_URL_<SERVICE ID>`).
    fn endpoint_variable(self) -> &'static str {
        match self {
            AwsService::SecretsManager => "AWS_ENDPOINT_URL_SECRETS_MANAGER",
            AwsService::Ssm => "AWS_ENDPOINT_URL_SSM",
        }
    }

    /// `AWS_ENDPOINT_URL_<SERVICE>`, else `AWS_ENDPOINT_URL`, else the
    /// regional endpoint (`amazonaws.com.cn` in the China regions).
    fn endpoint(self, region: &str) -> String {
        let set = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
        set(self.endpoint_variable())
            .or_else(|| set("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| {
                let suffix = if region.starts_with("cn-") {
                    "amazonaws.com.cn"
                } else {
                    "amazonaws.com"
                };
                format!("https://{}.{region}.{suffix}", self.name())
            })
    }
}

#[cfg(feature = "upstream-secrets")]
impl Aws {
    /// One AWS JSON 1.1 call, signed with SigV4; the answer's JSON, or
    /// the error the service named (`__type` and message).
    async fn call(
        &self,
        service: AwsService,
        target: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        use aws_credential_types::provider::ProvideCredentials;
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};

        let region = self
            .sdk
            .region()
            .ok_or("no AWS region (set AWS_REGION)")?
            .to_string();
        let credentials = self
            .sdk
            .credentials_provider()
            .ok_or("no AWS credentials provider")?
            .provide_credentials()
            .await
            .map_err(|e| format!("no AWS credentials: {e}"))?;
        let identity: aws_smithy_runtime_api::client::identity::Identity = credentials.into();
        let url = service.endpoint(&region);
        let body = body.to_string();
        let mut request = http::Request::post(&url)
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", target)
            .body(body.clone())
            .map_err(|e| e.to_string())?;
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&region)
            .name(service.name())
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| e.to_string())?
            .into();
        let signable = SignableRequest::new(
            "POST",
            &url,
            request
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| e.to_string())?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| e.to_string())?
            .into_parts();
        instructions.apply_to_request_http1x(&mut request);
        let request = reqwest::Request::try_from(request).map_err(|e| e.to_string())?;
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if status.is_success() {
            return Ok(json);
        }
        let kind = json
            .get("__type")
            .and_then(|t| t.as_str())
            .map(|t| t.rsplit('#').next().unwrap_or(t).to_owned())
            .unwrap_or_else(|| status.to_string());
        let message = json
            .get("message")
            .or_else(|| json.get("Message"))
            .and_then(|m| m.as_str())
            .unwrap_or("");
        Err(format!("{kind}: {message}"))
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
