//! Where a queued job's workers go, and in which order queued jobs are considered.
//!
//! Pure functions of their inputs, tested without a cluster:
//! - [`queue_order`]: higher priority first, then submission order;
//! - [`place`]: gang placement on resource groups of the job's device kind, under one
//!   of the two policies of seed 001 — *uniform* (deal ranks round-robin over every
//!   group that has room) or *resource-state* (fill the groups with the most free
//!   resources first). A job starts only when every worker can start: a ring with a
//!   missing rank would wait forever.
//!
//! Capacity is counted in worker slots and, when a job asks for it, device memory;
//! a group never holds more workers than either allows.

use hetero_job::Policy;

/// A resource group's free capacity at the moment of scheduling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCapacity {
    /// The node (agent) the group is on.
    pub agent_id: String,
    /// Device kind.
    pub kind: String,
    /// Worker slots not in use.
    pub free_slots: u32,
    /// Device memory not reserved by running workers, in MiB.
    pub free_memory_mb: u64,
}

/// What a job needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// Workers, all of which must start together.
    pub workers: u32,
    /// Device kind each worker needs.
    pub kind: String,
    /// Memory each worker needs, in MiB (0: none asked).
    pub memory_mb: u64,
    /// Placement policy.
    pub policy: Policy,
}

/// How many of the demand's workers `g` can take.
fn room(d: &Demand, g: &GroupCapacity) -> u32 {
    if g.kind != d.kind {
        return 0;
    }
    // No memory asked (division by zero): memory does not limit.
    let by_memory = g
        .free_memory_mb
        .checked_div(d.memory_mb)
        .map_or(u32::MAX, |m| m.min(u32::MAX as u64) as u32);
    g.free_slots.min(by_memory)
}

/// The group (index into `groups`) of each rank, or `None` when the job cannot start
/// whole right now.
pub fn place(d: &Demand, groups: &[GroupCapacity]) -> Option<Vec<usize>> {
    let mut room: Vec<u32> = groups.iter().map(|g| room(d, g)).collect();
    let total: u64 = room.iter().map(|&r| r as u64).sum();
    if d.workers == 0 || total < d.workers as u64 {
        return None;
    }
    let mut out = Vec::with_capacity(d.workers as usize);
    match d.policy {
        Policy::Uniform => {
            let mut i = 0;
            while out.len() < d.workers as usize {
                if room[i] > 0 {
                    room[i] -= 1;
                    out.push(i);
                }
                i = (i + 1) % groups.len();
            }
        }
        Policy::ResourceState => {
            let mut order: Vec<usize> = (0..groups.len()).filter(|&i| room[i] > 0).collect();
            order.sort_by_key(|&i| {
                (
                    std::cmp::Reverse(room[i]),
                    std::cmp::Reverse(groups[i].free_memory_mb),
                    i,
                )
            });
            for i in order {
                while room[i] > 0 && out.len() < d.workers as usize {
                    room[i] -= 1;
                    out.push(i);
                }
            }
        }
    }
    Some(out)
}

/// A queued job as the queue sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its priority (higher first).
    pub priority: i64,
    /// Its submission sequence number (lower first among equals).
    pub sequence: u64,
}

/// Indices of `jobs` in the order the scheduler considers them.
pub fn queue_order(jobs: &[Queued]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(jobs[i].priority), jobs[i].sequence));
    order
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn g(agent: &str, kind: &str, slots: u32, mem: u64) -> GroupCapacity {
        GroupCapacity {
            agent_id: agent.into(),
            kind: kind.into(),
            free_slots: slots,
            free_memory_mb: mem,
        }
    }

    fn demand(workers: u32, policy: Policy) -> Demand {
        Demand {
            workers,
            kind: "cpu".into(),
            memory_mb: 0,
            policy,
        }
    }

    #[test]
    fn gang_or_nothing() {
        let groups = [g("a", "cpu", 1, 0), g("b", "cpu", 1, 0)];
        assert_eq!(place(&demand(3, Policy::Uniform), &groups), None);
        assert_eq!(place(&demand(1, Policy::Uniform), &[]), None);
        assert_eq!(place(&demand(0, Policy::Uniform), &groups), None);
    }

    #[test]
    fn uniform_spreads_over_every_group() {
        let groups = [g("a", "cpu", 4, 0), g("b", "cpu", 4, 0), g("c", "cpu", 4, 0)];
        assert_eq!(place(&demand(4, Policy::Uniform), &groups).unwrap(), vec![0, 1, 2, 0]);
        let groups = [g("a", "cpu", 1, 0), g("b", "cpu", 5, 0)];
        assert_eq!(place(&demand(4, Policy::Uniform), &groups).unwrap(), vec![0, 1, 1, 1]);
    }

    #[test]
    fn resource_state_fills_the_freest_group_first() {
        let groups = [g("a", "cpu", 2, 0), g("b", "cpu", 5, 0), g("c", "cpu", 3, 0)];
        assert_eq!(
            place(&demand(6, Policy::ResourceState), &groups).unwrap(),
            vec![1, 1, 1, 1, 1, 2]
        );
    }

    #[test]
    fn kind_and_memory_are_requirements() {
        let groups = [
            g("a", "cpu", 4, 1000),
            g("b", "npu", 4, 16_000),
            g("c", "npu", 4, 3_000),
        ];
        let mut d = demand(3, Policy::Uniform);
        d.kind = "npu".into();
        d.memory_mb = 4_000;
        // c has slots but memory for none; b has memory for 4.
        assert_eq!(place(&d, &groups).unwrap(), vec![1, 1, 1]);
        d.workers = 5;
        assert_eq!(place(&d, &groups), None);
        d.kind = "tpu".into();
        d.workers = 1;
        assert_eq!(place(&d, &groups), None);
    }

    #[test]
    fn queue_is_priority_then_submission() {
        let q = |priority, sequence| Queued { priority, sequence };
        assert_eq!(
            queue_order(&[q(0, 1), q(5, 2), q(0, 3), q(5, 4), q(-1, 5)]),
            vec![1, 3, 0, 2, 4]
        );
    }

    proptest! {
        /// Jobs placed one after another never book a group past its slots or memory.
        #[test]
        fn never_double_booked(
            groups in prop::collection::vec((1u32..6, 0u64..8_000, prop::bool::ANY), 1..6),
            jobs in prop::collection::vec((1u32..8, 0u64..3_000, prop::bool::ANY, prop::bool::ANY), 1..12),
        ) {
            let mut caps: Vec<GroupCapacity> = groups
                .iter()
                .enumerate()
                .map(|(i, &(slots, mem, npu))| g(&format!("n{i}"), if npu { "npu" } else { "cpu" }, slots, mem))
                .collect();
            let original = caps.clone();
            for (workers, mem, npu, uniform) in jobs {
                let d = Demand {
                    workers,
                    kind: if npu { "npu".into() } else { "cpu".into() },
                    memory_mb: mem,
                    policy: if uniform { Policy::Uniform } else { Policy::ResourceState },
                };
                if let Some(p) = place(&d, &caps) {
                    prop_assert_eq!(p.len() as u32, workers);
                    for i in p {
                        prop_assert_eq!(&caps[i].kind, &d.kind);
                        prop_assert!(caps[i].free_slots > 0);
                        caps[i].free_slots -= 1;
                        prop_assert!(caps[i].free_memory_mb >= d.memory_mb);
                        caps[i].free_memory_mb -= d.memory_mb;
                    }
                }
            }
            for (c, o) in caps.iter().zip(&original) {
                prop_assert!(c.free_slots <= o.free_slots && c.free_memory_mb <= o.free_memory_mb);
            }
        }
    }
}
