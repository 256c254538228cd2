//! The ranks that are not the front: `hetero infer-worker` (started by a local
//! front, or by hand on another host with `--mesh`), and the workers of an
//! inference job the coordinator placed (`[inference]` in a job spec), which meet
//! through the coordinator's rendezvous and whose rank 0 serves HTTP.

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hetero_comm::{Mesh, RingConfig};
use hetero_infer::{Followed, Front, Placement, Worker, follow};

use crate::InferBackend;
use crate::front::{Children, Placing, describe, form, open_model, parse_mesh, placements_of};

/// `hetero infer-worker`: one non-front rank.
pub fn infer_worker(model_name: &str, rank: usize, place: &Placing, listen: Option<&str>) -> Result<()> {
    let token = place
        .token
        .clone()
        .context("infer-worker needs --token or HETERO_TOKEN")?;
    let model = open_model(model_name)?;
    let (listener, addrs) = match &place.mesh {
        Some(list) => {
            let addrs = parse_mesh(list)?;
            let Some(mine) = addrs.get(rank) else {
                bail!("rank {rank} has no address in --mesh ({} addresses)", addrs.len());
            };
            let bind = listen.map(str::to_string).unwrap_or_else(|| mine.to_string());
            (
                TcpListener::bind(&bind).with_context(|| format!("binding {bind}"))?,
                addrs,
            )
        }
        None => {
            // Started by a local front: say where we listen, learn everyone's address.
            let listener = TcpListener::bind(listen.unwrap_or("127.0.0.1:0"))?;
            println!("listening on {}", listener.local_addr()?);
            std::io::stdout().flush()?;
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            (listener, parse_mesh(line.trim())?)
        }
    };
    let placements = placements_of(&model.arch, &place.placement, addrs.len())?;
    let load = |p: &Placement| {
        Worker::<InferBackend>::load(
            model.arch.clone(),
            model.weights.as_ref(),
            p.clone(),
            rank,
            &Default::default(),
        )
    };
    let worker = load(&placements[0])?;
    let mesh = form(rank, addrs.len(), &token, listener, &addrs)?;
    follow_placements(worker, mesh, &placements, load)
}

/// A worker of an inference job the coordinator placed on an agent (`[inference]`
/// in the job spec): it meets the others through the coordinator's rendezvous;
/// rank 0 then serves HTTP on `inference.listen`, the others follow it.
pub fn job_worker(setup: hetero_worker::WorkerSetup) -> Result<()> {
    let inf = setup.spec.inference.clone().context("not an inference job")?;
    hetero_worker::end_with_the_agent();
    let mut model = open_model(&inf.model)?;
    let placements = placements_of(&model.arch, &inf.placement, setup.world)?;
    println!(
        "rank {} of {}: {} under {}",
        setup.rank,
        setup.world,
        inf.model,
        describe(&placements[0])
    );
    let load = |p: &Placement| {
        Worker::<InferBackend>::load(
            model.arch.clone(),
            model.weights.as_ref(),
            p.clone(),
            setup.rank,
            &Default::default(),
        )
    };
    let worker = load(&placements[0])?;
    let listener = TcpListener::bind((setup.data_host.as_str(), 0))
        .with_context(|| format!("binding a data-plane port on {}", setup.data_host))?;
    let addrs = hetero_worker::rendezvous::exchange(&setup, listener.local_addr()?)?;
    let mut config = RingConfig::new(setup.rank, setup.world, format!("{}-infer", setup.job_id), &setup.token);
    config.connect_timeout = Duration::from_secs(600);
    config.io_timeout = Duration::from_secs(3600);
    let mesh = Mesh::form(config, listener, &addrs).context("forming the data-plane mesh")?;
    if setup.rank == 0 {
        let tokenizer = model
            .tokenizer
            .take()
            .with_context(|| format!("{} has no tokenizer: serve a real model", inf.model))?;
        let front = Front { worker, mesh };
        return crate::server::serve_front(front, Children(vec![]), tokenizer, &inf.model, &model.arch, &inf.listen);
    }
    follow_placements(worker, mesh, &placements, load)
}

/// Runs the front's requests until it says stop, loading another of `placements`
/// whenever it switches.
fn follow_placements(
    mut worker: Worker<InferBackend>,
    mut mesh: Mesh,
    placements: &[Placement],
    load: impl Fn(&Placement) -> Result<Worker<InferBackend>, hetero_infer::InferError>,
) -> Result<()> {
    while let Followed::Switch(i) = follow(&mut worker, &mut mesh)? {
        let Some(p) = placements.get(i) else {
            bail!(
                "the front switched to placement {i}, but this worker was given {}",
                placements.len()
            );
        };
        drop(worker);
        worker = load(p)?;
    }
    Ok(())
}
