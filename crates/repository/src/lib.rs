//! PostgreSQL access for the dashboard service.
