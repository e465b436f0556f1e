//! The registry snapshot: what the service last knew about each node, for `ambient nodes`.

use ambient_core::NodeId;
use rusqlite::OptionalExtension;

use crate::registry::NodeView;

use super::{Batch, Store, StoreError, from_sql_int, to_sql_int, unix_ms};

impl Batch<'_> {
    /// Replaces the whole snapshot with `nodes` (each a node and its `NodeView` as JSON), taken
    /// at `now_ms` (Unix milliseconds).
    ///
    /// # Errors
    ///
    /// [`StoreError::OutOfRange`]; [`StoreError::Sqlite`], for example if a node is listed twice.
    pub fn save_nodes(
        &mut self,
        nodes: &[(NodeId, String)],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.run("save the node snapshot", |b| {
            let now = to_sql_int(now_ms, "now_ms")?;
            b.tx.prepare_cached("DELETE FROM nodes")?.execute([])?;
            let mut insert =
                b.tx.prepare_cached("INSERT INTO nodes (node, view_json) VALUES (?1, ?2)")?;
            for (node, json) in nodes {
                insert.execute((node.0, json))?;
            }
            b.tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('nodes_saved_ms', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute([now])?;
            Ok(())
        })
    }
}

impl Batch<'_> {
    /// Stores the dispatcher's drop counters beside the snapshot, as `dropped.<name>`.
    ///
    /// # Errors
    ///
    /// [`StoreError::OutOfRange`], [`StoreError::Sqlite`].
    pub fn save_dropped(&mut self, counts: &[(&str, u64)]) -> Result<(), StoreError> {
        self.run("save the drop counters", |b| {
            let mut upsert = b.tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?;
            for (name, n) in counts {
                upsert.execute((format!("dropped.{name}"), to_sql_int(*n, "dropped")?))?;
            }
            Ok(())
        })
    }
}

impl Store {
    /// The drop counters saved with the last snapshot, by name; empty if never saved.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] if a count is negative.
    pub fn dropped(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        self.read("read the drop counters", |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT substr(key, 9), value FROM meta WHERE key LIKE 'dropped.%'",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = std::collections::BTreeMap::new();
            for row in rows {
                let (name, n) = row?;
                out.insert(name, from_sql_int(n, "dropped")?);
            }
            Ok(out)
        })
    }

    /// Replaces the node snapshot in one transaction, stamped with the wall clock; see
    /// [`Batch::save_nodes`].
    ///
    /// # Errors
    ///
    /// As [`Batch::save_nodes`]; on error the previous snapshot is kept.
    pub fn save_nodes(&mut self, nodes: &[(NodeId, String)]) -> Result<(), StoreError> {
        let now_ms = unix_ms();
        self.write(|b| b.save_nodes(nodes, now_ms))
    }

    /// The last saved snapshot: each node with its `NodeView` JSON, ordered by node id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn nodes(&self) -> Result<Vec<(NodeId, String)>, StoreError> {
        self.read("read the node snapshot", |conn| {
            let nodes = conn
                .prepare_cached("SELECT node, view_json FROM nodes ORDER BY node")?
                .query_map([], |r| Ok((NodeId(r.get(0)?), r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(nodes)
        })
    }

    /// The last saved snapshot as typed views, ordered by node id. A row that does not
    /// decode (written by another version of the service) is left out: the next snapshot
    /// replaces it within seconds.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn node_views(&self) -> Result<Vec<NodeView>, StoreError> {
        Ok(self
            .nodes()?
            .into_iter()
            .filter_map(|(_, json)| serde_json::from_str(&json).ok())
            .collect())
    }

    /// When the snapshot was last saved, in Unix milliseconds; `None` if never.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; [`StoreError::Corrupt`] if the stored time is negative.
    pub fn nodes_saved_ms(&self) -> Result<Option<u64>, StoreError> {
        self.read("read the node snapshot time", |conn| {
            conn.prepare_cached("SELECT value FROM meta WHERE key = 'nodes_saved_ms'")?
                .query_row([], |r| r.get(0))
                .optional()?
                .map(|ms| from_sql_int(ms, "nodes_saved_ms"))
                .transpose()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saving_nodes_replaces_the_previous_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.nodes_saved_ms().unwrap(), None);
        let (a, b) = (NodeId([0xaa; 16]), NodeId([0x0b; 16]));
        store
            .save_nodes(&[(a, "{\"n\":1}".into()), (b, "{\"n\":2}".into())])
            .unwrap();
        let mut batch = store.batch().unwrap();
        batch.save_nodes(&[(a, "{\"n\":3}".into())], 200).unwrap();
        batch.commit().unwrap();

        let reader = Store::open_read_only(&path).unwrap();
        assert_eq!(reader.nodes().unwrap(), [(a, "{\"n\":3}".to_owned())]);
        assert_eq!(reader.nodes_saved_ms().unwrap(), Some(200));
    }
}
