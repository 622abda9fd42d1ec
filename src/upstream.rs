//! The call to the upstream API: a faithful forward of the client request,
//! bounded in time and size, with failures classified for the client.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};
use reqwest::Url;

use crate::config::UpstreamConfig;
use crate::policy::headers::strip_hop_by_hop;

/// What the upstream answered, body read whole.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why there is no upstream answer to relay.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    #[error("upstream response body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("upstream request failed: {0}")]
    Other(String),
}

impl UpstreamError {
    /// 504 for a timeout, 502 for everything else (RFC 9110 §15.6.3, §15.6.5).
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
    pub fn code(&self) -> &'static str {
        match self {
            UpstreamError::Timeout(_) => "upstream_timeout",
            UpstreamError::Connect(_) => "upstream_unreachable",
            UpstreamError::TooLarge { .. } => "upstream_response_too_large",
            UpstreamError::Other(_) => "upstream_error",
        }
    }
}

/// One reusable client (connection pool) per process.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    timeout: Duration,
    max_response_bytes: usize,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A proxy relays redirects; it does not follow them.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        Ok(Upstream {
            client,
            timeout: cfg.timeout,
            max_response_bytes: cfg.max_response_bytes.as_u64() as usize,
        })
    }

    /// Send `method url` with `headers` (already stripped of hop-by-hop
    /// headers and `Host`) and `body`; read the whole response body.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut req = self.client.request(method, url).headers(headers);
        if !body.is_empty() {
            req = req.body(body);
        }
        let mut resp = req.send().await.map_err(|e| self.classify(e))?;
        if resp
            .content_length()
            .is_some_and(|n| n as usize > self.max_response_bytes)
        {
            return Err(UpstreamError::TooLarge {
                limit: self.max_response_bytes,
            });
        }
        let status = resp.status();
        let mut headers = std::mem::take(resp.headers_mut());
        strip_hop_by_hop(&mut headers);
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.classify(e))? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(UpstreamError::TooLarge {
                    limit: self.max_response_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(UpstreamResponse {
            status,
            headers,
            body: body.freeze(),
        })
    }

    fn classify(&self, e: reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::Timeout(self.timeout)
        } else if e.is_connect() {
            // The URL is in the configuration; the cause chain says what broke.
            UpstreamError::Connect(error_chain(&e.without_url()))
        } else {
            UpstreamError::Other(error_chain(&e.without_url()))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
