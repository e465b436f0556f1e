//! Placement queries over the registry: picking nodes by strategy, who is able or ready to
//! run a task, and which requirement no registered node meets.

use super::*;

impl Registry {
    /// Chooses a node for a task, or `None` if no node is eligible.
    ///
    /// Eligible: online (presence not "offline", valid traffic within the liveness window
    /// before `now`), breaker admitting (closed, or half-open with its probe slot free), the
    /// node's own reported breaker not open, fewer tasks in flight than its `max_concurrency`,
    /// enough free memory, the engine, arch and labels asked for, and not in `exclude`. Among
    /// those, `strategy` decides (see [`Strategy`]).
    ///
    /// A breaker is judged as of the last time it was fed: one that opened half-opens at the
    /// node's first telemetry sample after its cool-down (samples arrive every few seconds, the
    /// cool-down is 30 s or more), not at the exact millisecond the cool-down ends.
    ///
    /// Choosing a half-open node spends its one probe: it is not chosen again until the probe's
    /// outcome is [recorded](Registry::record). Choosing does not count the task as in flight;
    /// call [`Registry::task_started`] when it is dispatched.
    ///
    /// Cost: O(log n) plus the available nodes ranked above the choice that do not meet `req`
    /// or are excluded; latency-aware placement also walks the nodes that are nearer but slower
    /// or faster but farther than its choice (see [`Strategy::LatencyAware`]).
    pub fn select(
        &mut self,
        now: Instant,
        req: &Requirements,
        strategy: Strategy,
        exclude: &[NodeId],
    ) -> Option<NodeId> {
        self.select_by(
            now,
            req,
            exclude,
            |_| true,
            |placement, fits| placement.pick(strategy, req.fuel, fits),
        )
    }

    /// As [`Registry::select`], with the node drawn uniformly (the `draw`-th, modulo their
    /// number) among the eligible [proven](Registry::proven) nodes, or among all eligible
    /// nodes when no proven one is free: for a task's checks and further replicas. A node
    /// cannot make itself the likely checker of another by what it reports, colluders meet
    /// each other about as often as their share of the proven pool, and a node that has not
    /// agreed with others yet decides no vote while a proven one is free.
    ///
    /// Cost: O(n) in the available nodes.
    pub fn select_uniform(
        &mut self,
        now: Instant,
        req: &Requirements,
        exclude: &[NodeId],
        draw: u64,
    ) -> Option<NodeId> {
        let trust_after = self.config.trust_after;
        let uniform = |placement: &mut Placement, fits: &mut dyn FnMut(NodeId) -> bool| {
            placement.pick_uniform(draw, fits)
        };
        self.select_by(
            now,
            req,
            exclude,
            |n| n.agreed_in_a_row >= trust_after,
            uniform,
        )
        .or_else(|| self.select_by(now, req, exclude, |_| true, uniform))
    }

    pub(super) fn select_by(
        &mut self,
        now: Instant,
        req: &Requirements,
        exclude: &[NodeId],
        also: impl Fn(&Node) -> bool,
        mut pick: impl FnMut(&mut Placement, &mut dyn FnMut(NodeId) -> bool) -> Option<NodeId>,
    ) -> Option<NodeId> {
        let now_ms = self.now_ms(now);
        self.expire(now);
        if !self.placement.may_satisfy(req) {
            return None;
        }
        loop {
            let nodes = &self.nodes;
            let id = pick(&mut self.placement, &mut |id| {
                !exclude.contains(&id)
                    && nodes.get(&id).is_some_and(|n| {
                        also(n) && req.is_met_by(n.attributes(), n.mem_free_bytes())
                    })
            })?;
            let node = self.nodes.get_mut(&id)?;
            match node.breaker.admit(now_ms) {
                Admission::Admit => return Some(id),
                Admission::Probe => {
                    tracing::info!(node = %id, "probe task for a half-open breaker");
                    node.admitting = node.breaker.is_admitting(now_ms);
                    reindex(&mut self.placement, id, node);
                    return Some(id);
                }
                // Indexed nodes were admitting when last fed, and only feeding the breaker
                // changes that; handled anyway by dropping the node and looking further.
                Admission::Refuse(_) => {
                    node.admitting = false;
                    reindex(&mut self.placement, id, node);
                }
            }
        }
    }

    /// Why no registered node could ever run a task that needs `req` on `replicas` distinct
    /// nodes: names the first requirement no node meets (arch, engine, a label, memory, the
    /// number of nodes). `None` when enough registered nodes meet every requirement, so the
    /// task only waited for one of them to be online, healthy and free.
    ///
    /// O(n): for the failure message of a task that timed out in the queue, not for placement.
    pub fn unmet(&self, req: &Requirements, replicas: usize) -> Option<String> {
        if self.nodes.is_empty() {
            return Some("no node is registered".into());
        }
        let listed = |values: &mut Vec<String>| {
            values.sort_unstable();
            values.dedup();
            values.join(", ")
        };
        if let Some(arch) = &req.arch
            && !self.nodes.values().any(|n| &n.arch == arch)
        {
            let mut all: Vec<String> = self.nodes.values().map(|n| n.arch.clone()).collect();
            return Some(format!(
                "no registered node has arch {arch:?} (registered: {})",
                listed(&mut all)
            ));
        }
        if let Some(engine) = req.engine
            && !self.nodes.values().any(|n| n.engine.satisfies(engine))
        {
            return Some(format!(
                "no registered node runs the {} engine",
                engine.as_str()
            ));
        }
        if let Some(label) = req
            .labels
            .iter()
            .find(|l| !self.nodes.values().any(|n| n.labels.contains(l)))
        {
            return Some(format!("no registered node has the label {label:?}"));
        }
        let matching: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| req.is_met_by(n.attributes(), u64::MAX))
            .collect();
        if matching.is_empty() {
            return Some(
                "no registered node has the arch, engine and labels asked for together".into(),
            );
        }
        let most = matching
            .iter()
            .map(|n| n.mem_free_bytes())
            .max()
            .unwrap_or(0);
        if most < req.memory_bytes {
            let total = matching
                .iter()
                .map(|n| n.mem_total_bytes)
                .max()
                .unwrap_or(0);
            return Some(format!(
                "limits.memory_bytes {} is more than any matching node has free ({most} bytes free, {total} bytes in all on the largest)",
                req.memory_bytes
            ));
        }
        let able = matching
            .iter()
            .filter(|n| n.mem_free_bytes() >= req.memory_bytes)
            .count();
        (able < replicas).then(|| {
            format!("the task needs {replicas} distinct nodes and {able} registered nodes meet its requirements")
        })
    }

    /// Why no node outside `exclude` could run a task that needs `req` once it has a free
    /// slot; `None` when one could. For a spot check, whose only question is
    /// whether a second node exists at all: the caller excludes the nodes the task has used.
    ///
    /// Only nodes online and not blacklisted count: a check waits for a busy node, not for
    /// one that is gone.
    ///
    /// O(n): only when a check cannot be placed at once.
    pub fn unmet_without(
        &self,
        now: Instant,
        req: &Requirements,
        exclude: &[NodeId],
    ) -> Option<String> {
        let able = self
            .nodes
            .iter()
            .any(|(id, n)| !exclude.contains(id) && n.can_run(now, req));
        (!able).then(|| {
            format!(
                "no other online node can run it ({} registered, {} used for this task)",
                self.nodes.len(),
                exclude.len()
            )
        })
    }

    /// How many nodes outside `exclude` could run a task that needs `req`, busy or not:
    /// online, not blacklisted, meeting its requirements. What a vote can still draw on.
    ///
    /// O(n): only when replicas disagree.
    pub fn able(&self, now: Instant, req: &Requirements, exclude: &[NodeId]) -> usize {
        self.others(exclude).filter(|n| n.can_run(now, req)).count()
    }

    /// Whether the node is blacklisted (shown to return a wrong result within
    /// [`RegistryConfig::blacklist`]).
    pub fn blacklisted(&self, node: &NodeId) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.blacklisted_until_ms.is_some())
    }

    /// Whether a node outside `exclude` could take a task that needs `req` as soon as it has
    /// a free slot: able, and with both breakers admitting. Stops at the first.
    pub fn any_ready(&self, now: Instant, req: &Requirements, exclude: &[NodeId]) -> bool {
        self.others(exclude)
            .any(|n| n.can_run(now, req) && n.is_ready())
    }

    pub(super) fn others<'a>(
        &'a self,
        exclude: &'a [NodeId],
    ) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes
            .iter()
            .filter(move |(id, _)| !exclude.contains(id))
            .map(|(_, n)| n)
    }

    /// Whether the node's recent results agreed with other nodes' often enough in a row
    /// ([`RegistryConfig::trust_after`]) for its `receipt` tasks to run unchecked (but for
    /// the random spot checks that never stop). Unknown nodes are not proven.
    pub fn proven(&self, node: &NodeId) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.agreed_in_a_row >= self.config.trust_after)
    }

    /// The bound on the chance that a result from this node is wrong ([`ambient_core::doubt`]
    /// of its agreements in a row, with [`RegistryConfig::assumed_faulty_permille`]); an
    /// unknown node is as doubtful as a node never checked.
    pub fn doubt(&self, node: &NodeId) -> f64 {
        let agreed = self.nodes.get(node).map_or(0, |n| n.agreed_in_a_row);
        ambient_core::doubt(agreed, self.config.assumed_faulty_permille)
    }
}
