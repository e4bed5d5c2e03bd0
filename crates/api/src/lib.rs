//! The dashboard HTTP API on actix-web.
//!
//! This crate will hold the composition root: settings, telemetry, the application built on a
//! chosen port, the routes for the dashboard and batch endpoints, health, metrics and OpenAPI.
