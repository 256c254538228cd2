//! What the engine that placed this process says about it: its rank, how many
//! ranks the job has, and where rank 0 (the leader) listens.
//!
//! ## Design
//! `hetero run` is started by someone else's launcher: Slurm's `srun`, a
//! Kubernetes Indexed Job or JobSet, a LeaderWorkerSet, Open MPI's `mpirun`, or
//! a person with flags. Each launcher states the same three facts in variables of
//! its own. Every source that is present is read into a [`Reading`], and the
//! readings are merged. When two sources disagree, the run is refused and both
//! variables are named: a rank taken from the wrong source would join the wrong
//! rendezvous and wait there until it timed out.
//!
//! One nesting is expected, not contradictory: `mpirun` inside a Slurm
//! allocation. There, Slurm's `SLURM_PROCID` and `SLURM_NTASKS` describe the
//! step that started MPI's daemons, not this process. So Open MPI's rank and size
//! win over Slurm's, and Slurm still gives the leader: the first host of the
//! allocation, where `mpirun` puts rank 0.
//!
//! Everything read here comes from outside, so it is bounded. A rank or world
//! size is at most [`MAX_WORLD`], a host name is at most 253 characters of the
//! characters host names use, and a Slurm host list is at most 64 KiB.

use std::fmt;

mod launchers;

pub use launchers::first_host;
use launchers::{flags, hetero_vars, kubernetes, leader_worker_set, open_mpi, slurm};

/// The most ranks one `hetero run` job may have.
pub const MAX_WORLD: usize = 65_536;

/// A launcher whose variables said something about this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `--rank`, `--world`, `--leader` (or `HETERO_RANK`, `HETERO_WORLD`, `HETERO_LEADER`).
    Flags,
    /// Slurm's `srun`.
    Slurm,
    /// A Kubernetes Indexed Job, or a JobSet's job.
    Kubernetes,
    /// A LeaderWorkerSet group.
    LeaderWorkerSet,
    /// Open MPI's `mpirun`.
    OpenMpi,
}

impl Engine {
    /// The launcher's name, for people.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Flags => "flags",
            Engine::Slurm => "slurm",
            Engine::Kubernetes => "kubernetes",
            Engine::LeaderWorkerSet => "leaderworkerset",
            Engine::OpenMpi => "open-mpi",
        }
    }
}

/// What the user gave on the command line. The same facts may also come as
/// `HETERO_RANK`, `HETERO_WORLD` and `HETERO_LEADER`, read here like any
/// launcher's variables.
#[derive(Debug, Clone, Default)]
pub struct Explicit {
    /// `--rank`.
    pub rank: Option<usize>,
    /// `--world`.
    pub world: Option<usize>,
    /// `--leader HOST[:PORT]`.
    pub leader: Option<String>,
}

/// One value and the variable it came from (`SLURM_PROCID=2`), so that an
/// error can say where each value came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact<T> {
    /// The value.
    pub value: T,
    /// `NAME=value` as read.
    pub from: String,
}

impl<T> Fact<T> {
    fn new(value: T, name: &str, raw: &str) -> Self {
        Fact {
            value,
            from: format!("{name}={raw}"),
        }
    }
}

/// Where rank 0 listens: a host name or address, and a port when the source
/// gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Host name, IPv4 address, or IPv6 address without brackets.
    pub host: String,
    /// The port, when given with the host.
    pub port: Option<u16>,
}

impl fmt::Display for Leader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => write!(f, "{host}:{p}"),
            None => write!(f, "{host}"),
        }
    }
}

/// Where this process stands in the job, merged from every source present.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// This process's rank, `< world`.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// Where rank 0 listens.
    pub leader: Leader,
    /// The launchers that said something, in the order they were read.
    pub engines: Vec<Engine>,
    /// An identity the launcher gives the whole job (Slurm's job id, the
    /// leader's name…): the same on every rank, and different for the next job.
    pub job: Option<String>,
    /// Every variable that was read, `NAME=value`.
    pub read: Vec<String>,
    /// How every rank's host is named, when the launcher's naming says so (an
    /// inference mesh needs each rank's address, not only the leader's).
    pub peers: Option<Peers>,
}

/// How a launcher names the host of each rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// A LeaderWorkerSet: the leader is `<lws>-<group>.<service>…`, worker `i` is
    /// `<lws>-<group>-<i>.<service>…`.
    LeaderWorkerSet {
        /// `LWS_LEADER_ADDRESS`.
        leader: String,
    },
    /// An Indexed Job under a headless Service: rank `i` is `<stem>-<i>.<service>`.
    IndexedJob {
        /// The pod name without its index.
        stem: String,
        /// The headless Service (the pods' subdomain).
        service: String,
    },
}

impl Peers {
    /// The host name of `rank`.
    pub fn host(&self, rank: usize) -> String {
        match self {
            Peers::LeaderWorkerSet { leader } if rank == 0 => leader.clone(),
            Peers::LeaderWorkerSet { leader } => match leader.split_once('.') {
                Some((pod, domain)) => format!("{pod}-{rank}.{domain}"),
                None => format!("{leader}-{rank}"),
            },
            Peers::IndexedJob { stem, service } => format!("{stem}-{rank}.{service}"),
        }
    }
}

/// An environment that does not say where this process stands.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LaunchError {
    /// A variable holds something that is not what its launcher documents.
    #[error("{from}: {why}")]
    Malformed {
        /// `NAME=value`.
        from: String,
        /// What is wrong with it.
        why: String,
    },
    /// No source gives this fact.
    #[error("no {what} for this process; read: {read}. {hint}")]
    Missing {
        /// `rank`, `world size` or `leader address`.
        what: &'static str,
        /// The variables that were read (`nothing` when none).
        read: String,
        /// How to give it.
        hint: String,
    },
    /// Two sources give different values.
    #[error("{what} disagrees between {a} and {b}: two launchers describe this process differently")]
    Disagree {
        /// `rank`, `world size` or `leader address`.
        what: &'static str,
        /// One source, `NAME=value`.
        a: String,
        /// The other.
        b: String,
    },
    /// The rank is not below the world size.
    #[error("rank {rank} is not below the world size {world}; ranks run from 0 to world - 1")]
    RankOutOfRange {
        /// Where the rank came from.
        rank: String,
        /// Where the world size came from.
        world: String,
    },
}

/// What one source said.
#[derive(Debug, Clone)]
struct Reading {
    engine: Engine,
    rank: Option<Fact<usize>>,
    world: Option<Fact<usize>>,
    leader: Option<Fact<Leader>>,
    job: Option<String>,
    peers: Option<Peers>,
}

impl Reading {
    fn new(engine: Engine) -> Self {
        Reading {
            engine,
            rank: None,
            world: None,
            leader: None,
            job: None,
            peers: None,
        }
    }

    fn said_anything(&self) -> bool {
        self.rank.is_some() || self.world.is_some() || self.leader.is_some()
    }
}

/// Reads every launcher's variables through `env` and merges them with the
/// flags; see the module's design note for the rules.
pub fn resolve(env: &dyn Fn(&str) -> Option<String>, explicit: &Explicit) -> Result<Launch, LaunchError> {
    let mut read = Vec::new();
    let mut var = |name: &str| -> Option<String> {
        let value = env(name)?;
        read.push(format!("{name}={}", shorten(&value)));
        Some(value)
    };
    // Under mpirun, Slurm's step variables describe the step that started MPI's
    // daemons: its rank and size are not this process's, and its step node list
    // leaves out the node mpirun runs on (where rank 0 is).
    let under_mpi = env("OMPI_COMM_WORLD_RANK").is_some();
    let mut readings = vec![
        flags(explicit)?,
        hetero_vars(&mut var)?,
        slurm(&mut var, under_mpi)?,
        kubernetes(&mut var)?,
        leader_worker_set(&mut var)?,
        open_mpi(&mut var)?,
    ];
    readings.retain(Reading::said_anything);
    if under_mpi && let Some(slurm) = readings.iter_mut().find(|r| r.engine == Engine::Slurm) {
        slurm.rank = None;
        slurm.world = None;
    }
    // Open MPI's loopback leader is a guess (every rank is on this host), not
    // something it states: any source that names the leader wins over it.
    let named = readings
        .iter()
        .any(|r| r.engine != Engine::OpenMpi && r.leader.is_some());
    if named && let Some(mpi) = readings.iter_mut().find(|r| r.engine == Engine::OpenMpi) {
        mpi.leader = None;
    }
    let shown = if read.is_empty() {
        "nothing".to_string()
    } else {
        read.join(", ")
    };
    let rank = agree("rank", readings.iter().filter_map(|r| r.rank.as_ref()))?.ok_or_else(|| LaunchError::Missing {
        what: "rank",
        read: shown.clone(),
        hint:
            "Start it under srun, mpirun, a Kubernetes Indexed Job or a LeaderWorkerSet, or give --rank (HETERO_RANK)."
                .into(),
    })?;
    let world =
        agree("world size", readings.iter().filter_map(|r| r.world.as_ref()))?.ok_or_else(|| LaunchError::Missing {
            what: "world size",
            read: shown.clone(),
            hint: "Give --world (HETERO_WORLD): a Kubernetes Job does not tell its pods how many completions it has."
                .into(),
        })?;
    let leader =
        agree_on_leader(readings.iter().filter_map(|r| r.leader.as_ref()))?.ok_or_else(|| LaunchError::Missing {
            what: "leader address",
            read: shown.clone(),
            hint: "Give --leader HOST[:PORT] (HETERO_LEADER), the host rank 0 runs on; on Kubernetes, \
                       HETERO_SERVICE names the headless Service the pods are found under."
                .into(),
        })?;
    if rank.value >= world.value {
        return Err(LaunchError::RankOutOfRange {
            rank: rank.from,
            world: world.from,
        });
    }
    let job = readings.iter().find_map(|r| r.job.clone());
    let peers = readings.iter().find_map(|r| r.peers.clone());
    Ok(Launch {
        rank: rank.value,
        world: world.value,
        leader: leader.value,
        engines: {
            let mut engines: Vec<Engine> = readings.iter().map(|r| r.engine).collect();
            engines.dedup();
            engines
        },
        job,
        read,
        peers,
    })
}

/// The one value every fact gives (`None`: no fact), or the first two that differ.
fn agree<'a, T: PartialEq + Clone + 'a>(
    what: &'static str,
    mut facts: impl Iterator<Item = &'a Fact<T>>,
) -> Result<Option<Fact<T>>, LaunchError> {
    let Some(first) = facts.next() else { return Ok(None) };
    if let Some(other) = facts.find(|f| f.value != first.value) {
        return Err(LaunchError::Disagree {
            what,
            a: first.from.clone(),
            b: other.from.clone(),
        });
    }
    Ok(Some(first.clone()))
}

/// The leader every fact names: the hosts must be the same, and so must the
/// ports where two facts give one (`--leader node01:29400` agrees with Slurm's
/// `node01`).
fn agree_on_leader<'a>(
    facts: impl Iterator<Item = &'a Fact<Leader>> + Clone,
) -> Result<Option<Fact<Leader>>, LaunchError> {
    let hosts: Vec<Fact<String>> = facts
        .clone()
        .map(|f| Fact {
            value: f.value.host.clone(),
            from: f.from.clone(),
        })
        .collect();
    let Some(host) = agree("leader address", hosts.iter())? else {
        return Ok(None);
    };
    let ports: Vec<Fact<u16>> = facts
        .filter_map(|f| {
            f.value.port.map(|p| Fact {
                value: p,
                from: f.from.clone(),
            })
        })
        .collect();
    let port = agree("leader port", ports.iter())?;
    Ok(Some(Fact {
        value: Leader {
            host: host.value,
            port: port.map(|p| p.value),
        },
        from: host.from,
    }))
}

/// `HOST`, `HOST:PORT`, `IPv6` or `[IPv6]:PORT`, checked to be a host name.
pub fn parse_leader(text: &str, name: &str) -> Result<Leader, LaunchError> {
    let malformed = |why: &str| LaunchError::Malformed {
        from: format!("{name}={}", shorten(text)),
        why: why.to_string(),
    };
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| malformed("an unclosed [ in an address"))?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| malformed("expected [IPv6]:PORT"))?,
                ),
            ),
        }
    } else if text.matches(':').count() > 1 {
        (text, None) // a bare IPv6 address
    } else {
        match text.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    if host.is_empty() || host.len() > 253 {
        return Err(malformed("a host name has 1 to 253 characters"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(malformed(
            "a host name has only letters, digits, '.', '-', '_' (and ':' in IPv6)",
        ));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| malformed("the port must be a number from 1 to 65535"))?,
        ),
    };
    Ok(Leader {
        host: host.to_string(),
        port,
    })
}

/// `text`, cut to 80 characters for an error message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// The environment of a test as a launcher lookup.
#[cfg(test)]
pub(crate) mod test_env {
    use std::collections::HashMap;

    use super::*;

    /// `resolve` over `vars` and `explicit`.
    pub fn launch(vars: &[(&str, &str)], explicit: &Explicit) -> Result<Launch, LaunchError> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        resolve(&|name| env.get(name).cloned(), explicit)
    }

    /// `resolve` over `vars` alone.
    pub fn env(vars: &[(&str, &str)]) -> Result<Launch, LaunchError> {
        launch(vars, &Explicit::default())
    }
}

#[cfg(test)]
mod tests {
    use super::test_env::{env, launch};
    use super::*;

    #[test]
    fn the_flags_variables_count_as_flags_and_must_agree_with_them() {
        let l = env(&[
            ("JOB_COMPLETION_INDEX", "1"),
            ("HOSTNAME", "t-1"),
            ("HETERO_SERVICE", "t"),
            ("HETERO_WORLD", "2"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.world, l.leader.host.as_str()), (1, 2, "t-0.t"));
        assert_eq!(l.engines, vec![Engine::Flags, Engine::Kubernetes]);
        let e = launch(
            &[("HETERO_WORLD", "2")],
            &Explicit {
                rank: Some(0),
                world: Some(3),
                leader: Some("h".into()),
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("--world=3") && e.to_string().contains("HETERO_WORLD=2"),
            "{e}"
        );
    }

    #[test]
    fn a_leader_with_a_port_agrees_with_the_same_host_without_one() {
        let l = launch(
            &[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_NODELIST", "n1")],
            &Explicit {
                leader: Some("n1:29999".into()),
                ..Explicit::default()
            },
        )
        .unwrap();
        assert_eq!(l.leader.to_string(), "n1:29999");
        let e = launch(
            &[("HETERO_LEADER", "n1:1")],
            &Explicit {
                rank: Some(0),
                world: Some(1),
                leader: Some("n1:2".into()),
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                LaunchError::Disagree {
                    what: "leader port",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn long_values_are_shortened_in_what_is_reported() {
        let list = format!("n[{}]", (0..2000).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        let l = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_JOB_NODELIST", &list),
        ])
        .unwrap();
        assert_eq!(l.leader.host, "n0");
        assert!(l.read.iter().all(|r| r.len() < 120), "{:?}", l.read);
    }

    #[test]
    fn two_launchers_that_disagree_are_refused_naming_both() {
        let e = launch(
            &[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_NODELIST", "a")],
            &Explicit {
                rank: Some(0),
                ..Explicit::default()
            },
        )
        .unwrap_err();
        assert_eq!(
            e,
            LaunchError::Disagree {
                what: "rank",
                a: "--rank=0".into(),
                b: "SLURM_PROCID=1".into()
            }
        );
        let e = env(&[
            ("LWS_LEADER_ADDRESS", "x"),
            ("LWS_WORKER_INDEX", "1"),
            ("LWS_GROUP_SIZE", "2"),
            ("JOB_COMPLETION_INDEX", "0"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("JOB_COMPLETION_INDEX=0"), "{e}");
        assert!(e.to_string().contains("LWS_WORKER_INDEX=1"), "{e}");
    }

    #[test]
    fn a_rank_at_or_past_the_world_size_is_refused() {
        let e = env(&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "2"), ("SLURM_NODELIST", "a")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rank SLURM_PROCID=2 is not below the world size SLURM_NTASKS=2; ranks run from 0 to world - 1"
        );
    }

    #[test]
    fn nothing_at_all_names_every_way_to_say_it() {
        let e = env(&[]).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("no rank for this process; read: nothing."), "{text}");
        assert!(text.contains("srun") && text.contains("--rank"), "{text}");
    }

    #[test]
    fn hostile_values_are_refused_not_trusted() {
        for (name, value) in [
            ("SLURM_PROCID", "-1"),
            ("SLURM_PROCID", "99999999999999999999999"),
            ("SLURM_NTASKS", "0"),
            ("SLURM_NTASKS", "70000"),
            ("LWS_LEADER_ADDRESS", "evil host"),
            ("LWS_LEADER_ADDRESS", "a/b"),
        ] {
            let e = env(&[(name, value)]).unwrap_err();
            assert!(matches!(e, LaunchError::Malformed { .. }), "{name}={value}: {e}");
            assert!(e.to_string().starts_with(name), "{e}");
        }
        let long = "h".repeat(300);
        assert!(parse_leader(&long, "--leader").is_err());
        assert!(parse_leader("h:0", "--leader").is_err());
        assert!(parse_leader("h:70000", "--leader").is_err());
    }

    #[test]
    fn leaders_parse_with_and_without_ports() {
        let p = |t| parse_leader(t, "--leader").unwrap();
        assert_eq!(
            p("host"),
            Leader {
                host: "host".into(),
                port: None
            }
        );
        assert_eq!(p("host:29400").port, Some(29400));
        assert_eq!(p("fd00::1").host, "fd00::1");
        assert_eq!(p("[fd00::1]:7").to_string(), "[fd00::1]:7");
    }
}
