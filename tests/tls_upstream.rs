//! An HTTPS upstream, as most are: `cachegate serve` in front of a
//! tokio-rustls server on loopback whose certificate (for `localhost`) a
//! generated CA signed, the CA given to the process as its system roots
//! (`SSL_CERT_FILE`, read by rustls-native-certs). A certificate nobody
//! vouches for is refused: 502, never an answer from that server.

mod common;

use cachegate_test_tls::TestCa;

const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"over\":\"tls\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_behind_the_system_roots_and_only_them() {
    let ca = TestCa::new();
    let trusted = ca.trusted_server(ANSWER).await;
    let stranger = ca.stranger_server(ANSWER).await;
    let dir = std::env::temp_dir().join(format!("cachegate-tls-upstream-{}", std::process::id()));
    let ca_file = ca.write_pem(&dir);
    let ca_file = ca_file.to_str().unwrap();

    let cg = common::cachegate(
        &format!("https://localhost:{trusted}"),
        &[("SSL_CERT_FILE", ca_file)],
    );
    for want in ["MISS", "HIT"] {
        let r = common::get(&format!("{}/items/1", cg.url)).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.x_cache(), want, "{r:?}");
        assert_eq!(&r.body[..], br#"{"over":"tls"}"#);
    }

    let cg = common::cachegate(
        &format!("https://localhost:{stranger}"),
        &[
            ("SSL_CERT_FILE", ca_file),
            ("CACHEGATE_UPSTREAM__RETRIES", "0"),
        ],
    );
    let r = common::get(&format!("{}/items/1", cg.url)).await;
    assert_eq!(
        r.status, 502,
        "an unverified server's answer was used: {r:?}"
    );
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable", "{r:?}");
    std::fs::remove_dir_all(&dir).ok();
}
