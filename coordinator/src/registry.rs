//! The node registry: who is out there, healthy, and trusted.
