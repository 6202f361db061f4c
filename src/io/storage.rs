//! Every URI goes through `object_store`: a local path or `file://` URI today, the cloud stores
//! through the same [`Storage`] API.
//!
//! [`Storage`] is a directory-like root (a store plus a prefix) with blocking helpers that run
//! the async calls on the IO runtime; compute code calls them from its own threads, never from
//! inside the runtime.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::runtime::Handle;

use crate::error::{Error, Result, from_store};

/// A store and a root prefix inside it, named by the URI the user gave.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// How the root is shown in messages: the user's path or URI, without a trailing `/`.
    display_root: String,
    rt: Handle,
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
    pub fn open(uri: &str, rt: &Handle) -> Result<Self> {
        let (store, root) = resolve(uri)?;
        Ok(Self {
            store,
            root,
            display_root: uri.trim_end_matches('/').to_string(),
            rt: rt.clone(),
            local: true,
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

    /// Moves an object, replacing any object at `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (f, t) = (self.path(from), self.path(to));
        self.rt
            .block_on(self.store.rename(&f, &t))
            .map_err(|e| from_store(&self.display(from), e))
    }

    /// Deletes an object; deleting one that is not there is not an error.
    pub fn delete(&self, rel: &str) -> Result<()> {
        let path = self.path(rel);
        match self.rt.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(from_store(&self.display(rel), e)),
        }
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

/// Resolves a URI to its store and the path inside it.
pub fn resolve(uri: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
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
        Some(other) => {
            return Err(Error::Usage(format!(
                "{uri}: `{other}://` URIs are not supported by this build yet; use a local path or file:// URI"
            )));
        }
    };
    let absolute = std::path::absolute(&local)
        .map_err(|e| Error::Usage(format!("{uri}: cannot make the path absolute: {e}")))?;
    let path = Path::from_absolute_path(&absolute)
        .map_err(|e| Error::Usage(format!("{uri}: not a usable path: {e}")))?;
    Ok((Arc::new(LocalFileSystem::new()), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn put_get_rename_list_delete_round_trip() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path().to_str().unwrap(), rt.handle()).unwrap();
        assert!(
            s.list("t").unwrap().is_empty(),
            "a missing directory lists empty"
        );
        s.put("t/_staging/a.txt", Bytes::from_static(b"hi"))
            .unwrap();
        s.rename("t/_staging/a.txt", "t/final/a.txt").unwrap();
        assert_eq!(&s.get("t/final/a.txt").unwrap()[..], b"hi");
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
        let e = Storage::open("ftp://x/y", rt.handle()).unwrap_err();
        assert_eq!(e.exit_code(), 64);
    }
}
