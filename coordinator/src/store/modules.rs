//! Wasm modules, content-addressed by sha3-256.

use ambient_core::{Digest, sha3_256};
use rusqlite::OptionalExtension;

use super::{Batch, Fail, Store, StoreError};

const INSERT_MODULE: &str =
    "INSERT INTO modules (hash, bytes) VALUES (?1, ?2) ON CONFLICT (hash) DO NOTHING";

impl Batch<'_> {
    /// Stores a module under `hash` as part of the batch; see [`Store::put_module`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn put_module(&mut self, hash: &Digest, bytes: &[u8]) -> Result<bool, StoreError> {
        self.run("store a module", |b| {
            Ok(b.tx
                .prepare_cached(INSERT_MODULE)?
                .execute((hash.0, bytes))?
                == 1)
        })
    }
}

impl Store {
    /// Stores a module under `hash`, which the caller has checked is `sha3_256(bytes)`.
    ///
    /// Returns `true` if the module is new, `false` if it was already stored (the bytes are not
    /// compared again: the same hash means the same module). Commits immediately.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], including on a read-only store.
    pub fn put_module(&self, hash: &Digest, bytes: &[u8]) -> Result<bool, StoreError> {
        self.read("store a module", |conn| {
            let changed = conn
                .prepare_cached(INSERT_MODULE)?
                .execute((hash.0, bytes))?;
            Ok(changed == 1)
        })
    }

    /// The module stored under `hash`, or `None`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] if the stored bytes no longer hash to `hash` (the file was damaged
    /// or edited; a node would reject them anyway); [`StoreError::Sqlite`].
    pub fn module(&self, hash: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        self.read("read a module", |conn| {
            let bytes: Option<Vec<u8>> = conn
                .prepare_cached("SELECT bytes FROM modules WHERE hash = ?1")?
                .query_row([hash.0], |r| r.get(0))
                .optional()?;
            if let Some(bytes) = &bytes {
                let actual = sha3_256(bytes);
                if actual != *hash {
                    return Err(Fail::Corrupt(format!(
                        "module {hash} is stored with bytes that hash to {actual}"
                    )));
                }
            }
            Ok(bytes)
        })
    }

    /// The hashes of every stored module, in the order they were stored.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn module_hashes(&self) -> Result<Vec<Digest>, StoreError> {
        self.read("list modules", |conn| {
            let hashes = conn
                .prepare_cached("SELECT hash FROM modules ORDER BY id")?
                .query_map([], |r| r.get(0).map(Digest))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(hashes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_is_stored_once_and_read_back_by_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = Store::open(&path).unwrap();
        let bytes = b"\0asm\x01\0\0\0".to_vec();
        let hash = sha3_256(&bytes);
        assert!(store.put_module(&hash, &bytes).unwrap());
        assert!(!store.put_module(&hash, &bytes).unwrap());
        drop(store);

        let store = Store::open_read_only(&path).unwrap();
        assert_eq!(store.module(&hash).unwrap(), Some(bytes));
        assert_eq!(store.module(&sha3_256(b"other")).unwrap(), None);
        assert_eq!(store.module_hashes().unwrap(), [hash]);
    }

    #[test]
    fn a_module_whose_bytes_were_altered_is_reported_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        let hash = sha3_256(b"module");
        store.put_module(&hash, b"module").unwrap();
        store
            .conn
            .execute("UPDATE modules SET bytes = x'00'", [])
            .unwrap();
        let err = store.module(&hash).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }
}
