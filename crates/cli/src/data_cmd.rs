//! `hetero data`: get Fashion-MNIST onto this machine, or cut a subset of it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use hetero_data::ImageDataset;
use hetero_data::mnist::{DEBIAN_FASHION_MNIST, FASHION_MNIST_HINT, Split, is_complete};

/// Data-set commands.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Put a data set's files into a folder (from Debian's package or a folder you name).
    Fetch {
        /// The data set: fashion-mnist.
        name: String,
        /// A folder that already holds the IDX files.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Where to put them.
        #[arg(long, default_value = "data/fashion-mnist")]
        to: PathBuf,
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
            if name != "fashion-mnist" {
                bail!("unknown data set {name:?}; known: fashion-mnist");
            }
            fetch_fashion_mnist(from.as_deref(), &to)?;
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
