//! The connector against real HTTP/1.1 servers on loopback (raw TCP, so
//! the test sees the bytes on the wire): what the SDK signed goes out
//! unchanged, what the server said comes back, and failures are sorted
//! into the kinds the SDK's retry strategy reads.

use std::time::Duration;

use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use cachegate_aws_http::ReqwestHttpClient;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn settings(connect: Duration, read: Duration) -> HttpConnectorSettings {
    HttpConnectorSettings::builder()
        .connect_timeout(connect)
        .read_timeout(read)
        .build()
}

fn request(port: u16, path_and_query: &str, body: &'static str) -> HttpRequest {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}{path_and_query}"))
        .header("x-amz-target", "DynamoDB_20120810.GetItem")
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKID/x, Signature=abc",
        )
        .header("content-type", "application/x-amz-json-1.0")
        .header("content-length", body.len().to_string())
        .body(SdkBody::from(body))
        .unwrap();
    HttpRequest::try_from(req).unwrap()
}

/// Reads one request head and its `content-length` body.
async fn read_request(sock: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).await.unwrap();
        assert!(n > 0, "client closed before a whole request");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn request_goes_out_as_signed_and_the_answer_comes_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let seen = read_request(&mut sock).await;
        sock.write_all(
            b"HTTP/1.1 400 Bad Request\r\nx-amzn-requestid: r-1\r\ncontent-length: 11\r\n\r\n{\"a\":\"b c\"}",
        )
        .await
        .unwrap();
        seen
    });
    let client = ReqwestHttpClient::default();
    let connector = client.connector(&settings(Duration::from_secs(2), Duration::from_secs(2)));
    let resp = connector
        .call(request(port, "/a%2Fb/?x=1&y=%20z", "{\"TableName\":\"t\"}"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(resp.headers().get("x-amzn-requestid"), Some("r-1"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"{\"a\":\"b c\"}");

    let seen = server.await.unwrap();
    let (head, body) = seen.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("POST /a%2Fb/?x=1&y=%20z HTTP/1.1"));
    let headers: Vec<&str> = lines.collect();
    for expected in [
        "x-amz-target: DynamoDB_20120810.GetItem",
        "authorization: AWS4-HMAC-SHA256 Credential=AKID/x, Signature=abc",
        "content-type: application/x-amz-json-1.0",
        "content-length: 17",
        &format!("host: 127.0.0.1:{port}"),
    ] {
        assert!(
            headers.contains(&expected),
            "{expected:?} not in {headers:?}"
        );
    }
    assert_eq!(body, "{\"TableName\":\"t\"}");
}

#[tokio::test]
async fn one_connector_and_pool_per_settings() {
    let client = ReqwestHttpClient::default();
    let a = settings(Duration::from_secs(1), Duration::from_secs(2));
    let b = settings(Duration::from_secs(1), Duration::from_secs(3));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Counts connections; answers every request on each, kept alive.
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let _server = tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                loop {
                    read_request(&mut sock).await;
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if sock.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    for s in [&a, &a, &b, &a] {
        let resp = client
            .connector(s)
            .call(request(port, "/", "{}"))
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.into_body().collect().await.unwrap();
    }
    // `a`'s three calls share one kept-alive connection; `b`'s settings
    // have their own client, so their own connection: two in all (one if
    // the settings shared a pool, four without keep-alive).
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn refused_connection_is_io() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = ReqwestHttpClient::default();
    let connector = client.connector(&settings(Duration::from_secs(1), Duration::from_secs(1)));
    let err = connector.call(request(port, "/", "{}")).await.unwrap_err();
    assert!(err.is_io(), "{err:?}");
}

/// The error of one call to a server that reads the request, holds the
/// connection for `hold` without answering, then closes it.
async fn call_a_server_that_holds(
    hold: Duration,
    read_timeout: Duration,
) -> aws_smithy_runtime_api::client::result::ConnectorError {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        read_request(&mut sock).await;
        tokio::time::sleep(hold).await;
        drop(sock);
    });
    let client = ReqwestHttpClient::default();
    let connector = client.connector(&settings(Duration::from_secs(1), read_timeout));
    connector.call(request(port, "/", "{}")).await.unwrap_err()
}

#[tokio::test]
async fn server_that_never_answers_is_a_timeout() {
    let err = call_a_server_that_holds(Duration::from_secs(30), Duration::from_millis(300)).await;
    assert!(err.is_timeout(), "{err:?}");
}

#[tokio::test]
async fn connection_closed_before_the_answer_is_io() {
    let err = call_a_server_that_holds(Duration::ZERO, Duration::from_secs(5)).await;
    assert!(err.is_io(), "{err:?}");
}
