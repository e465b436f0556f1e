//! The set of subscribed filters, stored level by level.
//!
//! A publish walks only the branches its topic can match, so routing cost follows the topic's
//! depth rather than the number of subscriptions. The result must equal filtering every stored
//! filter with [`topic::matches`](crate::topic::matches); a test checks that. Every walk is a
//! loop, not recursion, because filter depth is chosen by peers.

use std::collections::HashMap;

/// A set of valid topic filters, queried by topic name.
#[derive(Debug, Default)]
pub(crate) struct FilterTree {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    /// Keyed by the level's text. `+` and `#` are keys like any other: no topic name contains
    /// them, so a literal lookup can never hit a wildcard branch by accident.
    children: HashMap<Box<str>, Node>,
    /// The filter that ends at this node, if one does.
    filter: Option<Box<str>>,
}

impl Drop for Node {
    /// Unlinks the subtree level by level: the derived drop would recurse once per level.
    fn drop(&mut self) {
        let mut orphans: Vec<Node> = self.children.drain().map(|(_, node)| node).collect();
        while let Some(mut node) = orphans.pop() {
            orphans.extend(node.children.drain().map(|(_, node)| node));
        }
    }
}

impl FilterTree {
    /// Adds `filter`, which must be valid. Adding a filter twice keeps one copy.
    pub(crate) fn insert(&mut self, filter: &str) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.filter.is_none() {
            node.filter = Some(filter.into());
        }
    }

    /// Removes `filter` and prunes the branch that existed only for it.
    pub(crate) fn remove(&mut self, filter: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        // The branch to cut starts below the deepest ancestor that something else still needs
        // (another filter ends there, or another branch leaves it).
        let mut cut_at = 0;
        let mut node = &self.root;
        for (depth, level) in levels.iter().enumerate() {
            if depth > 0 && (node.filter.is_some() || node.children.len() > 1) {
                cut_at = depth;
            }
            let Some(child) = node.children.get(*level) else {
                return;
            };
            node = child;
        }
        if node.filter.is_none() {
            return;
        }
        if node.children.is_empty() {
            if let Some(parent) = self.node_mut(&levels[..cut_at]) {
                parent.children.remove(levels[cut_at]);
            }
        } else if let Some(end) = self.node_mut(&levels) {
            end.filter = None;
        }
    }

    /// Appends to `out` every stored filter that matches `topic`, each once.
    pub(crate) fn matching<'a>(&'a self, topic: &str, out: &mut Vec<&'a str>) {
        let levels: Vec<&str> = topic.split('/').collect();
        // MQTT-4.7.2-1: a topic starting with `$` is invisible to wildcards at the first level.
        let is_dollar_topic = topic.starts_with('$');
        let mut pending = vec![(&self.root, 0_usize)];
        while let Some((node, depth)) = pending.pop() {
            let wildcards_apply = depth > 0 || !is_dollar_topic;
            if wildcards_apply {
                // `a/#` matches `a` as well as everything below it.
                if let Some(filter) = node.children.get("#").and_then(|n| n.filter.as_deref()) {
                    out.push(filter);
                }
            }
            match levels.get(depth) {
                None => out.extend(node.filter.as_deref()),
                Some(level) => {
                    if wildcards_apply && let Some(plus) = node.children.get("+") {
                        pending.push((plus, depth + 1));
                    }
                    if let Some(child) = node.children.get(*level) {
                        pending.push((child, depth + 1));
                    }
                }
            }
        }
    }

    /// Whether no filter is stored.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.root.children.is_empty()
    }

    fn node_mut(&mut self, levels: &[&str]) -> Option<&mut Node> {
        let mut node = &mut self.root;
        for level in levels {
            node = node.children.get_mut(*level)?;
        }
        Some(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;

    const FILTERS: &[&str] = &[
        "#",
        "+",
        "a",
        "a/#",
        "a/+",
        "a/b",
        "a/b/c",
        "a/+/c",
        "+/b/#",
        "/",
        "/+",
        "+/+",
        "a//c",
        "$SYS/#",
        "$SYS/+/load",
    ];
    const TOPICS: &[&str] = &[
        "a",
        "a/b",
        "a/b/c",
        "a/x/c",
        "a//c",
        "b",
        "/",
        "/finance",
        "x/b/y/z",
        "$SYS/broker/load",
        "$SYS",
        "é/b",
    ];

    fn matching_sorted(tree: &FilterTree, topic: &str) -> Vec<String> {
        let mut found = Vec::new();
        tree.matching(topic, &mut found);
        let mut found: Vec<String> = found.into_iter().map(str::to_owned).collect();
        found.sort();
        found
    }

    fn expected(filters: &[&str], topic: &str) -> Vec<String> {
        let mut expected: Vec<String> = filters
            .iter()
            .filter(|filter| matches(topic, filter))
            .map(|filter| (*filter).to_owned())
            .collect();
        expected.sort();
        expected
    }

    #[test]
    fn the_tree_agrees_with_matching_every_filter_in_turn() {
        let mut tree = FilterTree::default();
        for filter in FILTERS {
            tree.insert(filter);
        }
        for topic in TOPICS {
            assert_eq!(
                matching_sorted(&tree, topic),
                expected(FILTERS, topic),
                "topic {topic}"
            );
        }
    }

    #[test]
    fn removed_filters_stop_matching_and_leave_the_others_intact() {
        let mut tree = FilterTree::default();
        for filter in FILTERS {
            tree.insert(filter);
        }
        let kept: Vec<&str> = FILTERS.iter().copied().step_by(2).collect();
        for filter in FILTERS.iter().skip(1).step_by(2) {
            tree.remove(filter);
        }
        for topic in TOPICS {
            assert_eq!(
                matching_sorted(&tree, topic),
                expected(&kept, topic),
                "topic {topic}"
            );
        }
        for filter in kept {
            tree.remove(filter);
        }
        assert!(tree.is_empty(), "every branch is pruned: {tree:?}");
    }

    #[test]
    fn removing_a_filter_that_is_a_prefix_of_another_keeps_the_longer_one() {
        let mut tree = FilterTree::default();
        tree.insert("a/b");
        tree.insert("a/b/c");
        tree.remove("a/b");
        assert_eq!(matching_sorted(&tree, "a/b"), Vec::<String>::new());
        assert_eq!(matching_sorted(&tree, "a/b/c"), vec!["a/b/c"]);
        tree.remove("a/b/c");
        assert!(tree.is_empty());
    }

    #[test]
    fn removing_an_unknown_filter_changes_nothing() {
        let mut tree = FilterTree::default();
        tree.insert("a/b");
        tree.remove("a/b/c");
        tree.remove("a");
        tree.remove("x/y");
        assert_eq!(matching_sorted(&tree, "a/b"), vec!["a/b"]);
    }

    #[test]
    fn a_very_deep_filter_does_not_exhaust_the_stack() {
        let filter = vec!["x"; 100_000].join("/");
        let mut tree = FilterTree::default();
        tree.insert(&filter);
        assert_eq!(matching_sorted(&tree, &filter), vec![filter.clone()]);
        tree.remove(&filter);
        assert!(tree.is_empty());
    }
}
