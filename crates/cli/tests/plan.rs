//! `hetero profile`, `hetero plan` and `--placement auto` as a user runs them:
//! worker processes on loopback, the real MiniLM (fetched into the model cache on
//! first use) and a decoupled MiniLM cut from it.

use std::path::Path;
use std::process::{Command, Output};

fn hetero() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hetero"));
    c.env_remove("HETERO_TOKEN");
    c
}

fn run(c: &mut Command) -> (bool, String, String) {
    let out: Output = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The first `cosine(0, 1) = …` line `hetero infer` printed.
fn cosine(stdout: &str) -> f64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("cosine(0, 1) = "))
        .expect("a cosine line")
        .parse()
        .unwrap()
}

const SENTENCES: [&str; 2] = ["A man is eating food.", "A man is eating a piece of bread."];

/// A decoupled MiniLM is profiled over three workers, planned (the plan printed,
/// the placement and its picture written), and run under the planned placement
/// and under `auto`, giving the single device's embeddings; a profile of
/// another model or mesh, and a plan that needs more memory than a device has,
/// are refused by name before any worker loads weights.
#[test]
fn a_profiled_mesh_is_planned_and_runs_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let student = dir.path().join("student");
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare-subset");
    let (ok, stdout, stderr) = run(hetero()
        .args([
            "models",
            "decouple",
            "minilm",
            "--divisions",
            "2",
            "--blocks",
            "3",
            "--samples",
            "8",
            "--text",
        ])
        .arg(&text)
        .arg("--export")
        .arg(&student));
    assert!(ok, "{stdout}\n{stderr}");
    let profile = dir.path().join("profile.json");
    let (ok, stdout, stderr) = run(hetero()
        .arg("profile")
        .arg(&student)
        .args(["--workers", "3", "--seq", "16", "--out"])
        .arg(&profile));
    assert!(ok, "{stdout}\n{stderr}");
    // The tables: times per layer kind, memory, links.
    assert!(
        stdout.contains("prefill 1x16") && stdout.contains("2 sub") && stdout.contains("layer/3"),
        "{stdout}"
    );
    assert!(stdout.contains("2 → 0") && stdout.contains("free MiB"), "{stdout}");
    assert!(stdout.contains("slow-down while another device computes"), "{stdout}");
    let (ok, shown, _) = run(hetero().arg("profile").arg("--show").arg(&profile));
    assert!(ok && shown == stdout, "--show prints what was measured");

    let placement = dir.path().join("plan.toml");
    let picture = dir.path().join("plan.svg");
    let (ok, stdout, stderr) = run(hetero()
        .arg("plan")
        .arg(&student)
        .arg("--profile")
        .arg(&profile)
        .args(["--seq", "16", "--all", "--out"])
        .arg(&placement)
        .arg("--picture")
        .arg(&picture));
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("chosen: ") && stdout.contains("predicted"), "{stdout}");
    for family in [
        "single on",
        "tensor-parallel over",
        "pipeline over",
        "decoupled over",
        "originals gather",
    ] {
        assert!(stdout.contains(family), "{family} weighed: {stdout}");
    }
    let svg = std::fs::read_to_string(&picture).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("device 2") && svg.contains("predicted"),
        "{svg}"
    );

    let single = run(hetero().arg("infer").arg(&student).args(SENTENCES));
    assert!(single.0, "{}", single.2);
    let planned = run(hetero()
        .arg("infer")
        .arg(&student)
        .args(SENTENCES)
        .args(["--workers", "3", "--placement"])
        .arg(&placement));
    assert!(planned.0, "{}", planned.2);
    let auto = run(hetero()
        .arg("infer")
        .arg(&student)
        .args(SENTENCES)
        .args(["--workers", "3", "--placement", "auto", "--profile"])
        .arg(&profile));
    assert!(auto.0, "{}", auto.2);
    assert!(auto.2.contains("auto: ") && auto.2.contains("predicted"), "{}", auto.2);
    // The finalists were tried on the workers, and the fastest measured won.
    let trials: Vec<(&str, f64)> = auto
        .2
        .lines()
        .filter_map(|l| l.strip_prefix("trial: "))
        .map(|l| {
            let (name, rest) = l.split_once(" — ").unwrap();
            let measured = rest.rsplit_once("measured ").unwrap().1.trim_end_matches(" ms");
            (name, measured.parse().unwrap())
        })
        .collect();
    assert!(
        trials.len() >= 2,
        "several structures are close on loopback: {}",
        auto.2
    );
    let fastest = trials.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    let won = auto.2.lines().find_map(|l| l.strip_prefix("auto: ")).unwrap();
    assert!(won.starts_with(&format!("{fastest} — ")), "{}", auto.2);
    for (name, got) in [("planned", &planned), ("auto", &auto)] {
        assert!((cosine(&got.1) - cosine(&single.1)).abs() < 1e-4, "{name}: {}", got.1);
    }

    // Refused, by name: a profile of another mesh, another model, a device short of memory.
    let (ok, _, stderr) = run(hetero()
        .arg("infer")
        .arg(&student)
        .args(SENTENCES)
        .args(["--workers", "2", "--placement", "auto", "--profile"])
        .arg(&profile));
    assert!(
        !ok && stderr.contains("3 devices profiled, but the mesh has 2"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(hetero().args(["plan", "minilm", "--profile"]).arg(&profile));
    assert!(!ok && stderr.contains("not on this model"), "{stderr}");
    let mut starved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&profile).unwrap()).unwrap();
    for d in starved["devices"].as_array_mut().unwrap() {
        d["free_memory"] = 1_000_000.into();
    }
    let starved_file = dir.path().join("starved.json");
    std::fs::write(&starved_file, starved.to_string()).unwrap();
    let (ok, _, stderr) = run(hetero()
        .arg("plan")
        .arg(&student)
        .arg("--profile")
        .arg(&starved_file)
        .args(["--seq", "16"]));
    assert!(
        !ok && stderr.contains("no placement fits") && stderr.contains("device"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!Path::new(&dir.path().join("nothing")).exists());
}
