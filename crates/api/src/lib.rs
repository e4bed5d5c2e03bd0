//! The dashboard HTTP API on actix-web.
//!
//! This crate is the composition root. For now it holds the layered [`settings`]; the routes for
//! the dashboard and batch endpoints, health, metrics and OpenAPI, and the application that can be
//! built on any port come with the service layer.

pub mod settings;
