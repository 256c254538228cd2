//! An agent's configuration file: CPU slots, a speed cap, and devices burn cannot
//! drive (NPU, TPU, BPU …) declared by hand so they are registered, shown and
//! schedulable for jobs that bring a program for them.
//!
//! ```toml
//! slots = 2          # CPU worker slots (default: one per core)
//! speed = 0.5        # speed cap of this agent's CPU, in (0, 1]: emulates a slower device
//!
//! [[device]]
//! kind = "npu"
//! count = 2
//! memory_gb = 16
//! slots = 2
//! command = "/opt/vendor/bin/npu-worker"   # runs one worker on these devices
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A device kind declared in the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredDevice {
    /// Device kind (`npu`, `tpu`, …).
    pub kind: String,
    /// How many devices.
    pub count: u32,
    /// Memory of each device, in GB.
    #[serde(default)]
    pub memory_gb: f64,
    /// Workers the group runs at once (default: `count`).
    #[serde(default)]
    pub slots: Option<u32>,
    /// Program that runs a worker on these devices (same `HETERO_*` protocol).
    pub command: PathBuf,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// CPU worker slots.
    #[serde(default)]
    pub slots: Option<u32>,
    /// CPU speed cap, in (0, 1].
    #[serde(default)]
    pub speed: Option<f64>,
    /// Declared devices.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeclaredDevice>,
}

impl AgentFile {
    /// Reads and checks a configuration file; errors name the file and the entry.
    pub fn load(path: &Path) -> Result<AgentFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        AgentFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<AgentFile, String> {
        let file: AgentFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(s) = file.speed
            && !(s > 0.0 && s <= 1.0)
        {
            return Err(format!("speed = {s} is not allowed; a speed cap is in (0, 1]"));
        }
        if file.slots == Some(0) {
            return Err("slots = 0 is not allowed; an agent runs at least one worker".into());
        }
        for (i, d) in file.devices.iter().enumerate() {
            let at = format!("device #{} (kind {:?})", i + 1, d.kind);
            if d.kind.is_empty()
                || !d
                    .kind
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!("{at}: kind must be letters, digits, - or _"));
            }
            if d.kind == "cpu" {
                return Err(format!(
                    "{at}: the CPU is discovered, not declared; use `slots` and `speed`"
                ));
            }
            if d.count == 0 {
                return Err(format!("{at}: count must be at least 1"));
            }
            if d.slots == Some(0) {
                return Err(format!("{at}: slots must be at least 1"));
            }
            if !(d.memory_gb >= 0.0 && d.memory_gb.is_finite()) {
                return Err(format!("{at}: memory_gb must be a number ≥ 0"));
            }
            if !d.command.is_file() {
                return Err(format!("{at}: command {} does not exist", d.command.display()));
            }
            if file.devices[..i].iter().any(|o| o.kind == d.kind) {
                return Err(format!("{at}: kind declared twice"));
            }
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_devices_parse() {
        let f = AgentFile::parse(
            "slots = 2\nspeed = 0.5\n[[device]]\nkind = \"npu\"\ncount = 2\nmemory_gb = 16\ncommand = \"/bin/sh\"\n",
        )
        .unwrap();
        assert_eq!(f.slots, Some(2));
        assert_eq!(f.speed, Some(0.5));
        assert_eq!(f.devices[0].kind, "npu");
        assert_eq!(f.devices[0].slots, None);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            ("speed = 1.5", "speed cap is in (0, 1]"),
            ("slots = 0", "at least one worker"),
            ("colour = \"red\"", "unknown field `colour`"),
            (
                "[[device]]\nkind = \"npu\"\ncount = 0\ncommand = \"/bin/sh\"",
                "count must be at least 1",
            ),
            (
                "[[device]]\nkind = \"npu\"\ncount = 1\ncommand = \"/no/such/runner\"",
                "/no/such/runner does not exist",
            ),
            (
                "[[device]]\nkind = \"cpu\"\ncount = 1\ncommand = \"/bin/sh\"",
                "the CPU is discovered",
            ),
            (
                "[[device]]\nkind = \"n p u\"\ncount = 1\ncommand = \"/bin/sh\"",
                "kind must be",
            ),
            (
                "[[device]]\nkind = \"npu\"\ncommand = \"/bin/sh\"",
                "missing field `count`",
            ),
            (
                "[[device]]\nkind = \"npu\"\ncount = 1\ncommand = \"/bin/sh\"\n[[device]]\nkind = \"npu\"\ncount = 1\ncommand = \"/bin/sh\"",
                "declared twice",
            ),
        ];
        for (text, expected) in cases {
            let err = AgentFile::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
