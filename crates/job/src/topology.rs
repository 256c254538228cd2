//! How a placed job's ranks combine their work: its aggregation groups and who
//! speaks to the parameter server — one answer for the worker that forms the
//! groups and for `hetero status`, which shows them.
//!
//! ## Design
//! A worker's *place* is `node/group` (its agent and resource group, as the
//! coordinator hands them to every worker in `HETERO_GROUPS`). With
//! `hierarchical`, the workers of one place form one allreduce group whose
//! lowest rank (its leader) exchanges with the parameter server; with
//! `parameter-server`, every worker is a group of its own; the other strategies
//! have one ring of all workers and no server.

use crate::{JobSpec, Strategy};

/// One aggregation group: the workers that reduce together before the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregationGroup {
    /// Where its workers run (`node/group`), or `rank-N` for a group of one.
    pub place: String,
    /// Its ranks, lowest first; the first is its leader.
    pub ranks: Vec<usize>,
}

/// Each rank's aggregation group key under `strategy`, from each rank's place
/// (`places[r]` is rank r's `node/group`). A hierarchical job whose places are not
/// one per worker falls back to a group per worker, like `parameter-server`.
pub fn group_keys(strategy: Strategy, places: &[String], world: usize) -> Vec<String> {
    match strategy {
        Strategy::Hierarchical if places.len() == world => places.to_vec(),
        _ => (0..world).map(|r| format!("rank-{r}")).collect(),
    }
}

/// The aggregation groups of a job with a parameter server, in the order of
/// their leaders; empty for strategies without one.
pub fn groups(strategy: Strategy, places: &[String], world: usize) -> Vec<AggregationGroup> {
    if !strategy.uses_parameter_server() {
        return vec![];
    }
    let keys = group_keys(strategy, places, world);
    let mut groups: Vec<AggregationGroup> = Vec::new();
    for (rank, key) in keys.into_iter().enumerate() {
        match groups.iter_mut().find(|g| g.place == key) {
            Some(g) => g.ranks.push(rank),
            None => groups.push(AggregationGroup {
                place: key,
                ranks: vec![rank],
            }),
        }
    }
    groups
}

/// Job `spec`'s topology in a few lines for people: an inference job's model and
/// placement, or a training job's strategy, its rings or groups, and where the
/// parameter server runs (`server`, its place, if any).
pub fn describe(spec: &JobSpec, places: &[String], world: usize, server: Option<&str>) -> Vec<String> {
    if let Some(i) = &spec.inference {
        return vec![format!(
            "inference: {} under placement {} over {world} worker(s); rank 0 serves HTTP on {}",
            i.model, i.placement, i.listen
        )];
    }
    let server = server.unwrap_or("(not placed)");
    let strategy = spec.training.strategy;
    match strategy {
        Strategy::Allreduce => vec![format!("allreduce: {world} worker(s) in one ring")],
        Strategy::LocalSgd { sync_every } => vec![format!(
            "local-sgd: {world} worker(s) step alone and average in one ring every {sync_every} step(s)"
        )],
        Strategy::ParameterServer { staleness } => vec![format!(
            "parameter-server on {server}: {world} worker(s) each push alone ({})",
            if staleness == 0 {
                "synchronous".to_string()
            } else {
                format!("asynchronous, at most {staleness} version(s) ahead")
            }
        )],
        Strategy::Hierarchical => {
            let groups = groups(strategy, places, world);
            let mut lines = vec![format!(
                "hierarchical: {} group(s) reduce inside, their leaders exchange with the parameter server on {server}",
                groups.len()
            )];
            lines.extend(groups.iter().map(|g| {
                let ranks: Vec<String> = g.ranks.iter().map(|r| r.to_string()).collect();
                format!(
                    "  group {}: rank(s) {} (leader {})",
                    g.place,
                    ranks.join(", "),
                    g.ranks[0]
                )
            }));
            lines
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn places(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    fn spec(strategy: &str) -> JobSpec {
        JobSpec::parse(&format!(
            "name = \"t\"\n[model]\nkind = \"mlp\"\n[dataset]\npath = \"d\"\n[training]\nstrategy = \"{strategy}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn hierarchical_workers_on_one_node_form_one_group_led_by_their_lowest_rank() {
        let p = places(&["node-1/cpu", "node-0/cpu", "node-1/cpu"]);
        let g = groups(Strategy::Hierarchical, &p, 3);
        assert_eq!(
            g,
            vec![
                AggregationGroup {
                    place: "node-1/cpu".into(),
                    ranks: vec![0, 2]
                },
                AggregationGroup {
                    place: "node-0/cpu".into(),
                    ranks: vec![1]
                },
            ]
        );
        let lines = describe(&spec("hierarchical"), &p, 3, Some("node-0/cpu"));
        assert!(
            lines[0].contains("2 group(s)") && lines[0].ends_with("on node-0/cpu"),
            "{lines:?}"
        );
        assert_eq!(lines[1], "  group node-1/cpu: rank(s) 0, 2 (leader 0)");
    }

    #[test]
    fn without_one_place_per_worker_or_a_server_there_are_no_shared_groups() {
        let partial = places(&["node-0/cpu"]);
        let g = groups(Strategy::Hierarchical, &partial, 2);
        assert_eq!(g.iter().map(|g| g.ranks.len()).collect::<Vec<_>>(), vec![1, 1]);
        let ps = groups(Strategy::ParameterServer { staleness: 0 }, &places(&["a", "a"]), 2);
        assert_eq!(ps.len(), 2, "a parameter server's workers push alone");
        assert!(groups(Strategy::Allreduce, &places(&["a", "a"]), 2).is_empty());
        assert_eq!(
            describe(&spec("allreduce"), &[], 3, None),
            vec!["allreduce: 3 worker(s) in one ring"]
        );
    }
}
