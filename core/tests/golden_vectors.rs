//! Golden vectors: the exact bytes of every wire message and every proof hash.
//!
//! A failure here means the wire format or a hash changed. That breaks every deployed agent
//! and coordinator of the previous version, so bump `PROTOCOL_VERSION` (or the domain tag),
//! then re-pin the bytes on purpose. Every value is built from the fixed inputs in
//! `common/mod.rs` (secret key `[7; 32]`); ed25519 signing is deterministic, so signatures
//! are pinned too. The crypto values were cross-checked once with OpenSSL 3.0:
//! `openssl pkey` (public key), `openssl dgst -sha3-256` (node id, commitment, chain hash,
//! module hash) and `openssl pkeyutl -sign -rawin` (signature).

mod common;

use ambient_core::topics::{self, NodeTopic};
use ambient_core::{
    Digest, Engine, Envelope, Message, NodeId, Ping, Pong, Probe, Refusal, Report, ReportBody,
    SignedRefusal, TripReason, chain_hash, sha3_256,
};
use common::*;

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn executed_report() -> Message<'static> {
    Message::Report(Report {
        task_id: task_id(),
        attempt: 1,
        node: identity().node_id(),
        body: ReportBody::Executed {
            receipt: signed_receipt(),
            output: OUTPUT,
            message: heapless::String::new(),
        },
    })
}

fn refused_report() -> Message<'static> {
    Message::Report(Report {
        task_id: task_id(),
        attempt: 2,
        node: identity().node_id(),
        body: ReportBody::Refused(SignedRefusal::sign(
            &identity(),
            &task_id(),
            2,
            &identity().node_id(),
            Refusal::Breaker(TripReason::Overheated {
                temp_millic: 86_000,
                max_millic: 85_000,
            }),
        )),
    })
}

fn ping() -> Message<'static> {
    Message::Ping(Ping {
        node: identity().node_id(),
        nonce: 7,
        padding: &[0xaa; 4],
    })
}

/// Checks the encoding against `expected`, then that decoding it gives the message back.
fn assert_pinned(message: Message<'_>, expected: &str) {
    let frame = Envelope::new(message.clone()).to_vec();
    assert_eq!(hex(&frame), expected, "the encoding changed");
    let bytes = hex::decode(expected).expect("valid hex");
    let decoded = Envelope::decode(&bytes).expect("the pinned frame decodes");
    assert_eq!(
        decoded,
        Envelope::new(message),
        "the pinned frame decodes to another message"
    );
}

// --- hashes and keys ---

#[test]
fn sha3_256_of_abc_is_the_fips_202_known_answer() {
    assert_eq!(
        hex(&sha3_256(b"abc").0),
        "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"
    );
    assert_eq!(
        hex(&sha3_256(b"").0),
        "a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a"
    );
}

#[test]
fn the_fixed_secret_gives_a_pinned_public_key_and_node_id() {
    let id = identity();
    assert_eq!(
        hex(&id.public_key()),
        "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
    );
    // The first 16 bytes of sha3-256("ambient/node-id/v1\0" ‖ public key).
    let node = NodeId::from_public_key(&id.public_key());
    assert_eq!(hex(&node.0), "096fb3f142eff542bda546cce4472a5e");
    assert_eq!(node, id.node_id());
    assert_eq!(node.to_hex().as_str(), "096fb3f142eff542bda546cce4472a5e");
}

#[test]
fn the_receipt_encoding_and_commitment_are_pinned() {
    let r = receipt();
    let encoded = postcard::to_stdvec(&r).expect("a receipt encodes");
    assert_eq!(
        hex(&encoded),
        concat!(
            "087461736b2d303031",               // task id: length 8, "task-001"
            "01",                               // attempt
            "096fb3f142eff542bda546cce4472a5e", // node
            "76fcc948d12ff9ec24dcedd5e76c8fac29cfa916ecc2e1fd73e9d99cadb633ab", // module
            "3338be694f50c5f338814986cdf0686453a888b84f424d792af4b9202398f392", // input
            "b834aac0f6ecf6e3b2e070b48471bed3f2a4bb18a5c8d793c09f9ddd86738ebd", // output
            "a706",                             // fuel used 807
            "80808020",                         // memory 64 MiB
            "8827",                             // timeout 5,000 ms
            "c0843d",                           // fuel limit 1,000,000
            "00",                               // engine: wasmtime
            "00",                               // exit: ok
        )
    );
    // sha3-256("ambient/receipt/v1\0" ‖ the encoding above).
    assert_eq!(
        hex(&r.commitment().0),
        "3305c32107004c5b6605bf099bf8784fe2a0589d5fb3a2ff81990b9f7395480f"
    );
}

#[test]
fn the_receipt_signature_is_pinned_and_verifies() {
    let signed = signed_receipt();
    assert_eq!(
        hex(&signed.signature),
        concat!(
            "34ae2699091385f40137111b43577bd1e9e076dce104b3d20a156c6ada44d170",
            "ca520664f74a601e5a5b422b69bbb4e6818e771f3f77f6c12685d8ad14f7b409",
        )
    );
    assert_eq!(signed.verify_signature(&identity().public_key()), Ok(()));
}

#[test]
fn the_ledger_chain_hash_is_pinned() {
    // sha3-256("ambient/ledger/v1\0" ‖ 32 zero bytes ‖ "entry-1").
    let first = chain_hash(&Digest([0; 32]), b"entry-1");
    assert_eq!(
        hex(&first.0),
        "35c9a23e4ad254b9c923ea67400b89ed599d70620dd08cab341dd43e46e27947"
    );
    let second = chain_hash(&first, b"entry-2");
    assert_eq!(
        hex(&second.0),
        "dd58de5bf1913fecf2ef5d4dce3bb8f9016ea5c4442b3ff2ded5b6eca98da43a"
    );
}

#[test]
fn topic_strings_are_pinned() {
    let node = identity().node_id();
    assert_eq!(topics::PREFIX, "ambient/v1");
    assert_eq!(topics::SUBMIT, "ambient/v1/tasks/submit");
    assert_eq!(topics::ALL_NODES, "ambient/v1/nodes/+/+");
    assert_eq!(topics::ALL_MODULES, "ambient/v1/modules/+");
    let leaves = [
        (NodeTopic::Status, "status"),
        (NodeTopic::Announce, "announce"),
        (NodeTopic::Telemetry, "telemetry"),
        (NodeTopic::Tasks, "tasks"),
        (NodeTopic::Results, "results"),
    ];
    for (leaf, name) in leaves {
        assert_eq!(
            topics::node(&node, leaf).as_str(),
            format!("ambient/v1/nodes/096fb3f142eff542bda546cce4472a5e/{name}")
        );
    }
    assert_eq!(
        topics::ha_state(&node).as_str(),
        "ambient/v1/ha/096fb3f142eff542bda546cce4472a5e/state"
    );
    assert_eq!(topics::ALL_HA_STATES, "ambient/v1/ha/+/state");
    assert_eq!(
        topics::task_result(&task_id()).as_str(),
        "ambient/v1/tasks/task-001/result"
    );
    assert_eq!(
        topics::module(&sha3_256(MODULE)).as_str(),
        "ambient/v1/modules/76fcc948d12ff9ec24dcedd5e76c8fac29cfa916ecc2e1fd73e9d99cadb633ab"
    );
}

// --- every message variant, in an envelope ---

#[test]
fn an_announce_envelope_is_pinned_and_round_trips() {
    assert_pinned(
        Message::Announce(announce()),
        concat!(
            "05",                                                               // protocol version
            "00",                                                               // Message::Announce
            "096fb3f142eff542bda546cce4472a5e",                                 // node
            "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c", // public key
            "07616172636836340480808080200005302e312e30", // "aarch64", 4 cores, 8 GiB, wasmtime, "0.1.0"
            "020367707506726f6f6d2d32",                   // labels ["gpu", "room-2"]
            "0103706935",                                 // profile Some("pi5")
            "02",                                         // max concurrency
            "018094ebdc03",                               // Some(1e9 fuel/s)
            "b3db346124a64fa6fcfd729166f298e2f6be80ab9632af716461d71c2668614e", // signature
            "a291021fa54143eb395180f5baff8012b19f24bf7fc7fa7a3adc935d6c4f7f00",
        ),
    );
}

#[test]
fn a_telemetry_envelope_is_pinned_and_round_trips() {
    assert_pinned(
        Message::Telemetry(telemetry()),
        concat!(
            "0501",
            "096fb3f142eff542bda546cce4472a5e", // node
            "2a",                               // seq 42
            "ef9bafcdf8acd19101",               // boot id 0x0123456789abcdef
            "01d08603",                         // Some(50,000 kbit/s)
            "01a09c01",                         // Some(20,000 µs)
            "01fa01",                           // Some(250 ‰)
            "018080808004",                     // Some(1 GiB)
            "01f8c007",                         // Some(61,500 m°C), zigzag
            "00010000",                         // throttle, 1 running, 0 errors, closed
            "00",                               // not simulated
            "19adc2bfd2f802581e3deee25b80edac1e6e5a6a9edee8f88caf3b3fc7075ea4", // signature
            "f0497e9aacd301c54aa6f7f4ad412463f009282573ca53374f1f8e9c76c3970a",
        ),
    );
}

#[test]
fn an_assign_envelope_is_pinned_and_round_trips() {
    assert_pinned(
        Message::Assign(assignment()),
        concat!(
            "0502",
            "087461736b2d30303101", // "task-001", attempt 1
            "76fcc948d12ff9ec24dcedd5e76c8fac29cfa916ecc2e1fd73e9d99cadb633ab", // module
            "00",                   // abi plain
            "0372756e",             // entry "run"
            "808080208827c0843d",   // limits
            "0568656c6c6f",         // input "hello"
            // the coordinator's public key (secret [8; 32]), cross-checked with `openssl pkey`
            "1398f62c6d1a457c51ba6a4b5f3dbd2f69fca93216218dc8997e416bd17d93ca",
            // the batch: one claim digest, sha3-256("ambient/assign-claim/v2\0" ‖ task id ‖
            // attempt ‖ node ‖ module ‖ abi ‖ entry ‖ limits ‖ sha3-256(input)), cross-checked
            // with `openssl dgst -sha3-256`
            "01",
            "0ef7a02983b4f637b9f1b18f3be012736446547f27eafaff7ab71d5e0a47afdb",
            // ed25519 over sha3-256("ambient/assign/v2\0" ‖ the batch), cross-checked with
            // `openssl pkeyutl -sign -rawin`
            "bc2edfa0e29c7a2229cf0bc6d794670b555f0de4b10adf29c665770f87988acd",
            "bd1b4fbdc826fc10b285525d8fea7fa1cd913113bbf4da83385a07cac4921906",
        ),
    );
}

#[test]
fn an_executed_report_envelope_is_pinned_and_round_trips() {
    assert_pinned(
        executed_report(),
        concat!(
            "0503",
            "087461736b2d30303101",             // "task-001", attempt 1
            "096fb3f142eff542bda546cce4472a5e", // node
            "00",                               // ReportBody::Executed
            // the receipt, exactly as in `the_receipt_encoding_and_commitment_are_pinned`
            "087461736b2d30303101096fb3f142eff542bda546cce4472a5e",
            "76fcc948d12ff9ec24dcedd5e76c8fac29cfa916ecc2e1fd73e9d99cadb633ab",
            "3338be694f50c5f338814986cdf0686453a888b84f424d792af4b9202398f392",
            "b834aac0f6ecf6e3b2e070b48471bed3f2a4bb18a5c8d793c09f9ddd86738ebd",
            "a706808080208827c0843d0000",
            // the signature, as in `the_receipt_signature_is_pinned_and_verifies`
            "34ae2699091385f40137111b43577bd1e9e076dce104b3d20a156c6ada44d170",
            "ca520664f74a601e5a5b422b69bbb4e6818e771f3f77f6c12685d8ad14f7b409",
            "0548454c4c4f", // output "HELLO"
            "00",           // empty message
        ),
    );
}

#[test]
fn a_refused_report_envelope_is_pinned_and_round_trips() {
    assert_pinned(
        refused_report(),
        concat!(
            "0503",
            "087461736b2d30303102",             // "task-001", attempt 2
            "096fb3f142eff542bda546cce4472a5e", // node
            "01",                               // ReportBody::Refused
            "00",                               // Refusal::Breaker
            "00",                               // TripReason::Overheated
            "e0bf0a",                           // 86,000 m°C, zigzag
            "90b00a",                           // 85,000 m°C, zigzag
            // ed25519 over sha3-256("ambient/refusal/v1\0" ‖ task id ‖ attempt ‖ node ‖ refusal),
            // cross-checked with `openssl pkeyutl -sign -rawin`
            "dfca8a2980c15b0e51968d013078150720f902be648d28b04e4d2529de415eb4",
            "fe056a6126489e6ffc5b835549ecf73d0f0f3e6f10b127ce3429269bade63204",
        ),
    );
}

#[test]
fn ping_and_pong_envelopes_are_pinned_and_round_trip() {
    assert_pinned(ping(), "0504096fb3f142eff542bda546cce4472a5e0704aaaaaaaa");
    let pong = Pong::sign(&coordinator(), &identity().node_id(), 7);
    assert_pinned(
        Message::Pong(pong),
        concat!(
            "050507",                                                           // Message::Pong, nonce 7
            "1398f62c6d1a457c51ba6a4b5f3dbd2f69fca93216218dc8997e416bd17d93ca", // signer: the coordinator
            // ed25519 over sha3-256("ambient/pong/v1\0" ‖ node ‖ nonce), cross-checked with
            // `openssl pkeyutl -sign -rawin`
            "f03815dff0119a1fa731cc71fc15cc303eba215c468f0a8ac05a4999c375408c",
            "1efbd1bb59f80c71b5ce0cfd663361d1af0b9dd7338522e5c60f417a5c712701",
        ),
    );
    assert_eq!(pong.verify(&identity().node_id()), Ok(()));
    assert!(
        pong.verify(&NodeId([1; 16])).is_err(),
        "a pong for another node"
    );
    let mut replayed = pong;
    replayed.nonce = 8;
    assert!(
        replayed.verify(&identity().node_id()).is_err(),
        "another nonce"
    );
}

#[test]
fn a_probe_puts_its_nonce_after_the_padding_and_the_node_signs_its_pong() {
    let probe = Message::Probe(Probe {
        node: identity().node_id(),
        padding: &[0xaa; 4],
        nonce: 7,
    });
    assert_pinned(
        probe,
        concat!(
            "0506",                             // version 5, Message::Probe
            "096fb3f142eff542bda546cce4472a5e", // node
            "04aaaaaaaa",                       // padding: length 4, then the bytes
            "07",                               // nonce 7, last
        ),
    );
    // The node answers with its own key; the same claim as a coordinator's pong.
    let pong = Pong::sign(&identity(), &identity().node_id(), 7);
    assert_eq!(pong.signer, identity().public_key());
    assert_eq!(pong.verify(&identity().node_id()), Ok(()));
}

#[test]
fn the_pinned_announce_and_telemetry_signatures_verify() {
    let pk = identity().public_key();
    let a = announce();
    assert_eq!(
        ambient_core::verify_message(
            &pk,
            ambient_core::SignedAnnounce::TAG,
            &a.announce,
            &a.signature
        ),
        Ok(())
    );
    let t = telemetry();
    assert_eq!(
        ambient_core::verify_message(
            &pk,
            ambient_core::SignedTelemetry::TAG,
            &t.telemetry,
            &t.signature
        ),
        Ok(())
    );
    // The domain tag matters: an announce signature is not a telemetry signature.
    assert!(
        ambient_core::verify_message(
            &pk,
            ambient_core::SignedTelemetry::TAG,
            &a.announce,
            &a.signature
        )
        .is_err()
    );
}

#[test]
fn encode_to_slice_gives_the_same_bytes_as_to_vec() {
    for message in [Message::Announce(announce()), executed_report(), ping()] {
        let envelope = Envelope::new(message);
        let mut buf = [0u8; 512];
        let used = envelope
            .encode_to_slice(&mut buf)
            .expect("fits in 512 bytes");
        assert_eq!(used.to_vec(), envelope.to_vec());
    }
}

#[test]
fn encoding_into_a_too_small_buffer_is_an_error_not_a_panic() {
    let envelope = Envelope::new(Message::Announce(announce()));
    let mut buf = [0u8; 16];
    assert!(envelope.encode_to_slice(&mut buf).is_err());
}

#[test]
fn the_connect_token_is_pinned_and_verifies_only_for_its_node_and_time() {
    use ambient_core::{ConnectToken, TokenError};
    let node = identity().node_id();
    let at_ms = 1_790_000_000_000;
    let token = ConnectToken::sign(&identity(), &node.to_hex(), at_ms);
    assert_eq!(
        token.to_hex().as_str(),
        concat!(
            "000001a0c4506c00", // at_ms, big-endian
            "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c", // public key
            // ed25519 over sha3-256("ambient/connect/v1\0" ‖ postcard(username, at_ms)),
            // cross-checked with `openssl pkeyutl -sign -rawin`
            "3e32820ddb5c142aaa39002d71b20477508d6ea866aefe08681af38030982d66",
            "766e40524cbc022c9266e46586cbbe8ac8047e1efb098f129bb28f230593880d",
        )
    );
    let parsed = ConnectToken::from_hex(&token.to_hex()).unwrap();
    assert_eq!(parsed, token);
    assert_eq!(parsed.verify_node(&node, at_ms + 60_000, 300_000), Ok(()));
    assert_eq!(
        parsed.verify_node(&node, at_ms + 301_000, 300_000),
        Err(TokenError::Stale { skew_ms: -301_000 })
    );
    let other = NodeId([1; 16]);
    assert_eq!(
        parsed.verify_node(&other, at_ms, 300_000),
        Err(TokenError::WrongKey)
    );
    let mut forged = parsed;
    forged.at_ms += 1;
    assert_eq!(
        forged.verify_node(&node, at_ms, 300_000),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        ConnectToken::from_hex("not a token"),
        Err(TokenError::Malformed)
    );
}

#[test]
fn exits_keep_their_wire_indices_and_a_status_follows_its_index() {
    use ambient_core::Exit;
    let encoded: Vec<Vec<u8>> = [
        Exit::Ok,
        Exit::Trapped,
        Exit::OutOfFuel,
        Exit::TimedOut,
        Exit::OutOfMemory,
        Exit::Rejected,
        Exit::ExitStatus(3),
        Exit::ExitStatus(-1),
    ]
    .iter()
    .map(|e| postcard::to_stdvec(e).unwrap())
    .collect();
    // The status is a zigzag varint: 3 is 6, -1 is 1.
    let expected: [&[u8]; 8] = [&[0], &[1], &[2], &[3], &[4], &[5], &[6, 6], &[6, 1]];
    assert_eq!(encoded, expected);
}

#[test]
fn every_engine_has_a_pinned_wire_tag() {
    let tags: Vec<(&str, String)> = Engine::ALL
        .iter()
        .map(|e| (e.as_str(), hex(postcard::to_slice(e, &mut [0; 4]).unwrap())))
        .collect();
    assert_eq!(
        tags,
        [
            ("wasmtime", "00".to_owned()),
            ("wasmedge", "01".to_owned()),
            ("wasmtime-pulley", "02".to_owned()),
        ]
    );
}
