//! Reports to verdicts: authenticating a report, tallying votes against the task's policy,
//! escalating contested votes, comparing late replicas, and ending a task (settlement and its
//! final event). See "Targeting an error rate", "Contested votes" and "Results found suspect
//! later" in the parent module's docs.

use super::*;

/// Replicas of a finished task kept for comparison: at most this many tasks.
pub(super) const MAX_LATE: usize = 4_096;

/// Results accepted on one node's receipt alone, remembered so that their clients can be told
/// if the node is caught later (see "Results found suspect later"); the oldest are forgotten.
pub(super) const MAX_UNCHECKED: usize = 65_536;

/// The last [`MAX_UNCHECKED`] tasks whose accepted result rested on one node alone.
#[derive(Default)]
pub(super) struct Unchecked(VecDeque<(NodeId, TaskId)>);

impl Unchecked {
    fn remember(&mut self, node: NodeId, task: TaskId) {
        if self.0.len() == MAX_UNCHECKED {
            self.0.pop_front();
        }
        self.0.push_back((node, task));
    }

    /// `node` was shown to return wrong results: a notice for each result that rested on it.
    /// O([`MAX_UNCHECKED`]), once per dispute.
    fn caught(&mut self, node: NodeId, fx: &mut Effects) {
        let mut suspect = Vec::new();
        self.0.retain(|(n, task)| {
            let keep = *n != node;
            if !keep {
                suspect.push(task.clone());
            }
            keep
        });
        for task in suspect {
            let notice = Notice {
                task_id: task.to_string(),
                code: "suspect_result".into(),
                node: node.to_hex().to_string(),
                message: format!(
                    "the accepted result rested on node {node} alone, and that node has since \
                     returned a wrong result; submit the task again under a new id to be sure"
                ),
            };
            let json = serde_json::to_vec(&notice).unwrap_or_default();
            fx.events.push(Publish::reliable(topics::NOTICES, json));
        }
    }
}

/// An accepted task's replicas that were still running when it was accepted.
pub(super) struct Late {
    spec: Arc<TaskSpec>,
    input_hash: Digest,
    accepted: (Digest, u64, Exit),
    /// Every vote so far, the late ones included, to decide whether a late dissent is
    /// outvoted decisively.
    votes: Vec<(Digest, u64, Exit)>,
    /// The nodes that voted or were asked to: how many more could vote is counted besides.
    voters: Vec<NodeId>,
    outstanding: Vec<Dispatch>,
    /// When none of them can report any more.
    expires: Instant,
}

impl Late {
    /// What its replicas run: the task's spec and input hash.
    pub(super) fn order(&self) -> (&TaskSpec, &Digest) {
        (&self.spec, &self.input_hash)
    }
}

/// Which of `outstanding` `report` answers; `None`, counted as stale, when none (a replay, a
/// duplicate, an attempt given up on).
pub(super) fn answered(
    outstanding: &[Dispatch],
    report: &Report<'_>,
    dropped: &mut Dropped,
) -> Option<usize> {
    let pos = outstanding
        .iter()
        .position(|d| d.attempt == report.attempt && d.node == report.node);
    if pos.is_none() {
        dropped.stale_reports += 1;
        debug!(task = %report.task_id, attempt = report.attempt, node = %report.node, "report for an attempt not outstanding dropped");
    }
    pos
}

/// Authenticates a report against its task: `Err` when it does not prove it comes from the
/// node it names for that attempt (never held against the node), `Ok(Some(e))` when the node
/// signed a receipt whose claims are false (a dispute), `Ok(None)` when it holds.
pub(super) fn authenticate(
    registry: &Registry,
    report: &Report<'_>,
    signed_by: Option<Checked>,
    spec: &TaskSpec,
    input_hash: Digest,
) -> Result<Option<ambient_core::VerifyError>, String> {
    let node = report.node;
    match (&report.body, registry.public_key(&node)) {
        (_, None) => Err("the node is not registered".to_owned()),
        (ReportBody::Refused(r), Some(key)) => r
            .verify(key, &report.task_id, report.attempt, &node)
            .map(|()| None)
            .map_err(|e| format!("refusal signature: {e}")),
        (
            ReportBody::Executed {
                receipt, output, ..
            },
            Some(key),
        ) => {
            let expected = Expected {
                task_id: &spec.task_id,
                attempt: report.attempt,
                node,
                public_key: key,
                module: spec.module,
                input: input_hash,
                limits: spec.limits,
            };
            // Its signature already checked under the registered key, beside the socket.
            let verified = if signed_by.is_some_and(|c| c.vouches(key, receipt)) {
                verify_receipt_claims(receipt, output, &expected)
            } else {
                verify_receipt(receipt, output, &expected)
            };
            match verified {
                Err(e) if !e.is_attributable() => Err(e.to_string()),
                other => Ok(other.err()),
            }
        }
    }
}

/// How many nodes could vote on a task: the `votes` cast, the replicas still `running`, and
/// every other node able to run it (`voters`: the nodes that voted, run it or may not run it
/// again). O(n): only when replicas disagree.
pub(super) fn electorate(
    registry: &Registry,
    now: Instant,
    spec: &TaskSpec,
    (votes, running): (usize, usize),
    voters: &[NodeId],
) -> usize {
    votes + running + registry.able(now, &spec.requires, voters)
}

/// The chance that the result `key` is wrong, from the doubt of each node that returned it and
/// of each that returned something else ([`result_doubt`]).
pub(super) fn doubt_of(registry: &Registry, votes: &[Vote], key: (Digest, u64, Exit)) -> f64 {
    let doubt = |v: &Vote| registry.doubt(&v.node);
    let (agreeing, dissenting): (Vec<&Vote>, Vec<&Vote>) = votes.iter().partition(|v| v.key == key);
    result_doubt(
        agreeing.into_iter().map(doubt),
        dissenting.into_iter().map(doubt),
    )
}

impl Dispatcher {
    pub(super) fn on_report(
        &mut self,
        now: Now,
        report: Report<'_>,
        signed_by: Option<Checked>,
        fx: &mut Effects,
    ) {
        let node = report.node;
        let Some(job) = self.jobs.get_mut(&report.task_id) else {
            self.on_late_report(now, &report, signed_by, fx);
            return;
        };
        let Some(pos) = answered(&job.outstanding, &report, &mut self.dropped) else {
            return;
        };
        // Authenticate before anything changes: a frame anyone on the broker could have sent
        // must neither cancel the attempt nor count against the node it names.
        let verdict = authenticate(
            &self.registry,
            &report,
            signed_by,
            &job.spec,
            job.input_hash,
        );
        let disputed = match verdict {
            Ok(disputed) => disputed,
            Err(why) => {
                self.dropped.unauthenticated += 1;
                debug!(task = %report.task_id, attempt = report.attempt, %node, %why, "unauthenticated report dropped");
                return;
            }
        };
        let sent = job.outstanding.swap_remove(pos).sent;
        self.registry.task_finished(&node);
        let task_id = report.task_id.clone();
        match report.body {
            ReportBody::Refused(SignedRefusal {
                refusal: Refusal::Busy | Refusal::Breaker(_) | Refusal::ShuttingDown,
                ..
            }) => {
                // Not the task's failure: the node is full, unwell or leaving, which the registry
                // did not know yet. It rests until its next report or sample, and the task goes
                // elsewhere or waits in the queue (whose timeout still ends it).
                self.registry.rest(&node);
                job.avoided.push(node);
                self.pump(now, &task_id, fx);
            }
            ReportBody::Refused(SignedRefusal { refusal, .. }) => {
                let why = match refusal {
                    Refusal::Breaker(r) => format!("node {node} refused: breaker open ({r})"),
                    Refusal::Busy => format!("node {node} refused: busy"),
                    Refusal::ModuleUnavailable => {
                        format!("node {node} could not fetch module {}", job.spec.module)
                    }
                    Refusal::ShuttingDown => format!("node {node} is shutting down"),
                };
                if refusal == Refusal::ModuleUnavailable {
                    // The broker may have lost its retained copy (restart): publish it again.
                    fx.modules.push(job.spec.module);
                }
                job.avoided.push(node);
                self.fail_attempt(now, &task_id, why, fx);
            }
            ReportBody::Executed {
                receipt,
                output,
                message,
            } => {
                if let Some(e) = disputed {
                    self.dropped.bad_receipts += 1;
                    warn!(task = %task_id, %node, error = %e, "receipt rejected");
                    job.barred.push(node);
                    self.registry.record(now.at, &node, Outcome::Disputed);
                    self.unchecked.caught(node, fx);
                    self.fail_attempt(
                        now,
                        &task_id,
                        format!("node {node} sent a receipt that does not verify: {e}"),
                        fx,
                    );
                    return;
                }
                self.registry.touch(now.at, node);
                let exit = receipt.receipt.exit;
                if exit == Exit::TimedOut {
                    // Wall-clock limits are not deterministic: another node may finish in time.
                    job.avoided.push(node);
                    self.registry.record(now.at, &node, Outcome::Failed);
                    self.fail_attempt(
                        now,
                        &task_id,
                        format!("timed out on node {node}: {message}"),
                        fx,
                    );
                    return;
                }
                self.registry.record(now.at, &node, Outcome::Completed);
                job.barred.push(node);
                let key = (receipt.receipt.output, receipt.receipt.fuel_used, exit);
                job.votes.push(Vote {
                    node,
                    elapsed: sent.map(|sent| now.at.saturating_duration_since(sent)),
                    key,
                    output: output.to_vec(),
                    receipt,
                    message: message.to_string(),
                });
                self.tally(now, &task_id, fx);
            }
        }
    }

    /// A report for a task that is no longer running: stale, unless it answers a replica
    /// still outstanding when the task was accepted. Those are compared with the accepted
    /// result when they come: agreeing counts as verified for the node, disagreeing as a
    /// dispute when the accepted result still leads decisively (see "Contested votes"). The
    /// accepted result stands either way: it had its majority.
    pub(super) fn on_late_report(
        &mut self,
        now: Now,
        report: &Report<'_>,
        signed_by: Option<Checked>,
        fx: &mut Effects,
    ) {
        let node = report.node;
        let Some(late) = self.late.get_mut(&report.task_id) else {
            self.dropped.stale_reports += 1;
            debug!(task = %report.task_id, %node, "report for a finished or unknown task dropped");
            return;
        };
        let Some(pos) = answered(&late.outstanding, report, &mut self.dropped) else {
            return;
        };
        let authenticated = authenticate(
            &self.registry,
            report,
            signed_by,
            &late.spec,
            late.input_hash,
        );
        let disputed = match authenticated {
            Ok(disputed) => disputed,
            Err(why) => {
                self.dropped.unauthenticated += 1;
                debug!(task = %report.task_id, attempt = report.attempt, %node, %why, "unauthenticated late report dropped");
                return;
            }
        };
        late.outstanding.swap_remove(pos);
        let accepted = late.accepted;
        let ReportBody::Executed { receipt, .. } = &report.body else {
            if late.outstanding.is_empty() {
                self.late.remove(&report.task_id);
            }
            return;
        };
        let key = (
            receipt.receipt.output,
            receipt.receipt.fuel_used,
            receipt.receipt.exit,
        );
        let dissents = disputed.is_none() && key.2 != Exit::TimedOut && key != accepted;
        if disputed.is_none() && key.2 != Exit::TimedOut {
            late.votes.push(key);
        }
        // A dissent is outvoted when the votes, its own included, still decide for the
        // accepted result as a running task's would (see "Contested votes").
        let decisive = dissents && {
            let pool = electorate(
                &self.registry,
                now.at,
                &late.spec,
                (late.votes.len(), late.outstanding.len()),
                &late.voters,
            );
            matches!(
                quorum(&late.votes, late.votes.len(), pool),
                Quorum::Accepted { index, .. } if late.votes[index] == accepted
            )
        };
        if late.outstanding.is_empty() {
            self.late.remove(&report.task_id);
        }
        let outcome = if let Some(e) = disputed {
            self.dropped.bad_receipts += 1;
            warn!(task = %report.task_id, %node, error = %e, "late receipt rejected");
            Outcome::Disputed
        } else if key.2 == Exit::TimedOut {
            Outcome::Failed
        } else if key == accepted {
            Outcome::Agreed
        } else if decisive {
            warn!(task = %report.task_id, %node, "a late replica disagrees with the accepted result; disputed");
            Outcome::Disputed
        } else {
            // Outvoted by less than the contested lead: as likely the honest one as a liar.
            info!(task = %report.task_id, %node, "a late replica disagrees with a narrow majority; not disputed");
            self.registry.touch(now.at, node);
            return;
        };
        self.registry.touch(now.at, node);
        self.registry.record(now.at, &node, outcome);
        if outcome == Outcome::Disputed {
            self.unchecked.caught(node, fx);
        }
    }

    /// Forgets replicas of finished tasks that can no longer report, and the oldest past
    /// [`MAX_LATE`].
    pub(super) fn expire_late(&mut self, now: Instant) {
        while let Some(id) = self.late_order.front() {
            let expired = self
                .late
                .get(id)
                .is_none_or(|l| l.expires <= now || self.late.len() > MAX_LATE);
            if !expired {
                break;
            }
            let id = self.late_order.pop_front().expect("front exists");
            self.late.remove(&id);
        }
    }

    pub(super) fn tally(&mut self, now: Now, task_id: &TaskId, fx: &mut Effects) {
        let Some(job) = self.jobs.get_mut(task_id) else {
            return;
        };
        let keys: Vec<_> = job.votes.iter().map(|v| v.key).collect();
        job.provisional = None;
        let mut verdict = quorum(&keys, job.replicas, usize::MAX);
        let mut pool = usize::MAX;
        if matches!(verdict, Quorum::Split { .. }) {
            // Only a disagreement depends on how many nodes could still vote (O(n)).
            let mut voters: Vec<NodeId> = job.outstanding.iter().map(|d| d.node).collect();
            voters.extend_from_slice(&job.barred);
            pool = electorate(
                &self.registry,
                now.at,
                &job.spec,
                (keys.len(), job.outstanding.len()),
                &voters,
            );
            verdict = quorum(&keys, job.replicas, pool);
        }
        match verdict {
            Quorum::Accepted { index, .. } => {
                let Policy::Target(target) = job.policy else {
                    return self.finish(now, task_id, Some(keys[index]), fx);
                };
                if doubt_of(&self.registry, &job.votes, keys[index]) <= target {
                    return self.finish(now, task_id, Some(keys[index]), fx);
                }
                job.provisional = Some(keys[index]);
                if !job.outstanding.is_empty() {
                    return; // a replica still running may add its agreement
                }
                // Not yet as sure as the target: one more replica, while the pool may have
                // one. The result stands if none can be had after all (see `Job::standing`).
                let voters = &job.barred;
                let more = keys.len() < MAX_REPLICAS
                    && self.registry.any_ready(now.at, &job.spec.requires, voters);
                if more {
                    job.replicas = keys.len() + 1;
                    self.pump(now, task_id, fx);
                } else {
                    self.finish(now, task_id, Some(keys[index]), fx);
                }
            }
            Quorum::Pending => self.pump(now, task_id, fx),
            Quorum::Split { decidable_at } if decidable_at <= MAX_REPLICAS => {
                // Disagreement escalates, at once, to as many replicas as could decide.
                job.replicas = decidable_at;
                info!(task = %task_id, replicas = job.replicas, "replicas disagree; escalating");
                self.pump(now, task_id, fx);
            }
            Quorum::Split { .. } | Quorum::Undecidable => {
                let n = job.votes.len();
                let why = if pool < MAX_REPLICAS {
                    format!(
                        "{n} replicas disagreed and no majority is possible: only {pool} \
                         nodes can run the task"
                    )
                } else {
                    format!(
                        "{n} replicas disagreed: no result can lead the others by \
                         {CONTESTED_LEAD} within {MAX_REPLICAS} replicas"
                    )
                };
                job.errors.push(why);
                self.finish(now, task_id, None, fx);
            }
        }
    }

    /// Ends a task: with the winning vote key settled and delivered, or failed.
    pub(super) fn finish(
        &mut self,
        now: Now,
        task_id: &TaskId,
        winner: Option<(Digest, u64, Exit)>,
        fx: &mut Effects,
    ) {
        let Some(mut job) = self.jobs.remove(task_id) else {
            return;
        };
        for d in &job.outstanding {
            self.registry.task_finished(&d.node);
        }
        if let Some(accepted) = winner
            && !job.outstanding.is_empty()
        {
            self.late.insert(
                task_id.clone(),
                Late {
                    spec: Arc::clone(&job.spec),
                    input_hash: job.input_hash,
                    accepted,
                    votes: job.votes.iter().map(|v| v.key).collect(),
                    voters: job
                        .barred
                        .iter()
                        .chain(job.outstanding.iter().map(|d| &d.node))
                        .copied()
                        .collect(),
                    outstanding: std::mem::take(&mut job.outstanding),
                    expires: self.deadline(&job, now.at),
                },
            );
            self.late_order.push_back(task_id.clone());
            self.expire_late(now.at);
        }
        let latency_ms = now.at.duration_since(job.submitted).as_secs_f64() * 1e3;
        let mut spot_check = None;
        let mut event = match winner {
            None => TaskEvent::new(task_id.as_str(), EventStatus::Failed)
                .with_error("no_verified_result", job.fail_reason()),
            Some(key) => {
                let error_bound = doubt_of(&self.registry, &job.votes, key);
                let winners: Vec<&Vote> = job.votes.iter().filter(|v| v.key == key).collect();
                let losers: Vec<&Vote> = job.votes.iter().filter(|v| v.key != key).collect();
                // Agreement between distinct nodes is what proves a node; a receipt alone
                // proves who ran what, not that the output is right.
                let agreed = if winners.len() >= 2 {
                    Outcome::Agreed
                } else {
                    Outcome::Verified
                };
                for v in &winners {
                    self.registry.record(now.at, &v.node, agreed);
                    // A run's time says how fast the node is once another node has confirmed
                    // its fuel (the vote key holds it); a receipt alone could claim any fuel.
                    if let (Outcome::Agreed, Exit::Ok, Some(elapsed)) = (agreed, key.2, v.elapsed) {
                        self.registry.observe_run(&v.node, key.1, elapsed);
                    }
                }
                for v in &losers {
                    self.registry.record(now.at, &v.node, Outcome::Disputed);
                    self.unchecked.caught(v.node, fx);
                }
                if let [alone] = winners.as_slice() {
                    self.unchecked.remember(alone.node, task_id.clone());
                    if self.registry.blacklisted(&alone.node) {
                        // Caught while this task was still running.
                        self.unchecked.caught(alone.node, fx);
                    }
                }
                let n = winners.len() as u64;
                // A module the nodes refused before running it cost no work: nothing is paid.
                let each = if key.2 == Exit::Rejected {
                    0
                } else {
                    self.config.tariff.reward(key.1)
                };
                let each = match job.spec.max_fee {
                    Some(max) if each.saturating_mul(n) > max => max / n,
                    _ => each,
                };
                let payees: Vec<(NodeId, u64)> = winners.iter().map(|v| (v.node, each)).collect();
                let reward = payees.iter().map(|(_, a)| a).sum::<u64>();
                if reward > 0 {
                    fx.journal.push(Op::Settle {
                        task_id: task_id.clone(),
                        client: job.spec.client.clone(),
                        payees,
                    });
                }
                let first = winners[0];
                let status = if key.2 == Exit::Ok {
                    EventStatus::Completed
                } else {
                    EventStatus::Failed
                };
                let mut ev = TaskEvent::new(task_id.as_str(), status);
                if status == EventStatus::Completed {
                    ev.output_b64 = Some(B64.encode(&first.output));
                } else {
                    ev = ev.with_error(key.2.as_str(), first.message.clone());
                }
                ev.exit = Some(key.2.as_str().into());
                ev.exit_status = key.2.status();
                ev.receipts = winners
                    .iter()
                    .map(|v| ReceiptJson::from(&v.receipt))
                    .collect();
                ev.nodes = winners
                    .iter()
                    .map(|v| v.node.to_hex().to_string())
                    .collect();
                ev.reward = Some(reward);
                let mut spot_check_missed = None;
                if job.spot_check {
                    spot_check = Some(if !losers.is_empty() {
                        SpotCheck::Disagreed
                    } else if winners.len() >= 2 {
                        SpotCheck::Agreed
                    } else {
                        spot_check_missed = Some(job.spot_missed.clone().unwrap_or_else(|| {
                            "the run it was checking was lost; the check's result stands alone"
                                .into()
                        }));
                        SpotCheck::Missed
                    });
                }
                ev.verdict = Some(Verdict {
                    policy: job.policy.to_string(),
                    replicas: job.replicas,
                    agreeing: winners.len(),
                    spot_checked: job.spot_check,
                    spot_check_missed,
                    error_bound: Some(error_bound),
                    disputed: losers.iter().map(|v| v.node.to_hex().to_string()).collect(),
                });
                ev
            }
        };
        event.latency_ms = Some(latency_ms);
        let status = if event.status == EventStatus::Completed {
            TaskStatus::Completed
        } else {
            TaskStatus::Failed
        };
        if job.spot_check && spot_check.is_none() {
            // The task failed: no result to check.
            spot_check = Some(SpotCheck::Missed);
        }
        fx.outcomes.push(Ended {
            status,
            latency_ms,
            spot_check,
        });
        let json = event.to_json();
        fx.finished
            .insert(task_id.clone(), (job.fingerprint, fx.journal.len()));
        fx.journal.push(Op::Finish {
            task_id: task_id.clone(),
            status,
            result_json: String::from_utf8_lossy(&json).into_owned(),
            at_ms: now.unix_ms,
        });
        fx.event(task_id, json);
    }
}
