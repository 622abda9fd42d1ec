//! Compressed entries in front of httpbin, a third-party server with habits
//! of its own (PyPI httpbin under gunicorn, started here on a free loopback
//! port; scripts/services/httpbin.sh exports
//! CACHEGATE_TEST_HTTPBIN_GUNICORN): `/html` answers a 3.7 KB page
//! uncompressed and without `Cache-Control`, `/gzip` and `/brotli` answer
//! encoded whatever the request asked for. The client here is reqwest
//! without its decompression features: it sees the bytes cachegate sends.
//! gunicorn's access log, one line per request with the `Accept-Encoding`
//! it came with, is what reached the upstream.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{client, free_port, need, send, Got};

/// httpbin under one gunicorn worker; killed when dropped.
struct Httpbin {
    child: Child,
    url: String,
    /// `GET /html HTTP/1.1|gzip`: the request line and its
    /// `Accept-Encoding` (`-` when it had none).
    log: mpsc::Receiver<String>,
}

impl Drop for Httpbin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Httpbin {
    fn start() -> Httpbin {
        let gunicorn = need("CACHEGATE_TEST_HTTPBIN_GUNICORN");
        let port = free_port();
        let mut child = Command::new(&gunicorn)
            .args([
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--workers",
                "1",
                "--access-logfile",
                "-",
                "--access-logformat",
                "%(r)s|%({accept-encoding}i)s",
                "httpbin:app",
            ])
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {gunicorn}: {e}"));
        let log = common::lines_of(child.stdout.take().unwrap());
        let mut server = Httpbin {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        common::wait_listening(&mut server.child, port, "httpbin");
        server
    }

    /// The requests httpbin logged since the last call, once its log has
    /// been quiet for a moment.
    fn requests_seen(&self) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(line) = self.log.recv_timeout(Duration::from_millis(300)) {
            seen.push(line);
        }
        seen
    }

    /// What httpbin answers a client that asks for no coding.
    async fn direct(&self, path: &str) -> Got {
        let got = send(client().get(format!("{}{path}", self.url))).await;
        assert_eq!(got.status, 200, "{path} straight from httpbin: {got:?}");
        got
    }
}

async fn get(url: &str, accept_encoding: Option<&str>) -> Got {
    let mut req = client().get(url);
    if let Some(ae) = accept_encoding {
        req = req.header("accept-encoding", ae);
    }
    send(req).await
}

fn varies_on_accept_encoding(r: &Got) -> bool {
    r.headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case("accept-encoding"))
}

/// A page httpbin sends uncompressed: one upstream call, asked for gzip
/// whatever the first client wrote; the entry is gzip, given as it is to
/// clients that take gzip and decoded for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncompressed_page_is_stored_gzipped_and_fetched_once() {
    let httpbin = Httpbin::start();
    let page = httpbin.direct("/html").await;
    assert!(page.headers.get("content-encoding").is_none(), "{page:?}");
    assert!(page.body.len() > 3000, "{page:?}");
    httpbin.requests_seen();
    let cg = common::cachegate(
        &httpbin.url,
        &[("CACHEGATE_ROUTES", r#"[{path="/html", ttl="60s"}]"#)],
    );
    let url = format!("{}/html", cg.url);

    let r = get(&url, Some("br, gzip")).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"), "{r:?}");
    let body = match r.header("content-encoding") {
        "gzip" => common::gunzip(&r.body),
        "" => r.body.to_vec(),
        other => panic!("a coding httpbin never sent: {other}"),
    };
    assert_eq!(body, page.body.as_ref());

    for ae in [None, Some("identity"), Some("deflate"), Some("br")] {
        let r = get(&url, ae).await;
        assert_eq!(r.x_cache(), "HIT", "{ae:?}: {r:?}");
        assert!(r.headers.get("content-encoding").is_none(), "{ae:?}: {r:?}");
        assert_eq!(r.body, page.body, "{ae:?}: decoded");
        assert!(varies_on_accept_encoding(&r), "{ae:?}: {r:?}");
    }
    for ae in ["GZIP,BR", "gzip", "x-gzip;q=0.5, identity"] {
        let r = get(&url, Some(ae)).await;
        assert_eq!(r.x_cache(), "HIT", "{ae}: {r:?}");
        assert_eq!(r.header("content-encoding"), "gzip", "{ae}: {r:?}");
        // Prose: 3,741 bytes are about 2,100 at gzip level 1.
        assert!(r.body.len() < page.body.len() * 3 / 4, "{ae}: {r:?}");
        assert_eq!(common::gunzip(&r.body), page.body.as_ref(), "{ae}");
        assert!(varies_on_accept_encoding(&r), "{ae}: {r:?}");
    }
    assert_eq!(
        httpbin.requests_seen(),
        ["GET /html HTTP/1.1|gzip"],
        "one upstream call for eight clients, asked for gzip"
    );
}

/// httpbin's `/gzip` is gzip whatever was asked: stored as it came, given
/// as it is to gzip clients and decoded for the others, one upstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpbins_own_gzip_is_stored_as_sent_and_decoded_for_plain_clients() {
    let httpbin = Httpbin::start();
    let cg = common::cachegate(
        &httpbin.url,
        &[("CACHEGATE_ROUTES", r#"[{path="/gzip", ttl="60s"}]"#)],
    );
    let url = format!("{}/gzip", cg.url);
    let r = get(&url, None).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"), "{r:?}");
    assert!(r.headers.get("content-encoding").is_none(), "{r:?}");
    assert_eq!(r.json()["gzipped"], true, "{r:?}");
    assert!(varies_on_accept_encoding(&r), "{r:?}");
    let plain = r.body.clone();

    let r = get(&url, Some("gzip, deflate, br")).await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(r.header("content-encoding"), "gzip", "{r:?}");
    assert_eq!(common::gunzip(&r.body), plain.as_ref());
    let r = get(&url, Some("identity")).await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(r.body, plain);
    assert_eq!(httpbin.requests_seen(), ["GET /gzip HTTP/1.1|gzip"]);
}

/// httpbin's `/brotli` is `br` whatever was asked. The stored `br` goes
/// to clients that take `br` themselves; one that takes only gzip is not
/// given it from the cache, although cachegate asked the upstream for gzip
/// on everyone's behalf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpbins_brotli_is_given_from_the_cache_only_to_br_clients() {
    let httpbin = Httpbin::start();
    let cg = common::cachegate(
        &httpbin.url,
        &[("CACHEGATE_ROUTES", r#"[{path="/brotli", ttl="60s"}]"#)],
    );
    let url = format!("{}/brotli", cg.url);
    let r = get(&url, Some("br")).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"), "{r:?}");
    assert_eq!(r.header("content-encoding"), "br", "{r:?}");
    let stored = r.body.clone();
    let r = get(&url, Some("gzip, br")).await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(r.header("content-encoding"), "br", "{r:?}");
    assert_eq!(r.body, stored);
    assert_eq!(httpbin.requests_seen(), ["GET /brotli HTTP/1.1|gzip"]);

    for ae in [Some("gzip"), None] {
        let r = get(&url, ae).await;
        assert_eq!(r.status, 200, "{ae:?}: {r:?}");
        assert_ne!(r.x_cache(), "HIT", "{ae:?}: br from the cache: {r:?}");
    }
    assert_eq!(
        httpbin.requests_seen().len(),
        2,
        "each client without br went upstream"
    );
}
