//! A real S3-compatible server on loopback for the storage tests: moto's server mode (PyPI
//! `moto[server]`, which `.ci/run` installs), started per test on a free port and killed on drop.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// A running moto server.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    port: u16,
}

/// The command that starts moto's server: `moto_server` on the PATH, else `python3 -m
/// moto.server` where the module imports.
fn moto_server() -> Option<Command> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("moto_server"))
            .find(|p| p.is_file())
    });
    if let Some(bin) = on_path {
        return Some(Command::new(bin));
    }
    let importable = Command::new("python3")
        .args(["-c", "import moto.server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    importable.then(|| {
        let mut c = Command::new("python3");
        c.args(["-m", "moto.server"]);
        c
    })
}

impl S3Server {
    /// Starts a server on a free port, or `None` (with a message) where moto is not installed.
    pub fn start() -> Option<Self> {
        let port = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(e) => {
                super::skip_unless_required(
                    "PIPELINE_REQUIRE_S3",
                    &format!("cannot bind a loopback port for the S3 server: {e}"),
                );
                return None;
            }
        };
        Self::start_on(port)
    }

    /// Starts a server on `port`.
    pub fn start_on(port: u16) -> Option<Self> {
        let Some(mut command) = moto_server() else {
            super::skip_unless_required(
                "PIPELINE_REQUIRE_S3",
                "no moto server here (pip install 'moto[server]'; .ci/run does)",
            );
            return None;
        };
        let child = command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto_server did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A server with bucket `frames` holding the bundled digits at `demo/digits.parquet`, or
    /// `None` where no server can run (see [`S3Server::start`]).
    pub fn with_demo_digits() -> Option<Self> {
        let server = Self::start()?;
        server.create_bucket("frames");
        server.upload(
            "frames",
            "demo/digits.parquet",
            &super::repo().join("data/demo/digits.parquet"),
        );
        Some(server)
    }

    /// The environment a pipeline needs to reach it (fake credentials: moto checks none).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test-key-id".into()),
            ("AWS_SECRET_ACCESS_KEY", "test-secret".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    fn store(&self, bucket: &str) -> Arc<AmazonS3> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_access_key_id("test-key-id")
                .with_secret_access_key("test-secret")
                .with_region("us-east-1")
                .with_bucket_name(bucket)
                .build()
                .unwrap(),
        )
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Creates a bucket (an unsigned PUT, which moto accepts).
    pub fn create_bucket(&self, bucket: &str) {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
    }

    /// Uploads a local file to `bucket/key`.
    pub fn upload(&self, bucket: &str, key: &str, file: &Path) {
        let store = self.store(bucket);
        let bytes = std::fs::read(file).unwrap();
        Self::runtime()
            .block_on(store.put(&StorePath::from(key), PutPayload::from(bytes)))
            .unwrap();
    }

    /// Every key under `prefix` in `bucket`, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let store = self.store(bucket);
        let mut keys: Vec<String> = Self::runtime()
            .block_on(
                store
                    .list(Some(&StorePath::from(prefix)))
                    .try_collect::<Vec<_>>(),
            )
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        keys.sort();
        keys
    }

    /// Copies every object under `prefix` to `dir` (keys relative to `prefix`).
    pub fn download(&self, bucket: &str, prefix: &str, dir: &Path) {
        let store = self.store(bucket);
        let rt = Self::runtime();
        for key in self.keys(bucket, prefix) {
            let bytes = rt
                .block_on(async {
                    store
                        .get(&StorePath::from(key.as_str()))
                        .await?
                        .bytes()
                        .await
                })
                .unwrap();
            let rel = key.strip_prefix(prefix).unwrap().trim_start_matches('/');
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }

    /// Stops the server (its in-memory objects are gone).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
