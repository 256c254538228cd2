//! The ranks that are not the front: `hetero infer-worker` (started by a local
//! front, or by hand on another host with `--mesh`), and the workers of an
//! inference job the coordinator placed (`[inference]` in a job spec), which meet
//! through the coordinator's rendezvous and whose rank 0 serves HTTP.

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hetero_comm::{Mesh, RingConfig};
use hetero_infer::models::Model;
use hetero_infer::{Followed, Front, Placement, Worker, follow};

use crate::InferBackend;
use crate::auto::{TRIALS, decide};
use crate::front::{Children, form};
use crate::placing::{AUTO, Placing, describe, idle, load_part, open_model, parse_mesh, placements_of};

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
    // Its first placement (a benchmark's list may name others, and models, after
    // it: the front sends those), or nothing until the front sends the one it chose.
    let name = place.placement.split(',').next().unwrap_or(AUTO).trim();
    let name = name.rsplit_once('@').map_or(name, |(_, p)| p);
    let first = placements_of(&model.arch, name, addrs.len())?
        .remove(0)
        .unwrap_or_else(|| idle(&model.arch, addrs.len()));
    crate::memory::check_worker(&model, &first, rank, place.budget.per_worker)?;
    let worker = load_part(&model, &first, rank)?;
    let mesh = form(rank, addrs.len(), &token, listener, &addrs)?;
    follow_placements(worker, mesh, rank, model)
}

/// A worker of an inference job the coordinator placed on an agent (`[inference]`
/// in the job spec): it meets the others through the coordinator's rendezvous;
/// rank 0 then serves HTTP on `inference.listen`, the others follow it.
pub fn job_worker(setup: hetero_worker::WorkerSetup) -> Result<()> {
    let inf = setup.spec.inference.clone().context("not an inference job")?;
    hetero_worker::end_with_the_agent();
    let mut model = open_model(&inf.model)?;
    let first = placements_of(&model.arch, &inf.placement, setup.world)?.remove(0);
    println!(
        "rank {} of {}: {} under {}",
        setup.rank,
        setup.world,
        inf.model,
        first
            .as_ref()
            .map_or("the placement the planner chooses".into(), describe)
    );
    // Rank 0 serves, with the model's tokenizer.
    let tokenizer = match setup.rank {
        0 => Some(
            model
                .tokenizer
                .take()
                .with_context(|| format!("{} has no tokenizer: serve a real model", inf.model))?,
        ),
        _ => None,
    };
    let part = |p: &Placement| load_part(&model, p, setup.rank);
    // Rank 0 under `auto` loads its part once it has chosen; the others start idle.
    let worker = match (&first, setup.rank) {
        (Some(p), _) => Some(part(p)?),
        (None, 0) => None,
        (None, _) => Some(part(&idle(&model.arch, setup.world))?),
    };
    let listener = TcpListener::bind((setup.data_host.as_str(), 0))
        .with_context(|| format!("binding a data-plane port on {}", setup.data_host))?;
    let addrs = hetero_worker::rendezvous::exchange(&setup, listener.local_addr()?)?;
    let mut config = RingConfig::new(setup.rank, setup.world, format!("{}-infer", setup.job_id), &setup.token);
    config.connect_timeout = Duration::from_secs(600);
    config.io_timeout = Duration::from_secs(3600);
    let mesh = Mesh::form(config, listener, &addrs).context("forming the data-plane mesh")?;
    if let Some(tokenizer) = tokenizer {
        // Read before the model is placed: a missing key file fails the job at once.
        let api_key = inf
            .api_key_file
            .as_deref()
            .map(|path| crate::auth::ApiKey::from_file(std::path::Path::new(path)))
            .transpose()?;
        let front = match worker {
            Some(worker) => Front { worker, mesh },
            None => {
                let place = Placing {
                    placement: AUTO.into(),
                    workers: setup.world,
                    plan_seq: 128,
                    plan_tokens: 32,
                    trials: TRIALS,
                    ..Placing::default()
                };
                let (front, chosen, _) = decide(mesh, &inf.model, &model, &place, Some(&addrs))?;
                println!("rank 0: {} under {}", inf.model, describe(&chosen));
                front
            }
        };
        return crate::server::serve_front(
            front,
            Children(vec![]),
            tokenizer,
            &inf.model,
            &model.arch,
            &crate::server::ServeOptions {
                api_key,
                ..crate::server::ServeOptions::on(&inf.listen)
            },
        );
    }
    follow_placements(
        worker.expect("followers start with a placement"),
        mesh,
        setup.rank,
        model,
    )
}

/// Runs the front's requests until it says stop, loading each placement it
/// sends (a benchmark's next one, or the planner's choice) and opening each
/// model it moves to (a benchmark comparing models).
fn follow_placements(mut worker: Worker<InferBackend>, mut mesh: Mesh, rank: usize, mut model: Model) -> Result<()> {
    loop {
        match follow(&mut worker, &mut mesh)? {
            Followed::Stopped => return Ok(()),
            Followed::Place(p) => {
                drop(worker);
                worker = load_part(&model, &p, rank)?;
            }
            Followed::Model(name) => {
                drop(worker);
                model = open_model(&name)?;
                worker = load_part(&model, &idle(&model.arch, mesh.world()), rank)?;
            }
        }
    }
}
