//! Where a client (or an agent) finds the coordinator, and the token it shows.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Where the client finds the coordinator and its token.
#[derive(clap::Args, Clone)]
pub struct Connection {
    /// Coordinator address: host:port, reached over TLS; http://host:port for a
    /// coordinator started with --insecure.
    #[arg(long, env = "HETERO_COORDINATOR", default_value = "127.0.0.1:7070", global = true)]
    coordinator: String,
    /// Cluster token (default: read from <data-dir>/token, as written by `hetero coordinator`).
    #[arg(long, env = "HETERO_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The coordinator's data folder, to find its token file.
    #[arg(long, default_value = ".hetero", global = true)]
    data_dir: PathBuf,
}

impl Connection {
    /// The coordinator's address as given.
    pub fn coordinator(&self) -> &str {
        &self.coordinator
    }

    /// The token to use: `--token`/`HETERO_TOKEN`, else the coordinator's token file.
    pub fn token(&self) -> Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        match read_token_file(&self.data_dir) {
            Some(t) => Ok(t),
            None => bail!(
                "no cluster token: pass --token or set HETERO_TOKEN (the coordinator writes it to {}/token)",
                self.data_dir.display()
            ),
        }
    }
}

/// The token in `<data_dir>/token`, if there is one.
pub fn read_token_file(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join("token"))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}
