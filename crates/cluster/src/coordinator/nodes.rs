//! The nodes: registered agents, their resource groups, and their health as
//! their heartbeats show it.
//!
//! Health is a function of the time since a node's last heartbeat; the monitor
//! asks [`Nodes::check`] which nodes changed health and acts on the jobs itself
//! (fails the dead node's tasks, relaunches lost ranks on a node that came back)
//! — this table never touches a job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use hetero_proto as pb;

use super::Refusal;
use crate::records::{GroupRecord, NodeRecord};
use crate::scheduler::GroupCapacity;
use crate::store::Store;
use crate::{ClusterError, now_ms};

/// A node's health as the monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// Heartbeating.
    Alive,
    /// Silent for three heartbeat intervals: given no new work.
    Suspect,
    /// Silent for `dead_after`: its tasks are lost.
    Dead,
}

impl Health {
    /// Its name on the wire and in the dashboard.
    pub fn name(self) -> &'static str {
        match self {
            Health::Alive => "alive",
            Health::Suspect => "suspect",
            Health::Dead => "dead",
        }
    }
}

/// A node whose health changed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HealthChange {
    /// The node.
    pub node: String,
    /// Its health now.
    pub health: Health,
    /// How long it has been silent, in ms.
    pub silent_ms: i64,
}

/// Every registered node.
pub(crate) struct Nodes {
    map: BTreeMap<String, NodeRecord>,
    next: u64,
    /// Health last seen per node, to report each change once.
    seen: HashMap<String, Health>,
    /// Nodes whose last change must be reported again (acting on it failed).
    retry: HashSet<String>,
    /// Device usage from each node's last heartbeat.
    usage: HashMap<String, Vec<pb::DeviceUsage>>,
    heartbeat: Duration,
    dead_after: Duration,
}

impl Nodes {
    /// The nodes `store` holds, each given a fresh grace period (agents that still
    /// live will heartbeat again soon).
    pub fn open(store: &Store, heartbeat: Duration, dead_after: Duration) -> Result<Nodes, ClusterError> {
        let now = now_ms();
        let mut nodes = Nodes {
            map: BTreeMap::new(),
            next: 0,
            seen: HashMap::new(),
            retry: HashSet::new(),
            usage: HashMap::new(),
            heartbeat,
            dead_after,
        };
        for mut node in store.nodes()? {
            node.last_heartbeat_ms = now;
            nodes.next = nodes.next.max(number(&node.agent_id));
            nodes.map.insert(node.agent_id.clone(), node);
        }
        Ok(nodes)
    }

    /// Every node, in id order.
    pub fn all(&self) -> impl Iterator<Item = &NodeRecord> {
        self.map.values()
    }

    /// Node `agent_id`.
    pub fn get(&self, agent_id: &str) -> Option<&NodeRecord> {
        self.map.get(agent_id)
    }

    /// The device usage node `agent_id` last reported.
    pub fn usage(&self, agent_id: &str) -> Vec<pb::DeviceUsage> {
        self.usage.get(agent_id).cloned().unwrap_or_default()
    }

    /// Registers an agent offering `groups`: it takes back its node id only with
    /// that node's key (an agent whose folder kept an id from another coordinator,
    /// or another's id, becomes a new node); an operator's score overrides stay.
    /// Returns the node's id and key.
    pub fn register(
        &mut self,
        store: &Store,
        agent_id: &str,
        agent_key: &str,
        hostname: String,
        mut groups: Vec<GroupRecord>,
    ) -> Result<(String, String), ClusterError> {
        let returning = self
            .map
            .get(agent_id)
            .filter(|n| n.key.is_empty() || n.key == agent_key);
        let (agent_id, key, next) = match returning {
            Some(n) => (n.agent_id.clone(), agent_key.to_string(), self.next),
            None => (
                format!("node-{}", self.next + 1),
                hetero_proto::auth::new_token(),
                self.next + 1,
            ),
        };
        if let Some(old) = self.map.get(&agent_id) {
            for g in &mut groups {
                if let Some(o) = old.groups.iter().find(|o| o.kind == g.kind) {
                    g.score_override = o.score_override;
                }
            }
        }
        let node = NodeRecord {
            agent_id: agent_id.clone(),
            hostname,
            groups,
            last_heartbeat_ms: now_ms(),
            key: key.clone(),
        };
        store.put_node(&node)?;
        tracing::info!(agent_id, hostname = %node.hostname, slots = node.slots(), "agent registered");
        self.next = next;
        self.map.insert(agent_id.clone(), node);
        Ok((agent_id, key))
    }

    /// A heartbeat from `agent_id` with its devices' `usage`; `false`: no such node
    /// (it must register again).
    pub fn heartbeat(&mut self, agent_id: &str, usage: Vec<pb::DeviceUsage>) -> bool {
        let Some(node) = self.map.get_mut(agent_id) else {
            return false;
        };
        node.last_heartbeat_ms = now_ms();
        self.usage.insert(agent_id.to_string(), usage);
        true
    }

    /// Sets the operator's compute score of `agent_id`'s `kind` group.
    pub fn set_score(&mut self, store: &Store, agent_id: &str, kind: &str, score: f32) -> Result<&NodeRecord, Refusal> {
        let Some(node) = self.map.get(agent_id) else {
            return Err(Refusal::NotFound(format!("no node {agent_id}")));
        };
        let mut node = node.clone();
        let Some(group) = node.groups.iter_mut().find(|g| g.kind == kind) else {
            return Err(Refusal::NotFound(format!("node {agent_id} has no {kind} group")));
        };
        group.score_override = score;
        store.put_node(&node)?;
        self.map.insert(agent_id.to_string(), node);
        Ok(&self.map[agent_id])
    }

    /// Dead after `dead_after` of silence, suspect after three missed heartbeats.
    pub fn health(&self, node: &NodeRecord, now: i64) -> Health {
        let silent = now - node.last_heartbeat_ms;
        if silent >= self.dead_after.as_millis() as i64 {
            Health::Dead
        } else if silent > 3 * self.heartbeat.as_millis() as i64 {
            Health::Suspect
        } else {
            Health::Alive
        }
    }

    /// The nodes whose health changed since the last check (each change once).
    pub fn check(&mut self, now: i64) -> Vec<HealthChange> {
        let retry = std::mem::take(&mut self.retry);
        let changes: Vec<HealthChange> = self
            .map
            .values()
            .filter_map(|n| {
                let health = self.health(n, now);
                let before = self.seen.get(&n.agent_id).copied().unwrap_or(Health::Alive);
                (before != health || retry.contains(&n.agent_id)).then(|| HealthChange {
                    node: n.agent_id.clone(),
                    health,
                    silent_ms: now - n.last_heartbeat_ms,
                })
            })
            .collect();
        for c in &changes {
            self.seen.insert(c.node.clone(), c.health);
        }
        changes
    }

    /// Reports `node`'s health again at the next check (acting on the change
    /// failed).
    pub fn recheck(&mut self, node: &str) {
        self.retry.insert(node.to_string());
    }

    /// Free capacity of every resource group on a live node, given the `used`
    /// (slots, MiB) per (node, group kind).
    pub fn capacities(&self, used: &HashMap<(String, String), (u32, u64)>, now: i64) -> Vec<GroupCapacity> {
        self.map
            .values()
            // A suspect node (silent for a few heartbeats) gets no new work.
            .filter(|n| self.health(n, now) == Health::Alive)
            .flat_map(|n| {
                n.groups.iter().map(move |g| {
                    let (slots, mem) = used
                        .get(&(n.agent_id.clone(), g.kind.clone()))
                        .copied()
                        .unwrap_or_default();
                    GroupCapacity {
                        agent_id: n.agent_id.clone(),
                        kind: g.kind.clone(),
                        free_slots: g.worker_slots.saturating_sub(slots),
                        free_memory_mb: (g.memory_bytes >> 20).saturating_sub(mem),
                    }
                })
            })
            .collect()
    }
}

/// The number in a node id (`node-7` → 7).
fn number(agent_id: &str) -> u64 {
    agent_id.strip_prefix("node-").and_then(|n| n.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> GroupRecord {
        GroupRecord {
            kind: "cpu".into(),
            devices: 2,
            memory_bytes: 1 << 30,
            worker_slots: 2,
            gflops: 10.0,
            speed: 1.0,
            score_override: 0.0,
            command: String::new(),
            backend: String::new(),
        }
    }

    #[test]
    fn health_follows_silence_and_each_change_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let mut nodes = Nodes::open(&store, Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        let (id, _) = nodes.register(&store, "", "", "h".into(), vec![group()]).unwrap();
        let at = nodes.get(&id).unwrap().last_heartbeat_ms;
        assert!(nodes.check(at + 50).is_empty());
        let suspect = nodes.check(at + 400);
        assert_eq!((suspect.len(), suspect[0].health), (1, Health::Suspect));
        assert!(nodes.check(at + 500).is_empty(), "reported once");
        assert!(
            nodes.capacities(&HashMap::new(), at + 500).is_empty(),
            "a suspect node gets no work"
        );
        let dead = nodes.check(at + 1000);
        assert_eq!((dead[0].health, dead[0].silent_ms), (Health::Dead, 1000));
        assert!(nodes.heartbeat(&id, vec![]));
        assert_eq!(nodes.check(now_ms())[0].health, Health::Alive);
        assert!(!nodes.heartbeat("node-99", vec![]), "an unknown node registers again");
    }

    #[test]
    fn a_node_id_comes_back_only_with_its_key_and_keeps_its_score() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let mut nodes = Nodes::open(&store, Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        let (id, key) = nodes.register(&store, "", "", "h".into(), vec![group()]).unwrap();
        nodes.set_score(&store, &id, "cpu", 5.0).unwrap();
        assert!(matches!(
            nodes.set_score(&store, &id, "gpu", 1.0),
            Err(Refusal::NotFound(_))
        ));
        let (again, _) = nodes.register(&store, &id, &key, "h".into(), vec![group()]).unwrap();
        assert_eq!(again, id);
        assert_eq!(nodes.get(&id).unwrap().groups[0].score(), 5.0);
        let (other, _) = nodes
            .register(&store, &id, "a wrong key", "h".into(), vec![group()])
            .unwrap();
        assert_ne!(other, id);
        let reopened = Nodes::open(&store, Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        assert_eq!(reopened.all().count(), 2);
    }
}
