//! What each launcher's variables say: one reader per launcher, each giving a
//! [`Reading`] of the facts it states. [`super::resolve`] merges them.

use super::{Engine, Explicit, Fact, LaunchError, Leader, MAX_WORLD, Peers, Reading, parse_leader, shorten};

/// The longest Slurm host list read (a list is compressed: `node[001-512]`).
const MAX_HOSTLIST: usize = 64 * 1024;

pub(super) fn flags(explicit: &Explicit) -> Result<Reading, LaunchError> {
    let mut r = Reading::new(Engine::Flags);
    if let Some(rank) = explicit.rank {
        r.rank = Some(Fact::new(bounded_count(rank, "--rank")?, "--rank", &rank.to_string()));
    }
    if let Some(world) = explicit.world {
        let world = bounded_count(world, "--world")?;
        if world == 0 {
            return Err(LaunchError::Malformed {
                from: "--world=0".into(),
                why: "a job has at least one rank".into(),
            });
        }
        r.world = Some(Fact::new(world, "--world", &world.to_string()));
    }
    if let Some(leader) = &explicit.leader {
        r.leader = Some(Fact::new(parse_leader(leader, "--leader")?, "--leader", leader));
    }
    Ok(r)
}

/// `HETERO_RANK`, `HETERO_WORLD`, `HETERO_LEADER`: the flags' variables, which a
/// manifest sets where the engine says nothing (a Kubernetes Job's size).
pub(super) fn hetero_vars(var: &mut dyn FnMut(&str) -> Option<String>) -> Result<Reading, LaunchError> {
    stated(var, Engine::Flags, ["HETERO_RANK", "HETERO_WORLD", "HETERO_LEADER"])
}

/// A reading of `engine` from three variables that state the rank, the world
/// size and the leader's address as they are.
fn stated(
    var: &mut dyn FnMut(&str) -> Option<String>,
    engine: Engine,
    [rank, world, leader]: [&str; 3],
) -> Result<Reading, LaunchError> {
    let mut r = Reading::new(engine);
    r.rank = number(var, rank, false)?;
    r.world = number(var, world, true)?;
    if let Some(address) = var(leader) {
        r.leader = Some(Fact::new(parse_leader(&address, leader)?, leader, &address));
    }
    Ok(r)
}

/// `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, and the first host of the step's (or
/// the job's) node list; under mpirun, of the job's (the allocation's first
/// node, where mpirun runs).
pub(super) fn slurm(var: &mut dyn FnMut(&str) -> Option<String>, under_mpi: bool) -> Result<Reading, LaunchError> {
    let mut r = Reading::new(Engine::Slurm);
    r.rank = number(var, "SLURM_PROCID", false)?;
    r.world = number(var, "SLURM_NTASKS", true)?;
    let lists: &[&str] = if under_mpi {
        &["SLURM_JOB_NODELIST", "SLURM_NODELIST"]
    } else {
        &["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]
    };
    for &name in lists {
        if let Some(list) = var(name) {
            let host = first_host(&list).map_err(|why| LaunchError::Malformed {
                from: format!("{name}={}", shorten(&list)),
                why,
            })?;
            let leader = parse_leader(&host, name)?;
            r.leader = Some(Fact::new(leader, name, &shorten(&list)));
            break;
        }
    }
    if r.said_anything() {
        r.job = var("SLURM_JOB_ID").map(|id| format!("slurm:{id}"));
    }
    Ok(r)
}

/// A Kubernetes Indexed Job (or a JobSet's): the pod's index is its rank. Its
/// host name is `<job>-<index>` (JobSet: `<jobset>-<job>-<n>-<index>`), and with
/// the headless Service `HETERO_SERVICE` as its subdomain, rank 0 is found at
/// `<job>-0.<service>`.
pub(super) fn kubernetes(var: &mut dyn FnMut(&str) -> Option<String>) -> Result<Reading, LaunchError> {
    let mut r = Reading::new(Engine::Kubernetes);
    r.rank = number(var, "JOB_COMPLETION_INDEX", false)?;
    let Some(rank) = &r.rank else { return Ok(r) };
    if let Some(service) = var("HETERO_SERVICE") {
        let hostname = var("HOSTNAME").ok_or_else(|| LaunchError::Missing {
            what: "leader address",
            read: format!("{}, HETERO_SERVICE={service}", rank.from),
            hint: "HOSTNAME is not set, so rank 0's pod name cannot be derived; give --leader.".into(),
        })?;
        let suffix = format!("-{}", rank.value);
        let stem = hostname.strip_suffix(&suffix).ok_or_else(|| LaunchError::Malformed {
            from: format!("HOSTNAME={hostname}"),
            why: format!(
                "an Indexed Job's pod is named <job>-<index>, but this name does not end in {suffix} \
                 ({}); set the pod's subdomain and no hostname of its own, or give --leader",
                rank.from
            ),
        })?;
        let host = format!("{stem}-0.{service}");
        r.leader = Some(Fact {
            value: parse_leader(&host, "HETERO_SERVICE")?,
            from: format!("HOSTNAME={hostname} + HETERO_SERVICE={service}"),
        });
        r.job = Some(format!("kubernetes:{host}"));
        r.peers = Some(Peers::IndexedJob {
            stem: stem.to_string(),
            service,
        });
    }
    Ok(r)
}

/// A LeaderWorkerSet group: the controller sets all three.
pub(super) fn leader_worker_set(var: &mut dyn FnMut(&str) -> Option<String>) -> Result<Reading, LaunchError> {
    let mut r = stated(
        var,
        Engine::LeaderWorkerSet,
        ["LWS_WORKER_INDEX", "LWS_GROUP_SIZE", "LWS_LEADER_ADDRESS"],
    )?;
    if let Some(leader) = &r.leader {
        let address = leader.value.host.clone();
        r.job = Some(format!("lws:{address}"));
        r.peers = Some(Peers::LeaderWorkerSet { leader: address });
    }
    Ok(r)
}

/// `mpirun`: rank and size. It says nothing of where rank 0 runs, except that
/// when every rank is on this host (local size = size), the leader is here too.
pub(super) fn open_mpi(var: &mut dyn FnMut(&str) -> Option<String>) -> Result<Reading, LaunchError> {
    let mut r = Reading::new(Engine::OpenMpi);
    r.rank = number(var, "OMPI_COMM_WORLD_RANK", false)?;
    r.world = number(var, "OMPI_COMM_WORLD_SIZE", true)?;
    if let Some(world) = &r.world
        && let Some(local) = number(var, "OMPI_COMM_WORLD_LOCAL_SIZE", true)?
        && local.value == world.value
    {
        r.leader = Some(Fact {
            value: Leader {
                host: "127.0.0.1".into(),
                port: None,
            },
            from: format!("{} (every rank on this host)", local.from),
        });
    }
    if r.said_anything() {
        r.job = var("PMIX_NAMESPACE")
            .or_else(|| var("OMPI_MCA_ess_base_jobid"))
            .map(|id| format!("mpi:{id}"));
    }
    Ok(r)
}

/// The variable `name` as a rank or count (`positive`: at least 1), bounded.
fn number(
    var: &mut dyn FnMut(&str) -> Option<String>,
    name: &str,
    positive: bool,
) -> Result<Option<Fact<usize>>, LaunchError> {
    let Some(raw) = var(name) else { return Ok(None) };
    let malformed = |why: String| LaunchError::Malformed {
        from: format!("{name}={}", shorten(&raw)),
        why,
    };
    let value: usize = raw.trim().parse().map_err(|_| malformed("not a whole number".into()))?;
    if positive && value == 0 {
        return Err(malformed("must be at least 1".into()));
    }
    if value > MAX_WORLD {
        return Err(malformed(format!("more than {MAX_WORLD} ranks are not supported")));
    }
    Ok(Some(Fact::new(value, name, raw.trim())))
}

fn bounded_count(value: usize, flag: &str) -> Result<usize, LaunchError> {
    if value > MAX_WORLD {
        return Err(LaunchError::Malformed {
            from: format!("{flag}={value}"),
            why: format!("more than {MAX_WORLD} ranks are not supported"),
        });
    }
    Ok(value)
}

/// The first host of a Slurm host list: `node[01-04,07],gpu3` → `node01`,
/// `rack[1-2]-n[5-6]` → `rack1-n5`.
pub fn first_host(list: &str) -> Result<String, String> {
    if list.len() > MAX_HOSTLIST {
        return Err(format!("a host list of more than {MAX_HOSTLIST} bytes"));
    }
    let mut host = String::new();
    let mut chars = list.trim().chars();
    while let Some(c) = chars.next() {
        match c {
            ',' => break,
            '[' => {
                let inside: String = chars.by_ref().take_while(|&c| c != ']').collect();
                // The first range's start keeps its zero padding: node[01-04] → node01.
                let first = inside.split([',', '-']).next().unwrap_or_default().trim();
                if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
                    return Err(format!("[{inside}] is not a range of numbers"));
                }
                host.push_str(first);
            }
            ']' => return Err("a ] without its [".into()),
            c => host.push(c),
        }
    }
    if host.is_empty() {
        return Err("an empty host list".into());
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::super::test_env::{env, launch};
    use super::*;

    #[test]
    fn slurm_gives_rank_world_and_the_first_host_as_leader() {
        let l = env(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_JOB_NODELIST", "gpu[007-010],cpu1"),
            ("SLURM_JOB_ID", "4711"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.world), (2, 4));
        assert_eq!(l.leader.to_string(), "gpu007");
        assert_eq!(l.engines, vec![Engine::Slurm]);
        assert_eq!(l.job.as_deref(), Some("slurm:4711"));
    }

    #[test]
    fn the_step_node_list_wins_over_the_job_node_list() {
        let l = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_NODELIST", "n[3-4]"),
            ("SLURM_JOB_NODELIST", "n[1-4]"),
        ])
        .unwrap();
        assert_eq!(l.leader.host, "n3");
    }

    #[test]
    fn host_lists_expand_to_their_first_host() {
        assert_eq!(first_host("node01").unwrap(), "node01");
        assert_eq!(first_host("node[01-04,07],gpu3").unwrap(), "node01");
        assert_eq!(first_host("rack[1-2]-n[5,6]").unwrap(), "rack1-n5");
        assert_eq!(first_host("a,b").unwrap(), "a");
        assert!(first_host("node[x-y]").is_err());
        assert!(first_host("node]").is_err());
        assert!(first_host("").is_err());
        assert!(first_host(&"n".repeat(MAX_HOSTLIST + 1)).is_err());
    }

    #[test]
    fn an_indexed_job_finds_rank_zero_through_its_headless_service() {
        let l = launch(
            &[
                ("JOB_COMPLETION_INDEX", "3"),
                ("HOSTNAME", "train-workers-0-3"),
                ("HETERO_SERVICE", "train"),
            ],
            &Explicit {
                world: Some(4),
                ..Explicit::default()
            },
        )
        .unwrap();
        assert_eq!((l.rank, l.world), (3, 4));
        assert_eq!(l.leader.host, "train-workers-0-0.train");
        let peers = l.peers.unwrap();
        assert_eq!(peers.host(0), "train-workers-0-0.train");
        assert_eq!(peers.host(2), "train-workers-0-2.train");
        assert_eq!(l.engines, vec![Engine::Flags, Engine::Kubernetes]);
    }

    #[test]
    fn a_pod_whose_name_does_not_end_in_its_index_is_refused() {
        let e = launch(
            &[
                ("JOB_COMPLETION_INDEX", "3"),
                ("HOSTNAME", "trainer"),
                ("HETERO_SERVICE", "t"),
            ],
            &Explicit {
                world: Some(4),
                ..Explicit::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("HOSTNAME=trainer"), "{e}");
        assert!(e.to_string().contains("-3"), "{e}");
    }

    #[test]
    fn a_kubernetes_job_without_a_world_size_says_how_to_give_one() {
        let e = env(&[
            ("JOB_COMPLETION_INDEX", "0"),
            ("HOSTNAME", "t-0"),
            ("HETERO_SERVICE", "t"),
        ])
        .unwrap_err();
        let LaunchError::Missing { what, read, hint } = &e else {
            panic!("{e}")
        };
        assert_eq!(*what, "world size");
        assert!(read.contains("JOB_COMPLETION_INDEX=0"), "{read}");
        assert!(hint.contains("--world"), "{hint}");
    }

    #[test]
    fn a_leader_worker_set_gives_everything() {
        let l = env(&[
            ("LWS_LEADER_ADDRESS", "serve-0.serve.default"),
            ("LWS_WORKER_INDEX", "1"),
            ("LWS_GROUP_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!(
            (l.rank, l.world, l.leader.host.as_str()),
            (1, 2, "serve-0.serve.default")
        );
    }

    #[test]
    fn mpirun_on_one_host_leads_from_loopback_and_elsewhere_needs_a_leader() {
        let one_host = env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "3"),
        ])
        .unwrap();
        assert_eq!(one_host.leader.host, "127.0.0.1");
        let spread = env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap_err();
        assert!(
            matches!(
                spread,
                LaunchError::Missing {
                    what: "leader address",
                    ..
                }
            ),
            "{spread}"
        );
    }

    #[test]
    fn mpirun_inside_slurm_takes_mpis_rank_and_slurms_first_host() {
        let l = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_JOB_NODELIST", "c[5-6]"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.world, l.leader.host.as_str()), (3, 4, "c5"));
    }

    #[test]
    fn mpirun_inside_a_one_node_allocation_is_not_a_contradiction() {
        // Every rank is on this host, so Open MPI alone would lead from loopback;
        // Slurm names the host, and that is not a disagreement.
        let l = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_STEP_NODELIST", "n7"),
            ("SLURM_JOB_NODELIST", "n[5-7]"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "3"),
        ])
        .unwrap();
        // The job's first node, not the daemon step's: mpirun runs there.
        assert_eq!((l.rank, l.world, l.leader.host.as_str()), (2, 3, "n5"));
    }
}
