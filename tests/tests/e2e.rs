//! The end-to-end tests, one module a file, built as one test binary: each test starts the real
//! parts it needs (see the harness, `reefline_e2e`). `cargo test -p reefline-e2e --test e2e feeds::`
//! runs one file's tests.

mod allowlists;
mod answers;
mod backpressure;
mod callbacks;
mod contract;
mod dead_letters;
mod drain;
mod end_to_end;
mod faults;
mod feed_exports;
mod feed_operations;
mod feeds;
mod hostile;
mod lanes;
mod models;
mod objects;
mod outages;
mod tenants;
mod traces;
mod web;
