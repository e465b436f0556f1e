//! Placing attempts: the queue of tasks waiting for an eligible node, retries after a failed
//! dispatch, dispatch deadlines and the tick that checks them, and the signed `Assign` frame.

use ambient_core::{LARGE_PADDING, MAX_BATCH, Probe};
use rand::Rng as _;

use super::*;
use crate::Probing;

/// The `Assign` frames of `batch`, the attempts placed on `node` in one turn, under one
/// signature by `identity`; `order` gives an attempt's task spec and input hash (`None` for a
/// task that ended within the turn and wants no further runs: that attempt is left out).
fn assignments<'j>(
    identity: &Identity,
    order: impl Fn(&TaskId) -> Option<(&'j TaskSpec, &'j Digest)>,
    node: NodeId,
    batch: &[(NodeId, TaskId, u16)],
    out: &mut Vec<Publish>,
) {
    let mut frames = Vec::with_capacity(batch.len());
    let mut claims = heapless::Vec::<Digest, MAX_BATCH>::new();
    for (_, task_id, attempt) in batch {
        let Some((spec, input_hash)) = order(task_id) else {
            continue;
        };
        let a = Assignment {
            task_id: spec.task_id.clone(),
            attempt: *attempt,
            module: spec.module,
            abi: spec.abi,
            entry: heapless::String::try_from(spec.entry.as_str()).unwrap_or_default(),
            limits: spec.limits,
            input: &spec.input,
            coordinator: [0; 32],
            batch: heapless::Vec::new(),
            signature: [0; 64],
        };
        // Every field of a claim is bounded, so it always encodes; `batch` holds at most
        // MAX_BATCH attempts.
        if let Ok(claim) = a.claim_digest(&node, input_hash) {
            let _ = claims.push(claim);
            frames.push(a);
        }
    }
    let topic = topics::node(&node, NodeTopic::Tasks);
    for mut a in frames {
        a.seal(identity, &claims);
        let frame = Envelope::new(Message::Assign(a)).to_vec();
        out.push(Publish::reliable(topic.as_str(), frame));
    }
}

/// Zeros for the padding of a bandwidth probe. The nonce comes after it on the wire, so the
/// padding need not be random for the node to need all of it before it can answer.
static PADDING: [u8; LARGE_PADDING] = [0; LARGE_PADDING];

/// The [`Probe`] frame for `p`, on the node's tasks topic, at QoS 0 (a lost probe is only a
/// missing sample).
fn probe(p: Probing) -> Publish {
    let probe = Probe {
        node: p.node,
        padding: &PADDING[..p.padding.min(LARGE_PADDING)],
        nonce: p.nonce,
    };
    Publish {
        topic: topics::node(&p.node, NodeTopic::Tasks).to_string(),
        payload: Envelope::new(Message::Probe(probe)).to_vec(),
        retain: false,
        reliable: false,
    }
}

impl Dispatcher {
    /// Signs the assignments placed since the last call, one signature for those of each node
    /// (at most [`MAX_BATCH`] a signature), and queues their frames in [`Effects::dispatch`].
    /// The service calls it after a turn's inputs (and after a tick's probes), before sending
    /// what may leave early, so one ed25519 signature here and one check on the node cover
    /// every task a turn places there. Until then, placed attempts are not in
    /// [`Effects::dispatch`]. A replica placed in a turn in which its task then finished is
    /// still sent: it runs as a late replica (see "Contested votes").
    pub fn seal(&self, fx: &mut Effects) {
        let mut placed = std::mem::take(&mut fx.assign);
        // Stable: each node's assignments keep the order they were placed in.
        placed.sort_by_key(|(node, ..)| *node);
        let order = |task_id: &TaskId| match self.jobs.get(task_id) {
            Some(job) => Some((&*job.spec, &job.input_hash)),
            None => self.late.get(task_id).map(Late::order),
        };
        for same_node in placed.chunk_by(|a, b| a.0 == b.0) {
            for batch in same_node.chunks(MAX_BATCH) {
                assignments(&self.identity, order, batch[0].0, batch, &mut fx.dispatch);
            }
        }
        placed.clear();
        fx.assign = placed;
    }

    pub(super) fn fail_attempt(
        &mut self,
        now: Now,
        task_id: &TaskId,
        why: String,
        fx: &mut Effects,
    ) {
        let Some(job) = self.jobs.get_mut(task_id) else {
            return;
        };
        debug!(task = %task_id, "{why}");
        job.failures += 1;
        job.errors.push(why);
        if job.failures > self.config.max_failures {
            // Failed checking runs do not undo the result they were checking.
            let verified = job.standing();
            if verified.is_some() {
                job.spot_missed = Some(format!("the checking runs failed: {}", job.fail_reason()));
            }
            self.finish(now, task_id, verified, fx);
        } else {
            self.pump(now, task_id, fx);
        }
    }

    pub(super) fn deadline(&self, job: &Job, now: Instant) -> Instant {
        now + Duration::from_millis(job.spec.limits.timeout_ms) + self.config.dispatch_grace
    }

    /// Places as many dispatches as the task still needs; queues it when no node is eligible.
    pub(super) fn pump(&mut self, now: Now, task_id: &TaskId, fx: &mut Effects) {
        let Some(job) = self.jobs.get(task_id) else {
            return;
        };
        let strategy = job.spec.strategy.unwrap_or(self.config.default_strategy);
        let deadline = self.deadline(job, now.at);
        loop {
            let Some(job) = self.jobs.get_mut(task_id) else {
                return;
            };
            if job.wanted() == 0 {
                break;
            }
            // Never a node already running or done with it; nodes that failed it only when
            // nothing else is eligible.
            let mut exclude: Vec<NodeId> = job.outstanding.iter().map(|d| d.node).collect();
            exclude.extend_from_slice(&job.barred);
            let strict_len = exclude.len();
            exclude.extend_from_slice(&job.avoided);
            let requires = &job.spec.requires;
            // A spot check of a verified receipt never goes back to a node that failed the
            // task: it would only fail again, and the receipt already stands. (A `target:E`
            // task's further replicas may: a node that was busy a moment ago is worth the
            // wait for the target.)
            let checking_only = job.spot_check && job.votes.len() == 1;
            // The first run goes where the strategy says; checks and further replicas to a
            // node drawn uniformly, so no node can steer who checks it (see "Colluders").
            let first = job.votes.is_empty() && job.outstanding.is_empty();
            let draw = rand::Rng::random::<u64>(&mut self.rng);
            let registry = &mut self.registry;
            let mut select = |exclude: &[NodeId]| {
                if first {
                    registry.select(now.at, requires, strategy, exclude)
                } else {
                    registry.select_uniform(now.at, requires, exclude, draw)
                }
            };
            let chosen = select(&exclude).or_else(|| {
                (!checking_only && exclude.len() > strict_len)
                    .then(|| select(&exclude[..strict_len]))?
            });
            let Some(node) = chosen else {
                // A spot check waits for a distinct free node like any task, unless no other
                // registered node could ever run it: then the verified receipt stands, and
                // the event says why it was not checked.
                if checking_only && job.outstanding.is_empty() {
                    let unable = &exclude[..];
                    if let Some(why) =
                        self.registry
                            .unmet_without(now.at, &job.spec.requires, unable)
                    {
                        job.spot_missed = Some(why);
                        let key = job.votes[0].key;
                        self.finish(now, task_id, Some(key), fx);
                        return;
                    }
                }
                self.enqueue(now.at, task_id);
                return;
            };
            // A node not yet proven (`receipt`), or whose results could be wrong more often
            // than the target (`target:ε`), runs no task unchecked: its first run is checked
            // on a second node (the next turn of this loop places it).
            let doubtful = match job.policy {
                Policy::Receipt => !self.registry.proven(&node),
                Policy::Target(target) => self.registry.doubt(&node) > target,
                Policy::Replicate(_) => false,
            };
            if doubtful && !job.spot_check && job.votes.is_empty() && job.outstanding.is_empty() {
                job.spot_check = true;
                job.replicas = 2;
            }
            let attempt = job.next_attempt;
            job.next_attempt = job.next_attempt.saturating_add(1);
            job.outstanding.push(Dispatch {
                attempt,
                node,
                sent: Some(now.at),
            });
            self.deadlines
                .push(Reverse((deadline, task_id.clone(), attempt)));
            self.registry.task_started(&node);
            fx.journal.push(Op::Dispatch {
                task_id: task_id.clone(),
                attempt,
                node,
                at_ms: now.unix_ms,
            });
            fx.assign.push((node, task_id.clone(), attempt));
        }
        if let Some(job) = self.jobs.get_mut(task_id) {
            job.queued_since = None;
        }
    }

    /// Marks a task as waiting for a node, from now unless it already waits.
    pub(super) fn enqueue(&mut self, now: Instant, task_id: &TaskId) {
        if let Some(job) = self.jobs.get_mut(task_id)
            && job.queued_since.is_none()
        {
            job.queued_since = Some(now);
            job.ticket = self.next_ticket;
            self.next_ticket += 1;
            let started = !job.votes.is_empty() || !job.outstanding.is_empty();
            self.queue[usize::from(!started)].push_back((job.ticket, task_id.clone()));
        }
    }

    /// Tries to place queued tasks, those already started first, then oldest first, while some
    /// node has a free slot. A task
    /// whose requirements no free node meets is passed over, not waited on, so it cannot hold
    /// up the ones behind it.
    ///
    /// Cost: the tasks examined, not the queue's length; this runs on every report and sample,
    /// and the queue holds a whole batch while the nodes are saturated.
    pub(super) fn pump_queue(&mut self, now: Now, fx: &mut Effects) {
        for q in 0..self.queue.len() {
            let mut passed_over = Vec::new();
            while self.registry.available() > 0 {
                let Some(entry) = self.queue[q].pop_front() else {
                    break;
                };
                if !self.is_live(&entry) {
                    continue;
                }
                self.pump(now, &entry.1, fx);
                // Still waiting under the same ticket: it keeps its place.
                if self.is_live(&entry) {
                    passed_over.push(entry);
                }
            }
            for entry in passed_over.into_iter().rev() {
                self.queue[q].push_front(entry);
            }
        }
    }

    /// Whether a queue entry is its task's current one.
    pub(super) fn is_live(&self, (ticket, id): &(u64, TaskId)) -> bool {
        self.jobs
            .get(id)
            .is_some_and(|j| j.queued_since.is_some() && j.ticket == *ticket)
    }

    pub(super) fn reassign_from(&mut self, now: Now, node: NodeId, why: &str, fx: &mut Effects) {
        let affected: Vec<(TaskId, u16)> = self
            .jobs
            .iter()
            .flat_map(|(id, j)| {
                j.outstanding
                    .iter()
                    .filter(|d| d.node == node)
                    .map(move |d| (id.clone(), d.attempt))
            })
            .collect();
        for (id, attempt) in affected {
            self.drop_dispatch(&id, attempt);
            self.registry.record(now.at, &node, Outcome::Failed);
            self.fail_attempt(now, &id, format!("node {node}: {why}"), fx);
        }
    }

    /// Forgets an outstanding dispatch, marking its node as one to avoid for this task.
    pub(super) fn drop_dispatch(&mut self, task_id: &TaskId, attempt: u16) -> Option<NodeId> {
        let job = self.jobs.get_mut(task_id)?;
        let pos = job.outstanding.iter().position(|d| d.attempt == attempt)?;
        let d = job.outstanding.swap_remove(pos);
        job.avoided.push(d.node);
        self.registry.task_finished(&d.node);
        Some(d.node)
    }

    /// Sends the probes due, each with a random nonce.
    pub(super) fn on_probes(&mut self, now: Now, fx: &mut Effects) {
        let rng = &mut self.rng;
        for p in self.registry.probes(now.at, || rng.random()) {
            fx.dispatch.push(probe(p));
        }
    }

    /// Advances time: expires dispatches past their deadline and tasks that waited too long
    /// for a node, then places what it can.
    pub(super) fn on_tick(&mut self, now: Now, fx: &mut Effects) {
        self.expire_late(now.at);
        for node in self.registry.went_silent(now.at) {
            self.reassign_from(now, node, "went silent (no signed traffic in time)", fx);
        }
        while let Some(Reverse((deadline, _, _))) = self.deadlines.peek() {
            if *deadline > now.at {
                break;
            }
            let Some(Reverse((_, id, attempt))) = self.deadlines.pop() else {
                break;
            };
            if let Some(node) = self.drop_dispatch(&id, attempt) {
                self.registry.record(now.at, &node, Outcome::Failed);
                self.fail_attempt(
                    now,
                    &id,
                    format!("node {node} did not answer attempt {attempt} in time"),
                    fx,
                );
            }
        }
        let jobs = &self.jobs;
        for q in &mut self.queue {
            q.retain(|(ticket, id)| {
                jobs.get(id)
                    .is_some_and(|j| j.queued_since.is_some() && j.ticket == *ticket)
            });
        }
        // Live entries are in the order they queued, so the expired ones lead each queue.
        let expired: Vec<TaskId> = self
            .queue
            .iter()
            .flat_map(|q| {
                q.iter().map_while(|(_, id)| {
                    let since = self.jobs.get(id)?.queued_since?;
                    (now.at.duration_since(since) >= self.config.queue_timeout).then(|| id.clone())
                })
            })
            .collect();
        for id in expired {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let waited = self.config.queue_timeout.as_secs_f64();
            let why = match self.registry.unmet(&job.spec.requires, job.replicas) {
                Some(unmet) => format!("no eligible node within {waited} s: {unmet}"),
                None => format!(
                    "no eligible node within {waited} s (online, breaker closed, a free slot, enough free memory)"
                ),
            };
            // A check that found no free node leaves the result it was checking standing.
            let verified = job.standing().filter(|_| job.outstanding.is_empty());
            if verified.is_some() {
                job.spot_missed = Some(format!(
                    "no distinct node was free to check it within {waited} s"
                ));
            } else {
                job.errors.push(why);
            }
            self.finish(now, &id, verified, fx);
        }
        self.pump_queue(now, fx);
    }
}
