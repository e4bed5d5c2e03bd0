//! Test support for database tests.
