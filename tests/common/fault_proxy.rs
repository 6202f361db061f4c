//! A TCP proxy on loopback that injects storage faults between the pipeline and the S3 server.
//!
//! [`FaultProxy::start`]: per new connection, by a fixed schedule, it answers `503 Slow Down`
//! (throttling), `500`, resets the connection, or stalls before forwarding; otherwise it forwards
//! bytes both ways. Forwarded connections are closed after a short idle time so the client keeps
//! opening new ones and the schedule reaches every phase of a run.
//!
//! [`FaultProxy::per_request`]: reads each HTTP request (head and `Content-Length` body) and lets
//! a rule decide its fate, so a test can aim at one kind of request (every delete, say) however
//! the client pools its connections.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// What the proxy does to one new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward it.
    None,
    /// Read the request head, answer `503 Slow Down`, close.
    Throttle,
    /// Read the request head, answer `500 Internal Error`, close.
    ServerError,
    /// Read the request head, answer `403 Forbidden` (AccessDenied), close.
    Forbidden,
    /// Read the request head, answer `501 Not Implemented` (an incomplete emulator), close.
    NotImplemented,
    /// Close at once with a TCP reset.
    Reset,
    /// Wait this long, then forward.
    Slow(Duration),
}

/// What the per-request proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFault {
    /// Forward it and relay the answer.
    Forward,
    /// Forward it, let the server act on it, then reset the connection before the answer gets
    /// back: the client cannot tell whether the request took effect.
    LoseAnswer,
}

/// A running proxy; stops accepting when dropped.
pub struct FaultProxy {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Connections seen so far, and how many got a fault.
    pub seen: Arc<AtomicUsize>,
    pub faulted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Proxies to `127.0.0.1:target`, choosing each connection's fate with `schedule(n)` (n
    /// counts connections from 0).
    pub fn start(target: u16, schedule: impl Fn(usize) -> Fault + Send + Sync + 'static) -> Self {
        Self::listen(move |client, seen, faulted| {
            let fault = schedule(seen.fetch_add(1, Ordering::SeqCst));
            if fault != Fault::None {
                faulted.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::spawn(move || handle(client, target, fault));
        })
    }

    /// Accepts connections on a free loopback port until dropped, handing each to `accept`
    /// with the counters.
    fn listen(
        accept: impl Fn(TcpStream, &Arc<AtomicUsize>, &Arc<AtomicUsize>) + Send + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let faulted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, faulted2, stop2) = (seen.clone(), faulted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        accept(client, &seen2, &faulted2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            seen,
            faulted,
            stop,
        }
    }
}

impl FaultProxy {
    /// Proxies to `127.0.0.1:target`, asking `rule` about every request (its head: request line
    /// and headers, as text).
    pub fn per_request(
        target: u16,
        rule: impl Fn(&str) -> RequestFault + Send + Sync + 'static,
    ) -> Self {
        let rule: Arc<dyn Fn(&str) -> RequestFault + Send + Sync> = Arc::new(rule);
        Self::listen(move |client, seen, faulted| {
            let (rule, seen, faulted) = (rule.clone(), seen.clone(), faulted.clone());
            std::thread::spawn(move || handle_requests(client, target, &*rule, &seen, &faulted));
        })
    }
}

/// One client connection of the per-request proxy: requests are read one at a time (HTTP/1.1
/// without pipelining, as the client sends them) and answers are relayed by a second thread
/// unless a request's answer is to be lost.
fn handle_requests(
    client: TcpStream,
    target: u16,
    rule: &(dyn Fn(&str) -> RequestFault + Send + Sync),
    seen: &AtomicUsize,
    faulted: &AtomicUsize,
) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    let idle = Some(Duration::from_secs(1));
    client.set_read_timeout(idle).unwrap();
    let swallow = Arc::new(AtomicBool::new(false));
    let relay = {
        let (mut from, mut to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        let swallow = swallow.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if swallow.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            // After a lost answer the connection must end in a reset (closing with linger 0),
            // not a clean end of stream.
            if !swallow.load(Ordering::SeqCst) {
                let _ = to.shutdown(Shutdown::Write);
            }
        })
    };
    let mut reader = std::io::BufReader::new(client.try_clone().unwrap());
    let mut upstream = server.try_clone().unwrap();
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match std::io::BufRead::read_line(&mut reader, &mut line) {
                Ok(0) | Err(_) => {
                    let _ = server.shutdown(Shutdown::Both);
                    let _ = relay.join();
                    return;
                }
                Ok(_) => {}
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            break;
        }
        seen.fetch_add(1, Ordering::SeqCst);
        let fault = rule(&head);
        if fault == RequestFault::LoseAnswer {
            faulted.fetch_add(1, Ordering::SeqCst);
            swallow.store(true, Ordering::SeqCst);
        }
        if upstream.write_all(head.as_bytes()).is_err() || upstream.write_all(&body).is_err() {
            break;
        }
        if fault == RequestFault::LoseAnswer {
            // Long enough for a loopback server to act on it.
            std::thread::sleep(Duration::from_millis(300));
            let _ = socket_linger_zero(&client);
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    if !swallow.load(Ordering::SeqCst) {
        let _ = client.shutdown(Shutdown::Both);
    }
    let _ = relay.join();
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads up to the end of the request head (best effort).
fn read_head(client: &mut TcpStream) {
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
}

fn answer(mut client: TcpStream, status: &str) {
    read_head(&mut client);
    let code = if status.starts_with("403") {
        "AccessDenied"
    } else {
        "SlowDown"
    };
    let body = format!("<Error><Code>{code}</Code><Message>injected</Message></Error>");
    let _ = write!(
        client,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.flush();
    let _ = client.shutdown(Shutdown::Write);
    // Drain what the client still sends (a PUT's body) so the close is not a reset.
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut sink = [0u8; 4096];
    while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
}

fn handle(client: TcpStream, target: u16, fault: Fault) {
    match fault {
        Fault::Throttle => return answer(client, "503 Slow Down"),
        Fault::ServerError => return answer(client, "500 Internal Server Error"),
        Fault::Forbidden => return answer(client, "403 Forbidden"),
        Fault::NotImplemented => return answer(client, "501 Not Implemented"),
        Fault::Reset => {
            // SO_LINGER 0: closing sends RST, as a crashed load balancer would.
            let _ = socket_linger_zero(&client);
            drop(client);
            return;
        }
        Fault::Slow(d) => std::thread::sleep(d),
        Fault::None => {}
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    let idle = Some(Duration::from_secs(1));
    client.set_read_timeout(idle).unwrap();
    server.set_read_timeout(idle).unwrap();
    let pump = |mut from: TcpStream, mut to: TcpStream| {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    };
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let up = std::thread::spawn(move || pump(c2, s2));
    pump(server, client);
    let _ = up.join();
}

fn socket_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
