//! HTTP/1.1 on a bare socket, for requests a client library would not
//! send as written (odd targets, duplicate or oddly spelled headers) and
//! answers read byte for byte.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response read off the wire.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }
    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&b[..eol])
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// Send `request` as is (it should ask for `Connection: close`) and read
/// the whole answer.
pub async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> Raw {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("no answer within 20s")
        .unwrap();
    parse(&out)
}

pub fn parse(out: &[u8]) -> Raw {
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(out)));
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut r = Raw {
        status,
        head,
        body: out[split + 4..].to_vec(),
    };
    if r.header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        r.body = dechunk(&r.body);
    }
    r
}

/// `METHOD target` with `headers` (written exactly as given, plus `Host`
/// when they have none, and an empty body for methods other than GET and
/// HEAD) on a fresh connection.
pub async fn send(
    cg: &super::Cachegate,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Raw {
    let mut req = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {}\r\n", cg.addr));
    }
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if method != "GET" && method != "HEAD" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    raw(cg.addr, req.as_bytes()).await
}
