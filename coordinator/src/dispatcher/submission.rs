//! Intake: a submission's JSON to a journaled job (or a `rejected` event), idempotent
//! resubmission and conflicts, module uploads.

use super::*;

/// What resubmissions are compared by: the sha3-256 of the validated submission's JSON as
/// journaled, with a policy left to the coordinator (`"policy":null`) counted as `receipt`.
/// Journals written before the default became configurable recorded a submission with no
/// `verify` as `receipt`, and resubmitting it unchanged must still find it (so `receipt` named
/// and no `verify` count as the same submission). The key cannot occur inside a string value:
/// JSON escapes the quotes there.
pub(super) fn fingerprint(spec_json: &str) -> Digest {
    const LEFT: &str = r#""policy":null"#;
    match spec_json.split_once(LEFT) {
        Some((head, tail)) => sha3_256(format!(r#"{head}"policy":"Receipt"{tail}"#).as_bytes()),
        None => sha3_256(spec_json.as_bytes()),
    }
}

/// Publishes a `rejected` event on [`topics::REJECTED`], and on the task's own result topic
/// when a valid task id could be read.
pub(super) fn reject(id: Option<String>, code: &str, message: String, fx: &mut Effects) {
    let valid = id.as_deref().and_then(TaskId::new);
    let json = TaskEvent::new(id.unwrap_or_default(), EventStatus::Rejected)
        .with_error(code, message)
        .to_json();
    if let Some(id) = valid {
        fx.event(&id, json.clone());
    }
    fx.events.push(Publish::reliable(topics::REJECTED, json));
}

pub(super) fn generated_id(unix_ms: u64, n: u64) -> TaskId {
    let text = format!("t{unix_ms}-{n}");
    TaskId::new(&text).unwrap_or_else(|| TaskId::new("t").expect("static id is valid"))
}

/// The task id a submission names, read as far as the submission allows: from valid JSON, or
/// by scanning malformed JSON for `"task_id": "..."`, so a client can still be told.
pub(super) fn submission_id(json: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) {
        return v.get("task_id")?.as_str().map(str::to_owned);
    }
    let text = String::from_utf8_lossy(json);
    let rest = &text[text.find("\"task_id\"")? + "\"task_id\"".len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let id = &rest[..rest.find('"')?];
    TaskId::new(id).map(|_| id.to_owned())
}

impl Dispatcher {
    pub(super) fn on_submission(
        &mut self,
        now: Now,
        json: &[u8],
        journal: &impl Journal,
        fx: &mut Effects,
    ) {
        let next = &mut self.next_id;
        let (modules, refused) = (&self.modules, &self.refused_modules);
        let parsed = intake::parse(
            json,
            |h| modules.contains_key(h) || refused.get(h).is_some(),
            || {
                *next += 1;
                generated_id(now.unix_ms, *next)
            },
        );
        let p = match parsed {
            Ok(p) => p,
            Err(r) => {
                debug!(code = r.code, "submission rejected: {}", r.message);
                reject(submission_id(json), r.code, r.message, fx);
                return;
            }
        };
        // A module that cannot run this call is refused here, free of charge.
        let inspected = match self.check_module(&p.spec, p.inline_module.as_deref()) {
            Ok(info) => info,
            Err(e) => {
                let id = p.spec.task_id.as_str().to_owned();
                debug!(task = %id, error = %e, "submission rejected: module cannot run");
                reject(Some(id), "bad_module", e.to_string(), fx);
                return;
            }
        };
        let spec_json = serde_json::to_string(&p.spec).unwrap_or_default();
        let submitted = fingerprint(&spec_json);
        let id = p.spec.task_id.clone();
        // Seen before? Running here, finished in this turn, or in the journal.
        let earlier: Option<(Digest, Option<String>)> = if let Some(job) = self.jobs.get(&id) {
            Some((job.fingerprint, None))
        } else if let Some((fp, at)) = fx.finished.get(&id) {
            let result = match &fx.journal[*at] {
                Op::Finish { result_json, .. } => Some(result_json.clone()),
                _ => None,
            };
            Some((*fp, result))
        } else {
            match journal.known(&id) {
                Ok(known) => known.map(|k| (fingerprint(&k.spec_json), k.result_json)),
                Err(e) => {
                    // Not journaled, so not acknowledged as accepted: the client resubmits.
                    warn!(task = %id, error = %e, "journal lookup failed; rejecting");
                    let message =
                        format!("the coordinator could not read its journal ({e}); resubmit later");
                    reject(Some(id.as_str().into()), "journal_unavailable", message, fx);
                    return;
                }
            }
        };
        if let Some((earlier_fp, result)) = earlier {
            if earlier_fp != submitted {
                let message = format!(
                    "task_id {id} was already submitted with different content; choose a new task_id"
                );
                reject(Some(id.as_str().into()), "conflict", message, fx);
                return;
            }
            // Idempotent resubmission: answer with where the first copy stands.
            fx.event(
                &id,
                TaskEvent::new(id.as_str(), EventStatus::Accepted).to_json(),
            );
            if let Some(result) = result {
                fx.event(&id, result.into_bytes());
            }
            return;
        }
        if let Some(bytes) = p.inline_module
            && self.modules.insert(p.spec.module, inspected).is_none()
        {
            fx.dispatch.push(Publish {
                topic: topics::module(&p.spec.module).to_string(),
                payload: bytes.clone(),
                retain: true,
                reliable: true,
            });
            fx.journal.push(Op::PutModule {
                hash: p.spec.module,
                bytes,
            });
        }
        fx.journal.push(Op::Insert(NewTask {
            task_id: id.clone(),
            client: p.spec.client.clone(),
            spec_json,
            submitted_ms: now.unix_ms,
        }));
        fx.event(
            &id,
            TaskEvent::new(id.as_str(), EventStatus::Accepted).to_json(),
        );
        let job = self.new_job(p.spec, submitted, now.at);
        self.jobs.insert(id.clone(), job);
        self.pump(now, &id, fx);
    }

    /// Whether the call `spec` asks for can run its module, by the module's inspection:
    /// remembered, or made now from `inline` bytes not seen before (returned, to be kept with
    /// the module). A module recovered from the journal is not inspected here; the agent does.
    pub(super) fn check_module(
        &mut self,
        spec: &TaskSpec,
        inline: Option<&[u8]>,
    ) -> Result<Option<ModuleInfo>, ModuleError> {
        if let Some(e) = self.refused_modules.get(&spec.module) {
            return Err(e.clone());
        }
        let (info, fresh) = match (self.modules.get(&spec.module), inline) {
            (Some(info), _) => (info.clone(), false),
            (None, Some(bytes)) => match ambient_core::inspect(bytes) {
                Ok(info) => (Some(info), true),
                Err(e) => {
                    self.refused_modules.remember(spec.module, e.clone());
                    return Err(e);
                }
            },
            (None, None) => (None, false),
        };
        if let Some(info) = &info {
            info.check_call(spec.abi, &spec.entry)?;
        }
        Ok(if fresh { info } else { None })
    }

    pub(super) fn on_module(&mut self, hash: Digest, bytes: &[u8], fx: &mut Effects) {
        if bytes.is_empty()
            || self.modules.contains_key(&hash)
            || self.refused_modules.get(&hash).is_some()
        {
            return;
        }
        if sha3_256(bytes) != hash {
            self.dropped.bad_modules += 1;
            warn!(module = %hash, "module upload does not match its topic's hash; ignored");
            return;
        }
        match ambient_core::inspect(bytes) {
            Ok(info) => {
                self.modules.insert(hash, Some(info));
            }
            Err(e) => {
                self.dropped.bad_modules += 1;
                warn!(module = %hash, error = %e, "module upload refused");
                self.refused_modules.remember(hash, e);
                return;
            }
        }
        fx.journal.push(Op::PutModule {
            hash,
            bytes: bytes.to_vec(),
        });
    }

    pub(super) fn new_job(&mut self, mut spec: TaskSpec, fingerprint: Digest, now: Instant) -> Job {
        use rand::Rng;
        // Placement's view of the task's size; not journaled, so set for recovered tasks too.
        spec.requires.fuel = spec.limits.fuel;
        let policy = spec.policy.unwrap_or(self.config.default_policy);
        let (replicas, spot_check) = match policy {
            Policy::Replicate(k) => (k, false),
            Policy::Receipt | Policy::Target(_) => {
                let spot = self.rng.random_range(0..1000) < self.config.spot_check_permille;
                (if spot { 2 } else { 1 }, spot)
            }
        };
        Job {
            input_hash: sha3_256(&spec.input),
            policy,
            spec: Arc::new(spec),
            fingerprint,
            submitted: now,
            replicas,
            spot_check,
            spot_missed: None,
            next_attempt: 1,
            failures: 0,
            errors: Vec::new(),
            outstanding: Vec::new(),
            votes: Vec::new(),
            barred: Vec::new(),
            avoided: Vec::new(),
            queued_since: None,
            provisional: None,
            ticket: 0,
        }
    }
}
