//! Task submissions as JSON (so any MQTT client can submit), validated into a [`TaskSpec`].

use ambient_core::{
    Abi, Digest, Engine, Limits, MAX_ENTRY_LEN, MAX_INPUT_BYTES, MAX_MODULE_BYTES, TaskId, sha3_256,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::{Requirements, Strategy};

/// Most replicas a task may ask for.
pub const MAX_REPLICAS: usize = 7;
/// Largest memory limit a task may ask for, in bytes (4 GiB, the wasm32 address space).
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
/// Smallest memory limit, in bytes (one WASM page).
pub const MIN_MEMORY_BYTES: u64 = 64 << 10;
/// Longest wall-clock limit a task may ask for, in milliseconds (10 minutes).
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// Largest fuel budget a task may ask for (10^12).
pub const MAX_FUEL: u64 = 1_000_000_000_000;

/// A submission as a client writes it (`ambient/v1/tasks/submit`). See the README for the schema.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// Optional id; the coordinator makes one when absent. Resubmitting an id is idempotent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Who pays; defaults to `anonymous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// sha3-256 (hex) of a module already published to `ambient/v1/modules/{hash}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// The module's bytes, base64, instead of `module`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_b64: Option<String>,
    /// `plain` (default) or `wasi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abi: Option<String>,
    /// Exported function to call for `plain` modules; default `run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// Input as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Input as base64, instead of `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_b64: Option<String>,
    /// Sandbox limits; each key optional (seed defaults: 512 MiB, 30 s, 10^10 fuel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsJson>,
    /// `weighted`, `round-robin`, `least-loaded` or `latency-aware`; default from the coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// `receipt`, `replicate:K` with K in 2..=7, or `target:E` with E an error rate
    /// (`target:1e-4`); default: the coordinator's (`verification.policy`, `target:1e-4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// Most the client will pay for this task, in µcredits; default unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fee: Option<u64>,
    /// Node requirements: `arch`, `engine`, `labels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires: Option<RequiresJson>,
}

/// Limits as JSON, each optional.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsJson {
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Wall-clock limit in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Fuel budget.
    pub fuel: Option<u64>,
}

/// Node requirements as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequiresJson {
    /// CPU architecture, e.g. `aarch64`.
    pub arch: Option<String>,
    /// `wasmtime` or `wasmedge`.
    pub engine: Option<String>,
    /// Labels the node must carry.
    #[serde(default)]
    pub labels: Vec<String>,
}

/// How a result is checked.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Policy {
    /// One node; its signature and hashes are checked (plus spot checks at the configured rate).
    Receipt,
    /// K distinct nodes; a strict majority must agree on output hash and fuel.
    Replicate(usize),
    /// As many nodes as it takes for the chance that the result is wrong to fall to this
    /// target, judged from each agreeing node's verified history (see the dispatcher's
    /// "Targeting an error rate"), plus spot checks at the configured rate.
    Target(f64),
}

/// The smallest error rate `target:ε` accepts: below it no pool of [`MAX_REPLICAS`] nodes
/// could ever show a result is that unlikely to be wrong.
pub const MIN_TARGET: f64 = 1e-12;

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Receipt => f.write_str("receipt"),
            Self::Replicate(k) => write!(f, "replicate:{k}"),
            Self::Target(e) => write!(f, "target:{e:e}"),
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "unknown verification policy {s:?}: use `receipt`, `replicate:K` with K from 2 \
                 to {MAX_REPLICAS}, or `target:E` with an error rate E from {MIN_TARGET:e} to \
                 below 1 (for example `target:1e-4`)"
            )
        };
        if s == "receipt" {
            return Ok(Self::Receipt);
        }
        if let Some(e) = s.strip_prefix("target:") {
            let e: f64 = e.parse().map_err(|_| bad())?;
            if !(MIN_TARGET..1.0).contains(&e) {
                return Err(bad());
            }
            return Ok(Self::Target(e));
        }
        let k: usize = s
            .strip_prefix("replicate:")
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        if !(2..=MAX_REPLICAS).contains(&k) {
            return Err(bad());
        }
        Ok(Self::Replicate(k))
    }
}

/// A validated task, ready to journal and dispatch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task's id.
    pub task_id: TaskId,
    /// The paying client.
    pub client: String,
    /// Module hash.
    pub module: Digest,
    /// Calling convention.
    pub abi: Abi,
    /// Entry point.
    pub entry: String,
    /// Input bytes.
    #[serde(with = "b64")]
    pub input: Vec<u8>,
    /// Limits.
    pub limits: Limits,
    /// Strategy, or `None` for the coordinator's default.
    pub strategy: Option<Strategy>,
    /// Verification policy.
    /// `None`: the coordinator's default ([`DispatchConfig::default_policy`](crate::DispatchConfig)).
    pub policy: Option<Policy>,
    /// Most the client pays, in µcredits.
    pub max_fee: Option<u64>,
    /// What a node must offer.
    pub requires: Requirements,
}

/// A submission that cannot be accepted: a code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    /// Stable machine-readable code (`bad_json`, `bad_module`, `unknown_module`, `bad_input`, `bad_limits`, `bad_strategy`, `bad_policy`, `bad_task_id`, `bad_requirements`).
    pub code: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

fn reject(code: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        code,
        message: message.into(),
    }
}

/// Most submissions one message may carry, as a JSON array.
pub const MAX_SUBMISSIONS_PER_MESSAGE: usize = 256;

/// The submissions in one message on `ambient/v1/tasks/submit`: the message itself when it is
/// not a JSON array (a lone submission, checked by [`parse`]), or each element of an array of
/// at most [`MAX_SUBMISSIONS_PER_MESSAGE`], unparsed. Sending many tasks this way takes one
/// MQTT message and one acknowledgement instead of one each.
///
/// # Errors
/// A `bad_json` [`Rejection`] for an array that is not valid JSON or holds more than
/// [`MAX_SUBMISSIONS_PER_MESSAGE`] elements (read no further than the one over the limit).
pub fn split(json: &[u8]) -> Result<Vec<&[u8]>, Rejection> {
    use serde::de::{Error as _, SeqAccess, Visitor};
    use serde_json::value::RawValue;

    struct Elements;
    impl<'de> Visitor<'de> for Elements {
        type Value = Vec<&'de [u8]>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(
                f,
                "an array of at most {MAX_SUBMISSIONS_PER_MESSAGE} submissions"
            )
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut each = Vec::new();
            while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                if each.len() == MAX_SUBMISSIONS_PER_MESSAGE {
                    return Err(A::Error::custom(format!(
                        "more than {MAX_SUBMISSIONS_PER_MESSAGE} submissions in one message; send the rest in another"
                    )));
                }
                each.push(raw.get().as_bytes());
            }
            Ok(each)
        }
    }

    if json.trim_ascii_start().first() != Some(&b'[') {
        return Ok(vec![json]);
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    serde::Deserializer::deserialize_seq(&mut de, Elements)
        .and_then(|each| de.end().map(|()| each))
        .map_err(|e| {
            reject(
                "bad_json",
                format!("a batch of submissions must be a JSON array of submission objects: {e}"),
            )
        })
}

/// A parsed submission, with an inline module if it carried one.
#[derive(Debug)]
pub struct Parsed {
    /// The task.
    pub spec: TaskSpec,
    /// Module bytes that came inline, already checked against `spec.module`.
    pub inline_module: Option<Vec<u8>>,
}

/// Parses and validates a submission. `known_module` says whether a module hash is stored;
/// `make_id` supplies an id when the client gave none.
///
/// # Errors
/// A [`Rejection`] naming the field, the value and what was expected.
pub fn parse(
    json: &[u8],
    known_module: impl Fn(&Digest) -> bool,
    make_id: impl FnOnce() -> TaskId,
) -> Result<Parsed, Rejection> {
    let sub: Submission = serde_json::from_slice(json).map_err(|e| {
        reject(
            "bad_json",
            format!("submission is not valid JSON for the task schema: {e}"),
        )
    })?;
    let task_id = match &sub.task_id {
        Some(id) => TaskId::new(id).ok_or_else(|| {
            reject(
                "bad_task_id",
                format!("task_id {id:?} must be 1 to 64 characters from A-Z a-z 0-9 . _ -"),
            )
        })?,
        None => make_id(),
    };
    let client = sub.client_id.clone().unwrap_or_else(|| "anonymous".into());
    if client.is_empty() || client.len() > 64 || client.contains(char::is_whitespace) {
        return Err(reject(
            "bad_client",
            format!("client_id {client:?} must be 1 to 64 characters without spaces"),
        ));
    }
    let (module, inline_module) = match (&sub.module, &sub.module_b64) {
        (_, Some(b64)) => {
            let bytes = B64
                .decode(b64)
                .map_err(|e| reject("bad_module", format!("module_b64 is not base64: {e}")))?;
            if bytes.len() > MAX_MODULE_BYTES {
                return Err(reject(
                    "bad_module",
                    format!(
                        "module is {} bytes, over the {MAX_MODULE_BYTES} byte limit",
                        bytes.len()
                    ),
                ));
            }
            let hash = sha3_256(&bytes);
            if let Some(named) = &sub.module
                && Digest::from_hex(named) != Some(hash)
            {
                return Err(reject(
                    "bad_module",
                    format!("module {named} does not match the sha3-256 of module_b64 ({hash})"),
                ));
            }
            (hash, Some(bytes))
        }
        (Some(hex), None) => {
            let hash = Digest::from_hex(hex).ok_or_else(|| {
                reject(
                    "bad_module",
                    format!("module {hex:?} is not a sha3-256 hex digest (64 hex characters)"),
                )
            })?;
            if !known_module(&hash) {
                return Err(reject(
                    "unknown_module",
                    format!(
                        "module {hash} is not known: publish its bytes to ambient/v1/modules/{hash} first, or send them as module_b64"
                    ),
                ));
            }
            (hash, None)
        }
        (None, None) => {
            return Err(reject(
                "bad_module",
                "a submission needs `module` (sha3-256 hex) or `module_b64`",
            ));
        }
    };
    let abi = match sub.abi.as_deref().unwrap_or("plain") {
        "plain" => Abi::Plain,
        "wasi" => Abi::Wasi,
        other => {
            return Err(reject(
                "bad_abi",
                format!("abi {other:?} is not `plain` or `wasi`"),
            ));
        }
    };
    let entry = sub.entry.clone().unwrap_or_else(|| "run".into());
    if entry.is_empty() || entry.len() > MAX_ENTRY_LEN {
        return Err(reject(
            "bad_entry",
            format!("entry {entry:?} must be 1 to {MAX_ENTRY_LEN} bytes"),
        ));
    }
    let input = match (&sub.input, &sub.input_b64) {
        (Some(_), Some(_)) => {
            return Err(reject("bad_input", "give `input` or `input_b64`, not both"));
        }
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(b64)) => B64
            .decode(b64)
            .map_err(|e| reject("bad_input", format!("input_b64 is not base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    if input.len() > MAX_INPUT_BYTES {
        return Err(reject(
            "bad_input",
            format!(
                "input is {} bytes, over the {MAX_INPUT_BYTES} byte limit",
                input.len()
            ),
        ));
    }
    let limits = validate_limits(sub.limits.unwrap_or_default())?;
    let strategy = sub
        .strategy
        .as_deref()
        .map(|s| {
            s.parse::<Strategy>()
                .map_err(|e| reject("bad_strategy", e.to_string()))
        })
        .transpose()?;
    let policy = sub
        .verify
        .as_deref()
        .map(str::parse::<Policy>)
        .transpose()
        .map_err(|e| reject("bad_policy", e))?;
    let req = sub.requires.clone().unwrap_or_default();
    let engine = match req.engine.as_deref() {
        None => None,
        Some(name) => Some(Engine::from_name(name).ok_or_else(|| {
            reject(
                "bad_requirements",
                format!(
                    "engine {name:?} is not `wasmtime`, `wasmedge` or `wasmtime-pulley` \
                     (`wasmtime` also runs on Pulley nodes)"
                ),
            )
        })?),
    };
    let requires = Requirements {
        memory_bytes: limits.memory_bytes,
        engine,
        arch: req.arch,
        labels: req.labels,
        fuel: 0,
    };
    Ok(Parsed {
        spec: TaskSpec {
            task_id,
            client,
            module,
            abi,
            entry,
            input,
            limits,
            strategy,
            policy,
            max_fee: sub.max_fee,
            requires,
        },
        inline_module,
    })
}

fn validate_limits(raw: LimitsJson) -> Result<Limits, Rejection> {
    let d = Limits::default();
    let limits = Limits {
        memory_bytes: raw.memory_bytes.unwrap_or(d.memory_bytes),
        timeout_ms: raw.timeout_ms.unwrap_or(d.timeout_ms),
        fuel: raw.fuel.unwrap_or(d.fuel),
    };
    if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&limits.memory_bytes) {
        return Err(reject(
            "bad_limits",
            format!(
                "limits.memory_bytes {} must be between {MIN_MEMORY_BYTES} and {MAX_MEMORY_BYTES}",
                limits.memory_bytes
            ),
        ));
    }
    if !(1..=MAX_TIMEOUT_MS).contains(&limits.timeout_ms) {
        return Err(reject(
            "bad_limits",
            format!(
                "limits.timeout_ms {} must be between 1 and {MAX_TIMEOUT_MS}",
                limits.timeout_ms
            ),
        ));
    }
    if !(1..=MAX_FUEL).contains(&limits.fuel) {
        return Err(reject(
            "bad_limits",
            format!(
                "limits.fuel {} must be between 1 and {MAX_FUEL}",
                limits.fuel
            ),
        ));
    }
    Ok(limits)
}

/// serde for byte vectors as base64 strings.
pub(crate) mod b64 {
    use super::B64;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> TaskId {
        TaskId::new("generated").unwrap()
    }

    #[test]
    fn a_minimal_submission_gets_the_seed_defaults() {
        let json = br#"{"module_b64":"AGFzbQEAAAA=","input":"hi"}"#;
        let p = parse(json, |_| false, id).unwrap();
        assert_eq!(p.spec.limits, Limits::default());
        assert_eq!(p.spec.policy, None, "the coordinator's default");
        assert_eq!(p.spec.entry, "run");
        assert_eq!(p.spec.input, b"hi");
        assert_eq!(p.spec.module, sha3_256(b"\0asm\x01\0\0\0"));
    }

    #[test]
    fn malformed_json_is_rejected_with_a_code() {
        assert_eq!(parse(b"{nope", |_| true, id).unwrap_err().code, "bad_json");
        assert_eq!(
            parse(br#"{"module":"00","colour":1}"#, |_| true, id)
                .unwrap_err()
                .code,
            "bad_json"
        );
    }

    #[test]
    fn an_unknown_module_hash_is_rejected_with_what_to_do() {
        let json = format!(r#"{{"module":"{}"}}"#, "ab".repeat(32));
        let r = parse(json.as_bytes(), |_| false, id).unwrap_err();
        assert_eq!(r.code, "unknown_module");
        assert!(r.message.contains("ambient/v1/modules/"));
    }

    #[test]
    fn impossible_limits_are_rejected() {
        for limits in [
            r#"{"fuel":0}"#,
            r#"{"memory_bytes":1}"#,
            r#"{"timeout_ms":99999999}"#,
        ] {
            let json = format!(r#"{{"module_b64":"AGFzbQEAAAA=","limits":{limits}}}"#);
            assert_eq!(
                parse(json.as_bytes(), |_| true, id).unwrap_err().code,
                "bad_limits",
                "{limits}"
            );
        }
    }

    #[test]
    fn an_unknown_strategy_or_policy_is_rejected() {
        let s = parse(
            br#"{"module_b64":"AGFzbQEAAAA=","strategy":"fastest"}"#,
            |_| true,
            id,
        )
        .unwrap_err();
        assert_eq!(s.code, "bad_strategy");
        let p = parse(
            br#"{"module_b64":"AGFzbQEAAAA=","verify":"replicate:9"}"#,
            |_| true,
            id,
        )
        .unwrap_err();
        assert_eq!(p.code, "bad_policy");
        assert_eq!("replicate:3".parse::<Policy>(), Ok(Policy::Replicate(3)));
    }

    #[test]
    fn an_engine_requirement_names_one_of_the_engines_or_is_rejected_listing_them() {
        let with = |engine: &str| {
            let json =
                format!(r#"{{"module_b64":"AGFzbQEAAAA=","requires":{{"engine":"{engine}"}}}}"#);
            parse(json.as_bytes(), |_| true, id).map(|p| p.spec.requires.engine)
        };
        for engine in Engine::ALL {
            assert_eq!(with(engine.as_str()).unwrap(), Some(engine));
        }
        let e = with("v8").unwrap_err();
        assert_eq!(e.code, "bad_requirements");
        assert!(e.message.contains("wasmtime-pulley"), "{}", e.message);
    }

    #[test]
    fn an_error_rate_target_reads_and_prints_the_same_and_refuses_rates_it_cannot_reach() {
        let p: Policy = "target:1e-4".parse().unwrap();
        assert_eq!(p, Policy::Target(1e-4));
        assert_eq!(p.to_string(), "target:1e-4");
        assert_eq!("target:0.002".parse::<Policy>(), Ok(Policy::Target(2e-3)));
        for bad in [
            "target:",
            "target:1",
            "target:0",
            "target:-1e-3",
            "target:1e-13",
            "target:NaN",
            "target:x",
        ] {
            let e = bad.parse::<Policy>().unwrap_err();
            assert!(e.contains("`target:E`"), "{bad}: {e}");
        }
    }

    #[test]
    fn oversize_input_is_rejected() {
        let big = "a".repeat(MAX_INPUT_BYTES + 1);
        let json = serde_json::json!({"module_b64": "AGFzbQEAAAA=", "input": big}).to_string();
        assert_eq!(
            parse(json.as_bytes(), |_| true, id).unwrap_err().code,
            "bad_input"
        );
    }

    #[test]
    fn a_named_module_must_match_its_inline_bytes() {
        let json = format!(
            r#"{{"module":"{}","module_b64":"AGFzbQEAAAA="}}"#,
            "00".repeat(32)
        );
        assert_eq!(
            parse(json.as_bytes(), |_| true, id).unwrap_err().code,
            "bad_module"
        );
    }
}
