//! The `default` catalog.
