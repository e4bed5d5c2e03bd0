//! A load generator for the dashboard service.
//!
//! This crate will hold `cargo xtask loadtest`: closed- and open-loop load, HDR histograms,
//! and terminal, JSON and SVG reports.
