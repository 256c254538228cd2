//! `hetero-fuzz`: runs the fuzz targets for as long as asked, from the committed
//! corpus, and stops at the first crash with the input saved.
//!
//! ```text
//! hetero-fuzz --list
//! hetero-fuzz all --seconds 600          # each target ten minutes
//! hetero-fuzz gguf --inputs 1000000 --seed 7
//! hetero-fuzz gguf --replay target/fuzz-crashes/gguf-…   # one input, its panic shown
//! ```

use std::process::ExitCode;
use std::time::Duration;

use hetero_fuzz::{Budget, fuzz, run_one, seeds, targets};

const USAGE: &str =
    "usage: hetero-fuzz (TARGET | all) [--seconds N | --inputs N] [--seed N] | TARGET --replay FILE | --list";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hetero-fuzz: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    if args.first().map(String::as_str) == Some("--list") {
        for t in targets::ALL {
            println!("{:<12} {}", t.name, t.what);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let which = args.first().ok_or("name a target, or all")?;
    let chosen: Vec<_> = targets::ALL
        .iter()
        .filter(|t| which == "all" || t.name == which)
        .collect();
    if chosen.is_empty() {
        return Err(format!("no target {which:?} (--list shows them)"));
    }
    let value = |flag: &str| -> Result<Option<u64>, String> {
        match args.iter().position(|a| a == flag) {
            None => Ok(None),
            Some(i) => args
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or(format!("{flag} takes a number")),
        }
    };
    if let Some(i) = args.iter().position(|a| a == "--replay") {
        let file = args.get(i + 1).ok_or("--replay takes a file")?;
        let input = std::fs::read(file).map_err(|e| format!("reading {file}: {e}"))?;
        for t in &chosen {
            match run_one(t, &input) {
                Ok(outcome) => println!("{}: {outcome}", t.name),
                Err(panic) => {
                    println!("{}: PANIC {panic}", t.name);
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let budget = match (value("--seconds")?, value("--inputs")?) {
        (Some(s), _) => Budget::Time(Duration::from_secs(s)),
        (None, Some(n)) => Budget::Inputs(n),
        (None, None) => Budget::Time(Duration::from_secs(60)),
    };
    let seed = value("--seed")?.unwrap_or(1);
    for t in chosen {
        let report = fuzz(t, seeds(t), budget, seed, |r| {
            eprint!(
                "\r{:<12} {:>9} inputs, {:>4} outcomes, {:>4} kept",
                t.name, r.inputs, r.outcomes, r.corpus
            );
        });
        eprintln!();
        match report {
            Ok(r) => println!(
                "{:<12} ok: {} inputs, {} distinct outcomes, {} inputs kept",
                t.name, r.inputs, r.outcomes, r.corpus
            ),
            Err(crash) => {
                println!("{crash}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
