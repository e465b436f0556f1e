//! The SQLite journal, module store, node snapshot and ledger.
