//! A translating proxy in front of fake-gcs-server, for the two requests of GCS's XML API that
//! object_store's GCS client writes with and fake-gcs-server does not implement: an object
//! upload (`PUT /bucket/object`, which it takes only for signed URLs) and a copy (`PUT` with
//! `x-goog-copy-source`). Each becomes its JSON-API equivalent (a media upload; `copyTo`), with
//! the conditional create (`x-goog-if-generation-match: 0`, which fake-gcs-server ignores)
//! checked first, and the answer carries the `ETag` and `x-goog-generation` headers GCS gives.
//! Every other request (reads, HEAD, lists, deletes) goes through unchanged. object_store's own
//! CI runs a patched fake-gcs-server build for the same gap (fsouza/fake-gcs-server#1164).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// A running shim.
pub struct GcsShim {
    port: u16,
    stopped: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// One HTTP request, as read from the client.
struct Request {
    method: String,
    target: String,
    headers: HashMap<String, String>,
    /// The head as received, for requests passed through.
    head: String,
    body: Vec<u8>,
}

/// One HTTP answer from fake-gcs-server.
struct Answer {
    status: u16,
    raw: Vec<u8>,
    body: Vec<u8>,
}

impl GcsShim {
    /// Listens on `port` (0 for any) and translates for fake-gcs-server on `upstream`.
    pub fn start(port: u16, upstream: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("the shim binds");
        let port = listener.local_addr().unwrap().port();
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = stopped.clone();
        let thread = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                std::thread::spawn(move || {
                    let _ = serve(client, upstream);
                });
            }
        });
        Self {
            port,
            stopped,
            thread: Some(thread),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops listening (connections already open end with the server behind them).
    pub fn stop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for GcsShim {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves one client connection: one request, answered with `Connection: close`.
fn serve(client: TcpStream, upstream: u16) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let request = read_request(&mut reader)?;
    let mut client = client;
    let copy_source = request.headers.get("x-goog-copy-source").cloned();
    if request.method != "PUT" {
        let head = request
            .head
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                !l.starts_with("host:") && !l.starts_with("connection:")
            })
            .collect::<Vec<_>>()
            .join("\r\n");
        let head = format!(
            "{}\r\nHost: 127.0.0.1:{upstream}\r\nConnection: close\r\n\r\n",
            head.trim_end()
        );
        let answer = send(upstream, head.as_bytes(), &request.body)?;
        return client.write_all(&answer.raw);
    }
    let (bucket, object) = bucket_and_object(&request.target);
    if request
        .headers
        .get("x-goog-if-generation-match")
        .map(String::as_str)
        == Some("0")
    {
        let exists = send_simple(
            upstream,
            "GET",
            &format!("/storage/v1/b/{bucket}/o/{}", encoded(&object)),
            &[],
        )?;
        if exists.status == 200 {
            return client.write_all(
                b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    }
    let answer = match copy_source {
        Some(source) => {
            let source = decoded(&source);
            let (_, from) = source.split_once('/').unwrap_or(("", &source));
            send_simple(
                upstream,
                "POST",
                &format!(
                    "/storage/v1/b/{bucket}/o/{}/copyTo/b/{bucket}/o/{}",
                    encoded(from),
                    encoded(&object)
                ),
                &[],
            )?
        }
        None => send_simple(
            upstream,
            "POST",
            &format!(
                "/upload/storage/v1/b/{bucket}/o?uploadType=media&name={}",
                encoded(&object)
            ),
            &request.body,
        )?,
    };
    if answer.status != 200 {
        return client.write_all(&answer.raw);
    }
    let meta: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    let etag = meta["etag"].as_str().unwrap_or_default();
    let generation = meta["generation"].as_str().unwrap_or_default();
    write!(
        client,
        "HTTP/1.1 200 OK\r\nETag: \"{etag}\"\r\nx-goog-generation: {generation}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

fn read_request(reader: &mut impl BufRead) -> std::io::Result<Request> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let target = first.next().unwrap_or_default().to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert!(
        !headers.contains_key("transfer-encoding"),
        "the shim reads bodies by Content-Length only: {head}"
    );
    let length = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Request {
        method,
        target,
        headers,
        head,
        body,
    })
}

/// Sends a request of ours to fake-gcs-server.
fn send_simple(upstream: u16, method: &str, target: &str, body: &[u8]) -> std::io::Result<Answer> {
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{upstream}\r\nContent-Length: {}\r\n\
         Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    send(upstream, head.as_bytes(), body)
}

fn send(upstream: u16, head: &[u8], body: &[u8]) -> std::io::Result<Answer> {
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.write_all(head)?;
    server.write_all(body)?;
    let mut raw = Vec::new();
    server.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(502);
    let body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| raw[at + 4..].to_vec())
        .unwrap_or_default();
    Ok(Answer { status, raw, body })
}

/// `/bucket/encoded-object?query` as (bucket, object).
fn bucket_and_object(target: &str) -> (String, String) {
    let path = target.split('?').next().unwrap_or_default();
    let (bucket, object) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    (bucket.to_string(), decoded(object))
}

fn encoded(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                let hex = std::str::from_utf8(hex).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
