//! Where a job's workers go: gang placement spread evenly over the nodes.
//!
//! A job starts only when all of its workers can start (a data-parallel ring with a
//! missing rank would wait forever). Ranks are dealt one at a time to the node with
//! the most free slots, which spreads a job evenly and fills emptier nodes first.
//! Pure functions of their inputs, so they are tested without a cluster.

/// A node's capacity at the moment of scheduling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// The node.
    pub agent_id: String,
    /// Slots not used by running tasks.
    pub free_slots: u32,
}

/// The agent of each rank, or `None` when the cluster cannot hold the whole job now.
pub fn place(workers: u32, nodes: &[Capacity]) -> Option<Vec<String>> {
    let total: u64 = nodes.iter().map(|n| n.free_slots as u64).sum();
    if workers == 0 || total < workers as u64 {
        return None;
    }
    let mut free: Vec<u32> = nodes.iter().map(|n| n.free_slots).collect();
    let mut out = Vec::with_capacity(workers as usize);
    for _ in 0..workers {
        // Most free first; ties go to the earlier node, so placement is deterministic.
        let (i, _) = free
            .iter()
            .enumerate()
            .max_by(|(ia, a), (ib, b)| a.cmp(b).then(ib.cmp(ia)))
            .expect("total capacity was checked");
        free[i] -= 1;
        out.push(nodes[i].agent_id.clone());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(id: &str, free: u32) -> Capacity {
        Capacity {
            agent_id: id.into(),
            free_slots: free,
        }
    }

    #[test]
    fn gang_or_nothing() {
        assert_eq!(place(3, &[cap("a", 1), cap("b", 1)]), None);
        assert_eq!(place(1, &[]), None);
        assert_eq!(place(0, &[cap("a", 1)]), None);
    }

    #[test]
    fn spreads_evenly() {
        let p = place(4, &[cap("a", 4), cap("b", 4)]).unwrap();
        assert_eq!(p.iter().filter(|a| *a == "a").count(), 2);
        let p = place(2, &[cap("a", 2), cap("b", 2)]).unwrap();
        assert_eq!(p, vec!["a", "b"]);
        // The emptier node takes ranks until it is no emptier than the others.
        let p = place(5, &[cap("a", 2), cap("b", 5)]).unwrap();
        assert_eq!(p, vec!["b", "b", "b", "a", "b"]);
    }

    #[test]
    fn never_exceeds_a_node() {
        for workers in 1..=10 {
            let nodes = [cap("a", 3), cap("b", 0), cap("c", 7)];
            if let Some(p) = place(workers, &nodes) {
                for n in &nodes {
                    assert!(p.iter().filter(|a| **a == n.agent_id).count() as u32 <= n.free_slots);
                }
                assert_eq!(p.len() as u32, workers);
            }
        }
    }
}
