//! The HTTP client of cachegate's AWS SDK clients (DynamoDB, CloudFront,
//! SQS, and the credential providers of `aws-config`): reqwest, which the
//! binary already has for the upstream, over HTTP/1.1 with rustls and ring.
//!
//! Why not the SDK's own client (`aws-smithy-http-client`): it brings a
//! second hyper client stack and h2, about 0.8 MB of a function binary
//! that Lambda loads on every cold start, for services that all answer
//! over HTTP/1.1. What it did is kept: one connection pool per set of
//! connector settings, the connect and read timeouts the SDK asks for, no
//! proxy from the environment, no redirects followed, and errors sorted
//! into the kinds the SDK's retry strategy reads (timeout, I/O, user).

use std::collections::HashMap;
use std::error::Error;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;

/// The client to set on every SDK configuration or loader
/// (`.http_client(cachegate_aws_http::https_client())`): with the SDK's
/// `default-https-client` feature off (it forces aws-lc-rs as a second
/// crypto provider) there is no default.
pub fn https_client() -> SharedHttpClient {
    SharedHttpClient::new(ReqwestHttpClient::default())
}

/// Timeouts a connector was made for: the SDK asks for a connector per
/// operation attempt, with the settings of the client's `TimeoutConfig`.
type SettingsKey = (Option<Duration>, Option<Duration>);

/// Makes, and keeps, one [`ReqwestConnector`] (one reqwest client, one
/// connection pool) per distinct set of connector settings.
#[derive(Default)]
pub struct ReqwestHttpClient {
    connectors: Mutex<HashMap<SettingsKey, SharedHttpConnector>>,
}

impl fmt::Debug for ReqwestHttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestHttpClient").finish_non_exhaustive()
    }
}

impl ReqwestHttpClient {
    /// The connector for `settings`, made on first use.
    pub fn connector(&self, settings: &HttpConnectorSettings) -> SharedHttpConnector {
        let key = (settings.connect_timeout(), settings.read_timeout());
        let mut connectors = self
            .connectors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        connectors
            .entry(key)
            .or_insert_with(|| SharedHttpConnector::new(ReqwestConnector::new(key.0, key.1)))
            .clone()
    }
}

impl HttpClient for ReqwestHttpClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        self.connector(settings)
    }
}

/// One reqwest client: sends the SDK's signed requests as they are.
#[derive(Debug, Clone)]
pub struct ReqwestConnector {
    /// `Err` when the client could not be built (no usable TLS roots):
    /// every call then fails with the reason, as a user error.
    client: Result<reqwest::Client, Arc<reqwest::Error>>,
}

impl ReqwestConnector {
    /// A client with these timeouts: `connect` bounds the TCP and TLS
    /// set-up, `read` each wait for data from the server (the head and
    /// every read of the body). The SDK's operation and attempt timeouts
    /// bound the whole call on top of these.
    pub fn new(connect: Option<Duration>, read: Option<Duration>) -> ReqwestConnector {
        // reqwest (`rustls-no-provider`) builds on rustls's process-wide
        // provider; ring is the binary's one provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            // The SDK handles redirects as errors of the operation.
            .redirect(reqwest::redirect::Policy::none())
            // As the SDK's own client: HTTP(S)_PROXY are not read.
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90));
        if let Some(connect) = connect {
            builder = builder.connect_timeout(connect);
        }
        if let Some(read) = read {
            builder = builder.read_timeout(read);
        }
        ReqwestConnector {
            client: builder.build().map_err(Arc::new),
        }
    }
}

impl HttpConnector for ReqwestConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = match &self.client {
            Ok(client) => client.clone(),
            Err(err) => {
                let err = ConnectorError::user(err.to_string().into());
                return HttpConnectorFuture::ready(Err(err));
            }
        };
        let request = match to_reqwest(request) {
            Ok(request) => request,
            Err(err) => return HttpConnectorFuture::ready(Err(ConnectorError::user(err))),
        };
        HttpConnectorFuture::new(async move {
            let response = client.execute(request).await.map_err(classify)?;
            let response = http::Response::<reqwest::Body>::from(response);
            HttpResponse::try_from(response.map(SdkBody::from_body_1_x))
                .map_err(|err| ConnectorError::other(err.into(), None))
        })
    }
}

type BoxError = Box<dyn Error + Send + Sync>;

/// The SDK's request as reqwest's: method, URI, headers and body as they
/// were signed. A body held in memory (every DynamoDB, SQS and CloudFront
/// request) goes as bytes with its length; any other body is streamed.
fn to_reqwest(request: HttpRequest) -> Result<reqwest::Request, BoxError> {
    let (parts, body) = request.try_into_http1x()?.into_parts();
    let body = match body.bytes() {
        Some(bytes) => reqwest::Body::from(bytes::Bytes::copy_from_slice(bytes)),
        None => reqwest::Body::wrap(body),
    };
    Ok(reqwest::Request::try_from(http::Request::from_parts(
        parts, body,
    ))?)
}

/// Sorts a reqwest error into the kinds the SDK's retry strategy reads:
/// timeouts and I/O failures (refused, reset, closed before the answer)
/// are retried as transient; a request reqwest could not build is the
/// caller's error; anything else is passed on unclassified.
fn classify(err: reqwest::Error) -> ConnectorError {
    if err.is_timeout() {
        return ConnectorError::timeout(err.into());
    }
    if err.is_builder() {
        return ConnectorError::user(err.into());
    }
    if err.is_connect() {
        return ConnectorError::io(err.into());
    }
    let closed = find_source::<hyper::Error>(&err)
        .is_some_and(|e| e.is_closed() || e.is_canceled() || e.is_incomplete_message());
    if closed || find_source::<std::io::Error>(&err).is_some() {
        return ConnectorError::io(err.into());
    }
    ConnectorError::other(err.into(), None)
}

fn find_source<'a, E: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}
