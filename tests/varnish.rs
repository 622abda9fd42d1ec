//! End-to-end with a real, standards-following shared cache IN FRONT of
//! `cachegate serve`: Varnish (Debian's varnishd; scripts/services/varnish.sh
//! exports CACHEGATE_TEST_VARNISHD), which honours `Vary`, `s-maxage`,
//! `Age` and `private`. Its VCL caches every GET by what the response
//! headers allow and nothing else (it does not pass requests with cookies,
//! as its built-in VCL would): what keeps tenants and cookies apart there is
//! only what cachegate tells it. Loopback only.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{cachegate, client, free_port, get, need, send, upstream, wait_listening, Got};

/// A varnishd in front of `backend_port`, stopped (SIGTERM, then reaped)
/// when dropped.
struct Varnish {
    child: Child,
    url: String,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Varnish {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn varnish(backend_port: u16) -> Varnish {
    varnish_with(backend_port, &[])
}

/// [`varnish`] with extra `varnishd` arguments (`-p name=value`).
fn varnish_with(backend_port: u16, args: &[&str]) -> Varnish {
    let varnishd = need("CACHEGATE_TEST_VARNISHD");
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("cachegate-varnish-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vcl = dir.join("front.vcl");
    std::fs::write(
        &vcl,
        format!(
            r#"vcl 4.1;
backend cachegate {{
  .host = "127.0.0.1";
  .port = "{backend_port}";
}}
sub vcl_recv {{
  # Look up every GET/HEAD, cookies or not: only the response headers
  # decide what is shared.
  if (req.method == "GET" || req.method == "HEAD") {{ return (hash); }}
}}
sub vcl_deliver {{
  set resp.http.X-Varnish-Hits = obj.hits;
  set resp.http.X-Varnish-TTL = obj.ttl;
}}
"#
        ),
    )
    .unwrap();
    let child = Command::new(&varnishd)
        .arg("-F")
        .arg("-n")
        .arg(dir.join("work"))
        .args(["-a", &format!("127.0.0.1:{port}"), "-T", "127.0.0.1:0"])
        .arg("-f")
        .arg(&vcl)
        .args(["-s", "malloc,64m"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {varnishd}: {e}"));
    let mut v = Varnish {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: tempdir::Dir(dir),
    };
    wait_listening(&mut v.child, port, "varnishd");
    v
}

fn hits(g: &Got) -> u64 {
    g.header("x-varnish-hits")
        .parse()
        .unwrap_or_else(|_| panic!("not through Varnish: {:?}", g.headers))
}

fn ttl(g: &Got) -> f64 {
    g.header("x-varnish-ttl")
        .parse()
        .unwrap_or_else(|_| panic!("no TTL: {:?}", g.headers))
}

/// What the upstream saw of one header, from the `echo` body.
fn echoed(g: &Got, name: &str) -> String {
    g.json()["headers"][name][0]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn keyed_routes_never_cross_tenants_or_cookies_in_a_shared_cache_in_front() {
    let up = upstream().await;
    let routes = (
        "CACHEGATE_ROUTES",
        "[{path=\"/tenant\", key_headers=[\"x-tenant\"]}, {path=\"/cookie\", key_headers=[\"cookie\"]}]",
    );
    let cg = cachegate(&up.url, &[routes]);
    let front = varnish(cg.addr.port());

    let url = format!("{}/tenant?cc=public%2C%20max-age%3D60&echo=1", front.url);
    for tenant in ["acme", "evilcorp", "acme", "evilcorp"] {
        let g = send(client().get(&url).header("x-tenant", tenant)).await;
        assert_eq!(g.status, 200);
        assert_eq!(
            echoed(&g, "x-tenant"),
            tenant,
            "{tenant} was served another tenant's answer"
        );
        assert_eq!(hits(&g), 0, "Varnish shared a keyed answer");
    }
    // cachegate itself still cached each tenant's answer once.
    assert_eq!(up.state.hits("/tenant"), 2);

    let url = format!("{}/cookie?cc=public%2C%20max-age%3D60&echo=1", front.url);
    for cookie in ["session=alice", "session=bob", "session=alice"] {
        let g = send(client().get(&url).header("cookie", cookie)).await;
        assert_eq!(
            echoed(&g, "cookie"),
            cookie,
            "{cookie} was served another cookie's page"
        );
        assert_eq!(hits(&g), 0);
    }
    assert_eq!(up.state.hits("/cookie"), 2);

    // An edge that keys on the tenant may share per tenant: Vary tells it how.
    let cg = cachegate(
        &up.url,
        &[
            routes,
            (
                "CACHEGATE_EDGE__KEY_HEADERS",
                "[\"accept-encoding\", \"x-tenant\"]",
            ),
        ],
    );
    let front = varnish(cg.addr.port());
    let url = format!(
        "{}/tenant?cc=public%2C%20max-age%3D60&echo=1&edge=keyed",
        front.url
    );
    let mut seen = Vec::new();
    for tenant in ["acme", "evilcorp", "acme", "evilcorp"] {
        let g = send(client().get(&url).header("x-tenant", tenant)).await;
        assert_eq!(
            echoed(&g, "x-tenant"),
            tenant,
            "{tenant} was served another tenant's answer"
        );
        seen.push(hits(&g));
    }
    assert_eq!(
        seen,
        [0, 0, 1, 1],
        "Varnish should serve each tenant its own copy"
    );
}

#[tokio::test]
async fn the_cache_in_front_keeps_what_is_left_of_the_lifetime_not_less() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[("CACHEGATE_ROUTES", "[{path=\"/route-ttl\", ttl=\"60s\"}]")],
    );
    let front = varnish(cg.addr.port());
    // Stored in cachegate now; asked through Varnish 10 s later.
    let own = "/own?cc=max-age%3D60";
    let route = "/route-ttl";
    for path in [own, route] {
        assert_eq!(get(&format!("{}{path}", cg.url)).await.x_cache(), "MISS");
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    for path in [own, route] {
        let g = get(&format!("{}{path}", front.url)).await;
        assert_eq!(
            g.x_cache(),
            "HIT",
            "{path}: cachegate should answer from its cache"
        );
        let age: u64 = g.header("age").parse().unwrap();
        assert!((10..=11).contains(&age), "{path}: Age {age}");
        let left = ttl(&g);
        // 60 s lifetime, 10 s spent: about 50 s left at the edge (the old
        // rewrite, `max-age=<left>` plus `Age`, left it about 40).
        assert!(
            (48.0..=50.5).contains(&left),
            "{path}: Varnish keeps it {left} s"
        );
        // And it is served from Varnish now.
        let again = get(&format!("{}{path}", front.url)).await;
        assert_eq!(hits(&again), 1, "{path}");
    }
    assert_eq!(up.state.hits("/own") + up.state.hits("/route-ttl"), 2);
}

/// With no `edge.key_headers`, the upstream's own `Vary` goes out as it
/// came (no `private` added): a cache in front that honours `Vary` (RFC
/// 9111 §4.1), Varnish here, shares the answer per variant and never
/// gives one language's answer to another.
#[tokio::test]
async fn the_upstreams_own_vary_is_left_to_a_cache_in_front_that_honours_it() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let front = varnish(cg.addr.port());
    let url = format!("{}/lang?cc=max-age%3D60&vary=Accept-Language", front.url);
    let mut seen = Vec::new();
    for lang in ["en", "fr", "en", "fr"] {
        let g = send(client().get(&url).header("accept-language", lang)).await;
        assert_eq!(g.json()["lang"], lang, "{lang} was served another language");
        assert_eq!(g.header("cache-control"), "max-age=60");
        seen.push(hits(&g));
    }
    assert_eq!(
        seen,
        [0, 0, 1, 1],
        "Varnish should keep one copy per language"
    );
    assert_eq!(up.state.hits("/lang"), 2);
}

/// Compressed entries (`cache.compression`, the default) as a cache in
/// front sees them when it keys on `Vary` strictly, as any
/// standards-following cache may: Varnish with its own gzip handling off
/// (`http_gzip_support=off`), so it keeps a copy per `Accept-Encoding`.
/// Every client gets bytes it can read: gzip only when it takes gzip.
#[tokio::test]
async fn a_cache_in_front_gives_gzip_only_to_clients_that_take_it() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let front = varnish_with(cg.addr.port(), &["-p", "http_gzip_support=off"]);
    let url = format!("{}/gz?json_bytes=100000&cc=max-age%3D60", front.url);
    let original = common::json_list(100_000);
    let mut gzip_seen = false;
    for ae in [
        Some("gzip, br"),
        None,
        Some("gzip, br"),
        None,
        Some("br"),
        Some("gzip"),
    ] {
        let mut req = client().get(&url);
        if let Some(ae) = ae {
            req = req.header("accept-encoding", ae);
        }
        let g = send(req).await;
        assert_eq!(g.status, 200, "{ae:?}: {:?}", g.headers);
        let body = match g.headers.get("content-encoding") {
            None => g.body.to_vec(),
            Some(ce) => {
                assert_eq!(ce, "gzip", "{ae:?}");
                assert!(
                    ae.is_some_and(|a| a.contains("gzip")),
                    "gzip sent to a client that does not take it ({ae:?}): {:?}",
                    g.headers
                );
                gzip_seen = true;
                let mut out = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(&g.body[..]),
                    &mut out,
                )
                .unwrap();
                out
            }
        };
        assert!(body == original, "{ae:?}: not the answer");
    }
    assert!(gzip_seen, "the stored gzip reached a gzip client");
    assert_eq!(up.state.hits("/gz"), 1, "cachegate asked the upstream once");
}
