//! Integration tests: the real `pipeline` binary on real Parquet files in temp dirs.

mod common;

mod bad_inputs;
mod commands;
mod crash;
mod delta;
mod deploy;
mod end_to_end;
mod full_disk;
mod history;
mod hostile;
mod layouts;
mod object_storage;
mod query;
mod sharding;
