//! Every URI goes through `object_store`: a local path or `file://` URI, `s3://` (and
//! S3-compatible stores), `gs://`, `az://` / `abfs(s)://`, and `http(s)://`, all through the same
//! [`Storage`] API.
//!
//! Credentials, regions and endpoints come from the standard environment (each builder's
//! `from_env`: `AWS_*` including `AWS_ENDPOINT` and `AWS_ALLOW_HTTP` for S3-compatible stores,
//! `GOOGLE_*`, `AZURE_*`), never from the pipeline file, so they appear in no config, manifest or
//! log. `[storage]` sets retries and timeouts, carried by the [`Io`] every store is opened with.
//!
//! [`Storage`] is a directory-like root (a store plus a prefix) with blocking helpers that run
//! the async calls on the IO runtime; compute code calls them from its own threads, never from
//! inside the runtime.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::runtime::Handle;

use crate::config::StorageConfig;
use crate::error::{Error, Result, from_store};

/// How stores are reached: the IO runtime their async calls run on, and the `[storage]`
/// settings (retries, timeouts) of the stores opened through it.
#[derive(Debug, Clone)]
pub struct Io {
    /// The IO runtime; compute threads call into it, never code running on it.
    pub rt: Handle,
    /// Retries and timeouts.
    pub settings: StorageConfig,
}

impl Io {
    /// Stores on `rt` with the default `[storage]` settings.
    pub fn new(rt: Handle) -> Self {
        Self {
            rt,
            settings: StorageConfig::default(),
        }
    }

    /// The same runtime with a pipeline's `[storage]` settings.
    pub fn with_settings(&self, settings: &StorageConfig) -> Self {
        Self {
            rt: self.rt.clone(),
            settings: settings.clone(),
        }
    }
}

/// The wait before retry `attempt` (from 1) of a request we retry ourselves: 100 ms doubling,
/// at most 5 s, as the object-store clients back off.
fn backoff(attempt: usize) -> Duration {
    Duration::from_millis(100u64 << attempt.min(6).saturating_sub(1)).min(Duration::from_secs(5))
}

/// A store and a root prefix inside it, named by the URI the user gave.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// How the root is shown in messages: the user's path or URI, without a trailing `/`.
    display_root: String,
    rt: Handle,
    /// Retries of the requests this code retries itself.
    max_retries: usize,
    /// True for the local filesystem, where directories exist apart from the files in them.
    local: bool,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.display_root)
    }
}

impl Storage {
    /// Opens the directory-like root named by `uri` (a path, `file://…`).
    pub fn open(uri: &str, io: &Io) -> Result<Self> {
        let (store, root) = resolve(uri, &io.settings)?;
        Ok(Self {
            store,
            root,
            display_root: uri.trim_end_matches('/').to_string(),
            rt: io.rt.clone(),
            max_retries: io.settings.max_retries,
            local: !is_cloud(uri),
        })
    }

    /// The underlying store, for the async Parquet reader and writer.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The runtime the async calls run on.
    pub fn runtime(&self) -> &Handle {
        &self.rt
    }

    /// The store path of `rel` (a `/`-separated path below the root; empty for the root).
    pub fn path(&self, rel: &str) -> Path {
        let rel = rel.trim_matches('/');
        if rel.is_empty() {
            return self.root.clone();
        }
        rel.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |p, seg| p.join(seg))
    }

    /// The local filesystem path of `rel`, for a local store.
    pub fn local_path(&self, rel: &str) -> Option<std::path::PathBuf> {
        self.local
            .then(|| std::path::PathBuf::from(format!("/{}", self.path(rel))))
    }

    /// The URI to show for `rel`, in the user's own terms.
    pub fn display(&self, rel: &str) -> String {
        let rel = rel.trim_matches('/');
        if rel.is_empty() {
            self.display_root.clone()
        } else {
            format!("{}/{}", self.display_root, rel)
        }
    }

    /// The root-relative form of a store path below the root.
    pub fn relative(&self, path: &Path) -> String {
        path.prefix_match(&self.root)
            .map(|parts| {
                parts
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_else(|| path.to_string())
    }

    /// Reads a whole object.
    pub fn get(&self, rel: &str) -> Result<Bytes> {
        let path = self.path(rel);
        self.rt
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map_err(|e| from_store(&self.display(rel), e))
    }

    /// Writes a whole object atomically (readers see the old object or the new one).
    pub fn put(&self, rel: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(rel);
        self.rt
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| from_store(&self.display(rel), e))
    }

    /// Writes an object only if none exists at `rel`; returns whether this call created it.
    ///
    /// `token` must be unique to the caller (it is the object's content): a create whose
    /// answer was lost (a connection reset after the store acted) is retried, meets the object,
    /// and recognises it as its own by the token. The client does not retry such a create
    /// itself, since a blind retry cannot tell "mine" from "someone else's".
    pub fn put_if_absent(&self, rel: &str, token: Bytes) -> Result<bool> {
        let path = self.path(rel);
        self.with_retries(rel, "create", |attempt| {
            let result = self.rt.block_on(self.store.put_opts(
                &path,
                PutPayload::from(token.clone()),
                object_store::PutMode::Create.into(),
            ));
            match result {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) if attempt == 0 => Ok(false),
                // An earlier attempt of ours may have created it.
                Err(object_store::Error::AlreadyExists { .. }) => Ok(self.get(rel)? == token),
                Err(e) => Err(from_store(&self.display(rel), e)),
            }
        })
    }

    /// Runs `op` (given its attempt number, from 0) again after each transient error, up to
    /// `[storage] max_retries` times with backoff: for the requests the store's client leaves
    /// to us (see [`Self::delete`] and [`Self::put_if_absent`]).
    fn with_retries<T>(
        &self,
        rel: &str,
        what: &str,
        mut op: impl FnMut(usize) -> Result<T>,
    ) -> Result<T> {
        let retries = self.max_retries;
        let mut attempt = 0;
        loop {
            match op(attempt) {
                Err(Error::Transient { .. }) if attempt < retries => {
                    attempt += 1;
                    tracing::debug!(uri = %self.display(rel), attempt, what, "Retrying.");
                    std::thread::sleep(backoff(attempt));
                }
                other => return other,
            }
        }
    }

    /// Copies an object, replacing any object at `to`: on a local disk a hard link (no bytes
    /// copied), in a cloud store a server-side copy.
    pub fn copy(&self, from: &str, to: &str) -> Result<()> {
        let (f, t) = (self.path(from), self.path(to));
        self.rt
            .block_on(self.store.copy(&f, &t))
            .map_err(|e| from_store(&self.display(from), e))
    }

    /// Deletes an object; deleting one that is not there is not an error.
    ///
    /// Transient failures are retried here, per `[storage] max_retries`: the S3 client sends a
    /// delete as a bulk `POST ?delete`, which it does not retry once the request may have left
    /// (a connection reset mid-request), although deleting twice is harmless.
    pub fn delete(&self, rel: &str) -> Result<()> {
        let path = self.path(rel);
        self.with_retries(rel, "delete", |_| {
            match self.rt.block_on(self.store.delete(&path)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(from_store(&self.display(rel), e)),
            }
        })
    }

    /// The size in bytes of the object at `rel`.
    pub fn size(&self, rel: &str) -> Result<u64> {
        let path = self.path(rel);
        self.rt
            .block_on(self.store.head(&path))
            .map(|m| m.size)
            .map_err(|e| from_store(&self.display(rel), e))
    }

    /// Whether an object exists at `rel`.
    pub fn exists(&self, rel: &str) -> Result<bool> {
        let path = self.path(rel);
        match self.rt.block_on(self.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(from_store(&self.display(rel), e)),
        }
    }

    /// Every object below `rel` (recursively), sorted by path.
    pub fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = self.path(rel);
        match self.rt.block_on(list_sorted(&self.store, &prefix)) {
            Ok(all) => Ok(all),
            // A directory that does not exist yet simply holds nothing.
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(from_store(&self.display(rel), e)),
        }
    }
}

/// Lists everything below `prefix`, sorted by location so that every run sees the same order.
pub async fn list_sorted(
    store: &Arc<dyn ObjectStore>,
    prefix: &Path,
) -> object_store::Result<Vec<ObjectMeta>> {
    let mut all: Vec<ObjectMeta> = store.list(Some(prefix)).try_collect().await?;
    all.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(all)
}

/// Whether `uri` names a cloud store rather than the local filesystem.
pub fn is_cloud(uri: &str) -> bool {
    uri.split_once("://")
        .is_some_and(|(scheme, _)| !scheme.eq_ignore_ascii_case("file"))
}

/// `path` with every `..` taken off lexically (the store's paths cannot hold one), as a shell
/// does for `cd ../x`: `../shared/data` beside a checkout names what the user means.
fn without_dot_dot(path: &std::path::Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Resolves a URI to its store and the path inside it.
pub fn resolve(uri: &str, settings: &StorageConfig) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let scheme = uri.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    let local = match scheme.as_deref() {
        None => std::path::PathBuf::from(uri),
        Some("file") => url::Url::parse(uri)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{uri} is not a valid file:// URI; write file:///absolute/path"
                ))
            })?,
        Some(_) => return cloud(uri, settings),
    };
    let absolute = std::path::absolute(&local)
        .map_err(|e| Error::usage_because(format!("{uri}: cannot make the path absolute"), e))?;
    let path = Path::from_absolute_path(without_dot_dot(&absolute))
        .map_err(|e| Error::usage_because(format!("{uri}: not a usable path"), e))?;
    Ok((Arc::new(LocalFileSystem::new()), path))
}

/// A cloud store for `uri`, configured from the environment and `[storage]`.
fn cloud(uri: &str, s: &StorageConfig) -> Result<(Arc<dyn ObjectStore>, Path)> {
    use object_store::{ClientConfigKey, ObjectStoreScheme, RetryConfig};
    let bad = |message: String| Error::Usage(format!("{uri}: {message}"));
    let url = url::Url::parse(uri)
        .map_err(|e| Error::usage_because(format!("{uri}: not a valid URI"), e))?;
    let (scheme, path) = ObjectStoreScheme::parse(&url).map_err(|e| {
        bad(format!(
            "{e}; supported: paths, file://, s3://, gs://, az://, abfs(s)://, http(s)://"
        ))
    })?;
    let path = Path::parse(path).map_err(|e| bad(e.to_string()))?;
    let timeout = format!("{}s", s.request_timeout_seconds.max(1));
    let retry = RetryConfig {
        max_retries: s.max_retries,
        // Give up on a request after its attempts could all have timed out, capped so that
        // signed requests do not outlive their credentials.
        retry_timeout: Duration::from_secs(
            (s.request_timeout_seconds.max(1) * (s.max_retries as u64 + 1)).min(300),
        ),
        ..RetryConfig::default()
    };
    let built: object_store::Result<Arc<dyn ObjectStore>> = match scheme {
        ObjectStoreScheme::AmazonS3 => object_store::aws::AmazonS3Builder::from_env()
            .with_url(uri)
            .with_retry(retry)
            .with_config(
                object_store::aws::AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                &timeout,
            )
            .build()
            .map(|s| Arc::new(s) as _),
        ObjectStoreScheme::GoogleCloudStorage => {
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(uri)
                .with_retry(retry)
                .with_config(
                    object_store::gcp::GoogleConfigKey::Client(ClientConfigKey::Timeout),
                    &timeout,
                )
                .build()
                .map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::MicrosoftAzure => object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_url(uri)
            .with_retry(retry)
            .with_config(
                object_store::azure::AzureConfigKey::Client(ClientConfigKey::Timeout),
                &timeout,
            )
            .build()
            .map(|s| Arc::new(s) as _),
        // The user chose plain http by writing `http://`; the other stores' endpoints come from
        // their environment, where `*_ALLOW_HTTP` says the same.
        ObjectStoreScheme::Http => object_store::http::HttpBuilder::new()
            .with_url(&url[..url::Position::BeforePath])
            .with_retry(retry)
            .with_config(ClientConfigKey::Timeout, &timeout)
            .with_config(
                ClientConfigKey::AllowHttp,
                if url.scheme() == "http" {
                    "true"
                } else {
                    "false"
                },
            )
            .build()
            .map(|s| Arc::new(s) as _),
        other => {
            return Err(bad(format!("{other:?} stores are not supported here")));
        }
    };
    let store =
        built.map_err(|e| Error::usage_because(format!("{uri}: cannot open the store"), e))?;
    Ok((store, path))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_relative_path_may_climb_out_of_the_working_directory() {
        let (_, path) = resolve("../x/./y.parquet", &StorageConfig::default()).unwrap();
        let here = std::env::current_dir().unwrap();
        let parent = here.parent().unwrap().join("x/y.parquet");
        assert_eq!(path, Path::from_absolute_path(parent).unwrap());
    }

    /// A small IO runtime for tests that open stores.
    pub(crate) fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn put_get_copy_list_delete_round_trip() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path().to_str().unwrap(), &Io::new(rt.handle().clone())).unwrap();
        assert!(
            s.list("t").unwrap().is_empty(),
            "a missing directory lists empty"
        );
        s.put("t/_staging/a.txt", Bytes::from_static(b"hi"))
            .unwrap();
        s.copy("t/_staging/a.txt", "t/final/a.txt").unwrap();
        assert_eq!(&s.get("t/final/a.txt").unwrap()[..], b"hi");
        assert_eq!(s.size("t/final/a.txt").unwrap(), 2);
        // The copy stands on its own: replacing the original leaves it as it was.
        s.put("t/_staging/a.txt", Bytes::from_static(b"changed"))
            .unwrap();
        assert_eq!(&s.get("t/final/a.txt").unwrap()[..], b"hi");
        s.delete("t/_staging/a.txt").unwrap();
        assert!(!s.exists("t/_staging/a.txt").unwrap());
        let listed: Vec<String> = s
            .list("t")
            .unwrap()
            .iter()
            .map(|m| s.relative(&m.location))
            .collect();
        assert_eq!(listed, vec!["t/final/a.txt"]);
        s.delete("t/final/a.txt").unwrap();
        s.delete("t/final/a.txt").unwrap();
        assert_eq!(s.get("nope").unwrap_err().exit_code(), 66);
    }

    #[test]
    fn unsupported_schemes_are_usage_errors() {
        let rt = runtime();
        let e = Storage::open("ftp://x/y", &Io::new(rt.handle().clone())).unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(is_cloud("s3://b/k") && !is_cloud("file:///x") && !is_cloud("rel/path"));
    }
}
