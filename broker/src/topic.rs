//! Topic names and topic filters (MQTT 3.1.1 section 4.7): validation and matching.
//!
//! These are written here rather than taken from `rumqttc::mqttbytes`: its `matches` slices
//! `topic[..1]`, which panics on a topic that starts with a multi-byte character, and its
//! `valid_topic` accepts the empty topic. Both inputs come straight from peers.

/// Prefix of a shared subscription, `$share/<group>/<filter>`.
const SHARE_PREFIX: &str = "$share/";

/// A filter from SUBSCRIBE or UNSUBSCRIBE, with the shared-subscription group split off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FilterSpec<'a> {
    /// The filter matched against topic names.
    pub filter: &'a str,
    /// `Some(group)` for `$share/<group>/<filter>`: each message goes to one member of the group.
    pub group: Option<&'a str>,
}

/// Whether a PUBLISH may use `topic`: at least one character, no wildcard, no NUL
/// (MQTT-4.7.3-1, MQTT-3.3.2-2, MQTT-4.7.3-2).
pub(crate) fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Whether `filter` is a well-formed topic filter: not empty, no NUL, `+` only as a whole
/// level and `#` only as the whole last level (MQTT-4.7.1-2, MQTT-4.7.1-3).
pub(crate) fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        let is_well_formed = match level {
            "#" => is_last,
            "+" => true,
            _ => !level.contains(['+', '#']),
        };
        if !is_well_formed {
            return false;
        }
    }
    true
}

/// Splits `raw` into its filter and shared-subscription group, or `None` when it is invalid
/// (SUBACK answers `0x80` for it).
pub(crate) fn parse_filter(raw: &str) -> Option<FilterSpec<'_>> {
    let Some(shared) = raw.strip_prefix(SHARE_PREFIX) else {
        return is_valid_filter(raw).then_some(FilterSpec {
            filter: raw,
            group: None,
        });
    };
    let (group, filter) = shared.split_once('/')?;
    let is_valid_group = !group.is_empty() && !group.contains(['+', '#', '\0']);
    (is_valid_group && is_valid_filter(filter)).then_some(FilterSpec {
        filter,
        group: Some(group),
    })
}

/// Whether `topic` matches `filter`; both are assumed valid. A topic that starts with `$` is not
/// matched by a filter that starts with a wildcard (MQTT-4.7.2-1), so `#` does not see `$SYS/...`.
pub(crate) fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for filter_level in filter.split('/') {
        if filter_level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(level) if filter_level == "+" || filter_level == level => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Whether every topic `requested` matches is also matched by `allowed`; both are assumed
/// valid filters. Decides whether a grant allows a subscription.
pub(crate) fn covers(allowed: &str, requested: &str) -> bool {
    if requested.starts_with('$') && allowed.starts_with(['+', '#']) {
        return false;
    }
    let mut allowed_levels = allowed.split('/');
    let mut requested_levels = requested.split('/');
    loop {
        match (allowed_levels.next(), requested_levels.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(r)) if a == r => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_must_be_non_empty_and_free_of_wildcards() {
        assert!(is_valid_topic_name("a/b"));
        assert!(is_valid_topic_name("/"));
        assert!(is_valid_topic_name("é/ü"));
        assert!(!is_valid_topic_name(""));
        assert!(!is_valid_topic_name("a/+"));
        assert!(!is_valid_topic_name("a/#"));
        assert!(!is_valid_topic_name("a\0b"));
    }

    #[test]
    fn wildcards_must_occupy_whole_levels() {
        for valid in [
            "#", "+", "a/#", "a/+/c", "+/+", "/", "a//b", "$SYS/#", "+/#",
        ] {
            assert!(is_valid_filter(valid), "{valid} should be valid");
        }
        for invalid in ["", "a/#/c", "a#", "a/b#", "a+", "a/+b/c", "##", "a/\0"] {
            assert!(!is_valid_filter(invalid), "{invalid:?} should be invalid");
        }
    }

    #[test]
    fn a_shared_filter_names_its_group() {
        assert_eq!(
            parse_filter("$share/workers/tasks/+"),
            Some(FilterSpec {
                filter: "tasks/+",
                group: Some("workers")
            })
        );
        assert_eq!(
            parse_filter("tasks/#"),
            Some(FilterSpec {
                filter: "tasks/#",
                group: None
            })
        );
        assert_eq!(parse_filter("$share/workers"), None);
        assert_eq!(parse_filter("$share//tasks"), None);
        assert_eq!(parse_filter("$share/w+/tasks"), None);
        assert_eq!(parse_filter("$share/workers/a/#/b"), None);
    }

    #[test]
    fn single_level_wildcards_match_exactly_one_level() {
        assert!(matches("a/b/c", "a/+/c"));
        assert!(matches("a//c", "a/+/c"));
        assert!(matches("/finance", "+/+"));
        assert!(matches("/finance", "/+"));
        assert!(!matches("/finance", "+"));
        assert!(!matches("a/b", "a/b/+"));
        assert!(!matches("a/b/c/d", "a/+/c"));
    }

    #[test]
    fn a_multi_level_wildcard_matches_the_parent_and_everything_below() {
        assert!(matches("sport", "sport/#"));
        assert!(matches("sport/tennis/player1", "sport/#"));
        assert!(matches("anything/at/all", "#"));
        assert!(!matches("sports", "sport/#"));
    }

    #[test]
    fn a_dollar_topic_is_not_matched_by_a_leading_wildcard() {
        assert!(!matches("$SYS/broker/load", "#"));
        assert!(!matches("$SYS/broker", "+/broker"));
        assert!(matches("$SYS/broker/load", "$SYS/#"));
        assert!(matches("a/$b", "a/+"));
    }

    #[test]
    fn a_filter_covers_another_only_when_it_matches_everything_the_other_does() {
        assert!(covers("a/+", "a/b"));
        assert!(covers("a/+", "a/+"));
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("a/#", "a/#"));
        assert!(covers("a/#", "a"));
        assert!(covers("#", "x/+/y"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(!covers("a/b", "a"));
        assert!(!covers("#", "$SYS/#"));
    }

    #[test]
    fn a_topic_starting_with_a_multi_byte_character_does_not_panic() {
        assert!(matches("é/a", "+/a"));
        assert!(matches("é", "#"));
    }
}
