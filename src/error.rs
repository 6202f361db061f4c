//! The library's one error type and its mapping to the process exit codes of DESIGN.md.
//!
//! Every error names the thing it is about (a file URI, a row, a TOML key) and says what to do.
//! Exit codes follow sysexits.h so that a Kubernetes `podFailurePolicy` can tell a retriable
//! failure (75) from one that will fail again (64, 65, 78, …).

use std::fmt;

/// The underlying error of an I/O, storage or permission failure.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A convenient alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can make a command fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad command-line usage that clap could not catch (exit 64).
    #[error("{0}")]
    Usage(String),

    /// One or more problems with the pipeline TOML or its overrides (exit 78).
    #[error("{0}")]
    Config(ConfigProblems),

    /// A setting that does not fit what the run found, such as a fitted model's calibration or
    /// partitions (exit 78). For problems in the file itself, see [`Error::Config`].
    #[error("`{key}`: {message}")]
    Setting {
        /// The dotted TOML key.
        key: String,
        /// What is wrong and what to do about it.
        message: String,
    },

    /// Input data that cannot be used: not Parquet, wrong schema or shape, too many bad rows
    /// (exit 65).
    #[error("{uri}{}: {message}", row.map(|r| format!(" (row {r})")).unwrap_or_default())]
    Data {
        /// The file the problem is in.
        uri: String,
        /// The row (0-based index within the file), where the problem is one row.
        row: Option<u64>,
        /// What is wrong and what to do about it.
        message: String,
    },

    /// A model that cannot be fitted with the given settings (exit 78), or a stored one that
    /// cannot be used (exit 65).
    #[error("{uri}: {what}")]
    Model {
        /// The pipeline file, or the model file.
        uri: String,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: crate::models::ModelError,
    },

    /// The source URI matched no files (exit 66).
    #[error("no input files at {uri}: {hint}")]
    InputMissing {
        /// The URI (or glob) that matched nothing.
        uri: String,
        /// What to check.
        hint: String,
    },

    /// A bug: something the code assumes never happens did (exit 70).
    #[error(
        "internal error: {0} (this is a bug in anomaly-pipeline; please report it with the command line)"
    )]
    Internal(String),

    /// A bug shown by an error that should not have happened (exit 70).
    #[error(
        "internal error while {doing} (this is a bug in anomaly-pipeline; please report it with the command line)"
    )]
    InternalCause {
        /// What was being done.
        doing: String,
        /// The error.
        #[source]
        source: Cause,
    },

    /// Bad usage shown by an underlying error, such as a URI or glob that does not parse
    /// (exit 64).
    #[error("{message}")]
    UsageCause {
        /// What is wrong and what to do.
        message: String,
        /// The parse error.
        #[source]
        source: Cause,
    },

    /// Input data that cannot be used, with the error that showed it (exit 65).
    #[error("{uri}: {message}")]
    DataCause {
        /// The file the problem is in.
        uri: String,
        /// What is wrong and what to do about it.
        message: String,
        /// The underlying error.
        #[source]
        source: Cause,
    },

    /// A local I/O failure that retrying will not fix: disk full, write refused (exit 74).
    #[error("I/O error at {uri}")]
    Io {
        /// The path or URI being read or written.
        uri: String,
        /// The underlying error.
        #[source]
        source: Cause,
    },

    /// A store that answered a request the pipeline needs with 501 Not Implemented (exit 74):
    /// retrying cannot help, the store lacks part of the API.
    #[error(
        "the store at {uri} does not implement a request the pipeline makes (HTTP 501 Not Implemented): \
         it needs a complete S3, GCS or Azure Blob implementation (emulators and gateways may lack some requests)"
    )]
    Unimplemented {
        /// The URI being accessed.
        uri: String,
        /// The underlying error.
        #[source]
        source: Cause,
    },

    /// Storage unreachable or throttled after the in-process retries (exit 75; retry later).
    #[error("storage unavailable at {uri} (transient: retrying the run later may succeed)")]
    Transient {
        /// The URI being accessed.
        uri: String,
        /// The underlying error.
        #[source]
        source: Cause,
    },

    /// Stopped by SIGTERM or SIGINT before the run completed (exit 75: rerunning is safe).
    #[error(
        "stopped by {signal} before the run completed: nothing of it was published; rerun with the same run id"
    )]
    Interrupted {
        /// The signal's name.
        signal: String,
    },

    /// Permission denied or not authenticated (exit 77).
    #[error(
        "permission denied at {uri} (check the credentials in the environment and the access policy)"
    )]
    Permission {
        /// The URI being accessed.
        uri: String,
        /// The underlying error.
        #[source]
        source: Cause,
    },
}

impl Error {
    /// The process exit code for this error (DESIGN.md, "Exit codes").
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::UsageCause { .. } => 64,
            Error::Data { .. } | Error::DataCause { .. } => 65,
            Error::Model { source, .. } => match source {
                crate::models::ModelError::Params(_) | crate::models::ModelError::Pixels { .. } => {
                    78
                }
                _ => 65,
            },
            Error::InputMissing { .. } => 66,
            Error::Internal(_) | Error::InternalCause { .. } => 70,
            Error::Io { .. } | Error::Unimplemented { .. } => 74,
            Error::Transient { .. } | Error::Interrupted { .. } => 75,
            Error::Permission { .. } => 77,
            Error::Config(_) | Error::Setting { .. } => 78,
        }
    }

    /// A data error about a whole file.
    pub fn data(uri: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Data {
            uri: uri.into(),
            row: None,
            message: message.into(),
        }
    }

    /// A bug found while `doing` something: `err` should not have happened.
    pub fn internal(err: impl Into<Cause>, doing: &str) -> Self {
        Error::InternalCause {
            doing: doing.to_string(),
            source: err.into(),
        }
    }

    /// Bad usage (`message`) that `err` showed.
    pub fn usage_because(message: impl Into<String>, err: impl Into<Cause>) -> Self {
        Error::UsageCause {
            message: message.into(),
            source: err.into(),
        }
    }

    /// A data error about a whole file (`message`), shown by `err`.
    pub fn data_because(
        uri: impl Into<String>,
        message: impl Into<String>,
        err: impl Into<Cause>,
    ) -> Self {
        Error::DataCause {
            uri: uri.into(),
            message: message.into(),
            source: err.into(),
        }
    }

    /// The message with every cause after it, separated by ": ", on one line.
    pub fn chain(&self) -> String {
        chain_of(self)
    }

    /// A setting, `key`, that does not fit what the run found.
    pub fn setting(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Setting {
            key: key.into(),
            message: message.into(),
        }
    }

    /// A configuration error with a single problem not tied to a line.
    pub fn config(file: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config(ConfigProblems {
            file: file.into(),
            problems: vec![ConfigProblem {
                line: None,
                message: message.into(),
            }],
        })
    }
}

/// `err`'s message with every cause after it, separated by ": ", on one line.
pub fn chain_of(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// One problem found in a pipeline TOML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// 1-based line in the file, where the problem has one.
    pub line: Option<usize>,
    /// What is wrong, naming the key, and what to do.
    pub message: String,
}

/// All the problems found in one pipeline TOML, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblems {
    /// The file the problems are in (as given on the command line).
    pub file: String,
    /// The problems, in the order found; never empty when returned as an error.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{} has {} problem{}:",
            self.file,
            n,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            match p.line {
                Some(line) => write!(f, "\n  {}:{}: {}", self.file, line, p.message)?,
                None => write!(f, "\n  {}: {}", self.file, p.message)?,
            }
        }
        Ok(())
    }
}

/// Maps an `object_store` error at `uri` to the error kind (and so exit code) it deserves.
pub fn from_store(uri: &str, err: object_store::Error) -> Error {
    use object_store::Error as S;
    let message = err.to_string();
    match &err {
        S::NotFound { .. } => Error::InputMissing {
            uri: uri.to_string(),
            hint: "the object does not exist; check the URI".into(),
        },
        S::PermissionDenied { .. } | S::Unauthenticated { .. } => Error::Permission {
            uri: uri.to_string(),
            source: Box::new(err),
        },
        S::InvalidPath { .. } | S::NotSupported { .. } | S::NotImplemented { .. } => {
            Error::Usage(format!("{uri}: {message}"))
        }
        // object_store has no typed status for these; its messages are stable.
        _ if message.contains("501 Not Implemented") => Error::Unimplemented {
            uri: uri.to_string(),
            source: Box::new(err),
        },
        _ if message.contains("URL scheme is not allowed") => Error::Setting {
            key: "environment".into(),
            message: format!(
                "{uri}: the store's endpoint is plain http, which is refused unless allowed: set \
                 AWS_ALLOW_HTTP=true (S3), GOOGLE_ALLOW_HTTP=true (GCS) or AZURE_ALLOW_HTTP=true \
                 (Azure) for an endpoint you trust on a private network"
            ),
        },
        _ => match io_kind(&err) {
            // A local filesystem error that retrying cannot fix.
            Some(kind) if !is_transient_io(kind) => Error::Io {
                uri: uri.to_string(),
                source: Box::new(err),
            },
            _ => Error::Transient {
                uri: uri.to_string(),
                source: Box::new(err),
            },
        },
    }
}

/// The `std::io::ErrorKind` at the bottom of an error chain, if there is one.
fn io_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = e.source();
    }
    None
}

fn is_transient_io(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        kind,
        K::ConnectionReset
            | K::ConnectionAborted
            | K::ConnectionRefused
            | K::TimedOut
            | K::Interrupted
            | K::WouldBlock
            | K::BrokenPipe
            | K::NotConnected
    )
}

/// Maps a local `std::io::Error` at `path` to an error kind.
pub fn from_io(path: &str, err: std::io::Error) -> Error {
    match err.kind() {
        std::io::ErrorKind::PermissionDenied => Error::Permission {
            uri: path.to_string(),
            source: Box::new(err),
        },
        k if is_transient_io(k) => Error::Transient {
            uri: path.to_string(),
            source: Box::new(err),
        },
        _ => Error::Io {
            uri: path.to_string(),
            source: Box::new(err),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_design_table() {
        assert_eq!(Error::Usage("x".into()).exit_code(), 64);
        assert_eq!(Error::data("f", "m").exit_code(), 65);
        assert_eq!(
            Error::InputMissing {
                uri: "u".into(),
                hint: "h".into()
            }
            .exit_code(),
            66
        );
        assert_eq!(Error::Internal("x".into()).exit_code(), 70);
        assert_eq!(Error::config("f", "m").exit_code(), 78);
    }

    #[test]
    fn config_problems_list_every_line() {
        let e = ConfigProblems {
            file: "a.toml".into(),
            problems: vec![
                ConfigProblem {
                    line: Some(3),
                    message: "unknown key `x`".into(),
                },
                ConfigProblem {
                    line: None,
                    message: "missing `sink.uri`".into(),
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "a.toml has 2 problems:\n  a.toml:3: unknown key `x`\n  a.toml: missing `sink.uri`"
        );
    }

    #[test]
    fn a_store_without_the_request_or_refusing_plain_http_is_not_transient() {
        let generic = |text: &str| object_store::Error::Generic {
            store: "S3",
            source: text.to_string().into(),
        };
        let e = from_store(
            "s3://b/k",
            generic("Server returned non-2xx status code: 501 Not Implemented: "),
        );
        assert_eq!(e.exit_code(), 74, "{e}");
        let e = from_store(
            "s3://b/k",
            generic("builder error: URL scheme is not allowed"),
        );
        assert_eq!(e.exit_code(), 78);
        assert!(e.to_string().contains("AWS_ALLOW_HTTP"), "{e}");
        let e = from_store(
            "s3://b/k",
            generic("Server returned non-2xx status code: 503 Service Unavailable"),
        );
        assert_eq!(e.exit_code(), 75);
    }

    #[test]
    fn a_full_disk_is_not_transient() {
        let e = from_io("/x", std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert_eq!(e.exit_code(), 74);
        let e = from_io("/x", std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(e.exit_code(), 75);
    }
}
