//! `hetero profile` and `hetero plan`: measure a mesh, then choose a placement on
//! it and show why (seed 000, module 3). The measuring and the choosing are
//! `hetero_infer::profile`, `cost` and `plan`; this file parses, prints and draws.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use hetero_infer::Arch;
use hetero_infer::placement::Placement;
use hetero_infer::plan::{Candidate, Objective, plan as choose};
use hetero_infer::profile::Profile;
use hetero_models::LayerKind;
use hetero_serve::front::profile_only;
use hetero_serve::placing::{Placing, describe, open_model};

use crate::infer_cmd::MeshArgs;

/// `hetero profile`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The model to time (its layer shapes): minilm, smollm2, a folder, a .gguf,
    /// bert-base-random[:NDxNB], smollm2-random[:NDxNB].
    #[arg(required_unless_present = "show")]
    pub model: Option<String>,
    /// Where to write the profile (JSON).
    #[arg(long, required_unless_present = "show")]
    pub out: Option<PathBuf>,
    /// Print a profile file as tables instead of measuring.
    #[arg(long, conflicts_with_all = ["model", "out"])]
    pub show: Option<PathBuf>,
    /// Request length (encoders) or prompt length (decoders) to time.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Decoders: also time a decode step after the prompt (0: prefill only).
    #[arg(long, default_value_t = 1)]
    pub tokens: usize,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

/// `hetero plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The model to place (as `hetero profile` was given).
    pub model: String,
    /// The profile (from `hetero profile`).
    #[arg(long)]
    pub profile: PathBuf,
    /// Request length (encoders) or prompt length (decoders) to plan for.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Decoders: decode steps per request, weighed against the prefill.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Write the chosen placement here (TOML; give it to --placement).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a picture of the plan here (SVG: devices × layers, traffic per link).
    #[arg(long)]
    pub picture: Option<PathBuf>,
    /// List every candidate weighed, not only the best twelve.
    #[arg(long)]
    pub all: bool,
    /// Write and draw the candidate of this rank in the list instead of the best.
    #[arg(long, default_value_t = 1)]
    pub pick: usize,
}

pub fn profile(args: &ProfileArgs) -> Result<ExitCode> {
    if let Some(path) = &args.show {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let p: Profile = serde_json::from_str(&text).with_context(|| format!("{} is not a profile", path.display()))?;
        print!("{}", p.show());
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(name), Some(out)) = (&args.model, &args.out) else {
        bail!("give a model and --out FILE, or --show FILE");
    };
    if out.exists() {
        bail!(
            "{} exists: profiles are not overwritten (remove it first)",
            out.display()
        );
    }
    let model = open_model(name)?;
    let mesh = args.mesh.list()?;
    let place = Placing {
        workers: mesh.as_ref().map_or(args.mesh.workers, |list| list.split(',').count()),
        mesh,
        token: args.mesh.token.clone(),
        profile: Some(out.clone()),
        plan_seq: args.seq,
        plan_tokens: args.tokens,
        ..Placing::default()
    };
    let p = profile_only(name, &model, &place)?;
    print!("{}", p.show());
    Ok(ExitCode::SUCCESS)
}

pub fn plan(args: &PlanArgs) -> Result<ExitCode> {
    let model = open_model(&args.model)?;
    let text = std::fs::read_to_string(&args.profile).with_context(|| format!("reading {}", args.profile.display()))?;
    let profile: Profile =
        serde_json::from_str(&text).with_context(|| format!("{} is not a profile", args.profile.display()))?;
    let profile_path = &args.profile;
    profile
        .check(&model.arch, profile.devices.len(), None)
        .with_context(|| format!("{}", profile_path.display()))?;
    let objective = match model.arch.is_encoder() {
        true => Objective::encoder(args.seq),
        false => Objective::decoder(args.seq, args.tokens),
    };
    let plan = choose(&model.arch, &profile, &objective)?;
    let Some(c) = plan.candidates.get(args.pick.wrapping_sub(1)) else {
        bail!("--pick {}: there are {} candidates", args.pick, plan.candidates.len());
    };
    if let Some(why) = &c.refused {
        bail!("candidate {} ({}) does not fit: {why}", args.pick, c.name);
    }
    println!(
        "{} on {} devices; objective: {}",
        args.model,
        profile.devices.len(),
        objective_text(&objective)
    );
    println!("{}: {}", if args.pick == 1 { "chosen" } else { "picked" }, c.name);
    println!("  {}", describe(&c.placement));
    print_prediction(c, &objective);
    println!(
        "\n{:<4} {:>10} {:>10} {:>10} {:>12}  candidate",
        "#", "total ms", "compute", "comm", "bytes"
    );
    for (i, cand) in plan
        .candidates
        .iter()
        .enumerate()
        .take(if args.all { usize::MAX } else { 12 })
    {
        let p = &cand.prediction;
        println!(
            "{:<4} {:>10.2} {:>10.2} {:>10.2} {:>12}  {}{}",
            i + 1,
            p.total * 1e3,
            p.compute * 1e3,
            p.communication * 1e3,
            p.bytes(),
            cand.name,
            cand.refused
                .as_ref()
                .map_or(String::new(), |r| format!(" — does not fit: {r}"))
        );
    }
    if !args.all && plan.candidates.len() > 12 {
        println!("… and {} more (--all)", plan.candidates.len() - 12);
    }
    if let Some(out) = &args.out {
        hetero_infer::weights::write_atomically(out, c.placement.to_toml().as_bytes())?;
        println!("placement written to {} (--placement {})", out.display(), out.display());
    }
    if let Some(path) = &args.picture {
        hetero_infer::weights::write_atomically(path, picture(&model.arch, &args.model, c).as_bytes())?;
        println!("picture written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn objective_text(o: &Objective) -> String {
    o.shapes
        .iter()
        .map(|(s, n)| format!("{n} × {s}"))
        .collect::<Vec<_>>()
        .join(" + ")
}

fn print_prediction(c: &Candidate, objective: &Objective) {
    for ((shape, _), p) in objective.shapes.iter().zip(&c.per_shape) {
        println!(
            "  {shape}: {:.2} ms predicted ({:.2} compute, {:.2} communication), {} bytes",
            p.total * 1e3,
            p.compute * 1e3,
            p.communication * 1e3,
            p.bytes()
        );
    }
    let traffic: Vec<String> = c.per_shape[0]
        .traffic
        .iter()
        .map(|((a, b), n)| format!("{a}→{b} {n}"))
        .collect();
    println!("  bytes per link ({}): {}", objective.shapes[0].0, traffic.join(", "));
}

/// What device `rank` does in `layer`: a short label and a colour.
fn cell(arch: &Arch, placement: &Placement, rank: usize, layer: usize) -> (String, &'static str) {
    let layout = arch.layout();
    let stage = placement
        .stages
        .iter()
        .find(|s| s.layers.contains(&layer))
        .expect("checked: every layer placed");
    let Some(pos) = stage.workers.iter().position(|&w| w == rank) else {
        return (String::new(), "#f2f2f2");
    };
    match layout.kinds[layer] {
        LayerKind::Decoupled => {
            let n = stage.sub_block_ranges(layout.divisions)[pos].len();
            match n {
                0 => (String::new(), "#f2f2f2"),
                n => (format!("{n}/{}", layout.divisions), "#9ecae1"),
            }
        }
        LayerKind::Original => match stage.original_part(rank) {
            None => (String::new(), "#f2f2f2"),
            Some((_, 1)) => ("all".into(), "#fdae6b"),
            Some((i, k)) => (format!("{}/{k}", i + 1), "#a1d99b"),
        },
    }
}

/// The plan as SVG: one row per device, one column per layer (with the
/// embedding and head), each cell saying what the device holds; then the traffic
/// on each link for the first request shape, and the prediction.
fn picture(arch: &Arch, model: &str, c: &Candidate) -> String {
    let placement = &c.placement;
    let layers = arch.layers();
    let (cw, ch, left, top) = (34.0, 26.0, 80.0, 50.0);
    let width = left + (layers + 2) as f64 * cw + 20.0;
    let links = c.per_shape[0].traffic.len();
    let height = top + (placement.workers as f64 + 1.0) * ch + 40.0 + (links as f64 + 2.0) * 18.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(svg, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"20\" font-size=\"14\">{} — {}</text>",
        escape(model),
        escape(&c.name)
    );
    let head = |i: usize| match i {
        0 => "emb".to_string(),
        i if i == layers + 1 => "head".to_string(),
        i => format!("{}", i - 1),
    };
    for i in 0..layers + 2 {
        let x = left + i as f64 * cw;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x + cw / 2.0,
            top - 6.0,
            head(i)
        );
    }
    let first = &placement.stages[0];
    let last = placement.stages.last().expect("checked");
    for rank in 0..placement.workers {
        let y = top + rank as f64 * ch;
        let _ = writeln!(svg, "<text x=\"10\" y=\"{}\">device {rank}</text>", y + ch * 0.65);
        for i in 0..layers + 2 {
            let (label, colour) = match i {
                0 if first.workers.contains(&rank) => ("E".to_string(), "#bcbddc"),
                0 => (String::new(), "#f2f2f2"),
                i if i == layers + 1 => match (arch.is_encoder(), last.head_part(rank)) {
                    (false, Some((_, 1))) => ("all".into(), "#bcbddc"),
                    (false, Some((p, k))) => (format!("{}/{k}", p + 1), "#bcbddc"),
                    (true, _) if last.holders_after()[0] == rank => ("pool".into(), "#bcbddc"),
                    _ => (String::new(), "#f2f2f2"),
                },
                i => cell(arch, placement, rank, i - 1),
            };
            let x = left + i as f64 * cw;
            let _ = writeln!(
                svg,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{colour}\" stroke=\"white\"/>",
                cw - 1.0,
                ch - 1.0
            );
            if !label.is_empty() {
                let _ = writeln!(
                    svg,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"9\">{label}</text>",
                    x + cw / 2.0,
                    y + ch * 0.62
                );
            }
        }
    }
    let mut y = top + placement.workers as f64 * ch + 22.0;
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"{y}\">cells: n/N sub-blocks of a decoupled layer · all: a whole layer · i/k: part i of k (tensor-parallel)</text>"
    );
    let p = &c.prediction;
    y += 20.0;
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"{y}\">predicted {:.2} ms: {:.2} compute, {:.2} communication</text>",
        p.total * 1e3,
        p.compute * 1e3,
        p.communication * 1e3
    );
    let max = c.per_shape[0].traffic.values().copied().max().unwrap_or(1).max(1) as f64;
    for ((a, b), bytes) in &c.per_shape[0].traffic {
        y += 18.0;
        let bar = 300.0 * *bytes as f64 / max;
        let _ = writeln!(svg, "<text x=\"10\" y=\"{y}\">link {a} → {b}</text>");
        let _ = writeln!(
            svg,
            "<rect x=\"{left}\" y=\"{}\" width=\"{bar:.1}\" height=\"12\" fill=\"#6baed6\"/>",
            y - 10.0
        );
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{y}\">{bytes} bytes</text>", left + bar + 6.0);
    }
    svg += "</svg>\n";
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
