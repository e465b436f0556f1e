//! Task ids, node ids, digests and topics: validation and text round trips.

mod common;

use ambient_core::topics::{self, NodeTopic};
use ambient_core::{Digest, NodeId, TaskId, sha3_256};
use common::*;

#[test]
fn a_task_id_accepts_letters_digits_dot_underscore_and_dash() {
    for ok in ["a", "task-001", "A.b_c-9", &"x".repeat(TaskId::MAX_LEN)] {
        let id = TaskId::new(ok).unwrap_or_else(|| panic!("{ok:?} should be valid"));
        assert_eq!(id.as_str(), ok);
        assert_eq!(id.to_string(), ok);
    }
}

#[test]
fn a_task_id_rejects_empty_too_long_and_other_characters() {
    let too_long = "x".repeat(TaskId::MAX_LEN + 1);
    let bad = [
        "",
        &too_long,
        "a b",
        "a/b",
        "a+b",
        "a#b",
        "é",
        "tab\t",
        "nul\0",
        "topic/../x",
    ];
    for s in bad {
        assert_eq!(TaskId::new(s), None, "{s:?} should be rejected");
    }
}

#[test]
fn a_node_id_round_trips_through_hex_in_either_case() {
    let id = identity().node_id();
    assert_eq!(NodeId::from_hex(&id.to_hex()), Some(id));
    assert_eq!(NodeId::from_hex(&id.to_hex().to_uppercase()), Some(id));
    assert_eq!(format!("{id:?}"), format!("NodeId({id})"));
}

#[test]
fn malformed_hex_is_rejected() {
    let id = identity().node_id().to_hex();
    assert_eq!(NodeId::from_hex(&id[..31]), None, "too short");
    assert_eq!(NodeId::from_hex(&format!("{id}0")), None, "too long");
    assert_eq!(
        NodeId::from_hex(&format!("{}g", &id[..31])),
        None,
        "not hex"
    );
    assert_eq!(Digest::from_hex(""), None);
    assert_eq!(Digest::from_hex(&"zz".repeat(32)), None);
}

#[test]
fn a_digest_round_trips_through_hex() {
    let d = sha3_256(b"abc");
    assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
    assert_eq!(d.to_string().len(), 64);
}

#[test]
fn different_keys_give_different_node_ids() {
    assert_ne!(identity().node_id(), other_identity().node_id());
}

#[test]
fn an_identity_round_trips_through_its_secret() {
    let id = identity();
    assert_eq!(id.to_secret(), SECRET);
    assert_eq!(
        ambient_core::Identity::from_secret(&id.to_secret()).public_key(),
        id.public_key()
    );
}

#[test]
fn every_node_topic_parses_back_to_its_node_and_leaf() {
    let node = identity().node_id();
    let leaves = [
        NodeTopic::Status,
        NodeTopic::Announce,
        NodeTopic::Telemetry,
        NodeTopic::Tasks,
        NodeTopic::Results,
    ];
    for leaf in leaves {
        let topic = topics::node(&node, leaf);
        assert_eq!(topics::parse_node(&topic), Some((node, leaf)), "{topic}");
    }
}

#[test]
fn topics_that_are_not_node_topics_do_not_parse() {
    let node = identity().node_id();
    let bad = [
        String::new(),
        "ambient/v1/nodes".to_owned(),
        format!("ambient/v2/nodes/{node}/status"),
        format!("ambient/v1/nodes/{node}/unknown"),
        format!("ambient/v1/nodes/{node}/status/extra"),
        format!("ambient/v1/nodes/{node}"),
        "ambient/v1/nodes/not-hex/status".to_owned(),
        "ambient/v1/nodes/+/+".to_owned(),
    ];
    for topic in bad {
        assert_eq!(topics::parse_node(&topic), None, "{topic:?}");
    }
}

#[test]
fn a_module_topic_parses_back_to_its_hash() {
    let hash = sha3_256(MODULE);
    assert_eq!(topics::parse_module(&topics::module(&hash)), Some(hash));
    assert_eq!(topics::parse_module("ambient/v1/modules/abc"), None);
    assert_eq!(topics::parse_module(topics::ALL_MODULES), None);
}

#[test]
fn the_longest_task_id_fits_in_a_topic() {
    let longest = TaskId::new(&"x".repeat(TaskId::MAX_LEN)).expect("valid");
    let topic = topics::task_result(&longest);
    assert!(topic.ends_with("/result"), "{topic}");
    assert_eq!(
        topic.len(),
        "ambient/v1/tasks//result".len() + TaskId::MAX_LEN
    );
}
