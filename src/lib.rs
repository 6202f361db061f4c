//! anomaly-pipeline: a batch job that learns what normal images look like — an explicit
//! density model p(x) — and flags the ones that are not.
//!
//! ```text
//! source ─► decode ─► preprocess ─► fit (or load model) ─► score ─► decide ─► sink
//! io::source io::decode data::preprocess pipeline::fit     pipeline::score decide  pipeline::commit
//! ```
//!
//! The binary `pipeline` is a thin shell over [`commands::dispatch`]; every stage lives in the
//! module named after it. Library errors are [`error::Error`], mapped to exit codes once, in
//! `main`.
#![deny(missing_docs)]

pub mod caught_panic;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod decide;
pub mod error;
pub mod fuzz;
pub mod io;
pub mod kernels;
pub mod logging;
pub mod models;
pub mod pipeline;
pub mod report;
pub mod train;
