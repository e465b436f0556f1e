//! End-to-end tests for Ambient live in `tests/`; this library is empty.
