//! A slower device made by the operating system: a worker in a control group whose
//! CPU quota is its speed cap times the cores it computes on, so a 0.25 device
//! really gets a quarter of its cores' time.
//!
//! ## Design
//! Linux's `cpu` controller enforces a quota per period: cgroup v2 writes
//! `"QUOTA PERIOD"` to `cpu.max`, v1 writes `cpu.cfs_quota_us` beside
//! `cpu.cfs_period_us`. Each worker gets a group of its own, made inside the
//! agent's own group (so a container's limits still hold) and removed when the
//! worker has ended. Where neither version can be written (no controller, not
//! allowed), [`CpuQuota::create`] says why and the agent falls back to the worker's
//! sleep throttle, naming which one it used. A process moved into a group takes all
//! its threads along, so the worker is moved right after it starts.

use std::path::{Path, PathBuf};

/// The period of a quota, in microseconds: a tenth of the kernel's default.
///
/// Why short: a slow device computes slowly all the time, while a quota lets the
/// group run at full speed until its share of the period is spent and then stops
/// it for the rest. Workers of one job meet at every step (a few milliseconds), so
/// with the default 100 ms a quarter-speed worker would run a handful of steps at
/// full speed, then keep the whole ring waiting for 75 ms. At 10 ms the stalls are
/// shorter than most steps and the worker's pace is close to even.
const PERIOD_US: u64 = 10_000;

/// The least quota the kernel accepts per period, in microseconds.
const MIN_QUOTA_US: u64 = 1_000;

/// The longest period the kernel accepts, in microseconds.
const MAX_PERIOD_US: u64 = 1_000_000;

/// `(quota, period)` in microseconds for `cores` cores: [`PERIOD_US`], stretched
/// where the quota would fall below the kernel's least one.
fn quota_and_period(cores: f64) -> (u64, u64) {
    let period = ((MIN_QUOTA_US as f64 / cores).ceil() as u64).clamp(PERIOD_US, MAX_PERIOD_US);
    let quota = ((cores * period as f64).round() as u64).max(MIN_QUOTA_US);
    (quota, period)
}

/// A control group holding one worker, limited to a share of the CPU; removed on drop.
#[derive(Debug)]
pub struct CpuQuota {
    dir: PathBuf,
    /// Which interface it was made with.
    version: Version,
}

/// The cgroup interface in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The unified hierarchy (`cpu.max`).
    V2,
    /// The `cpu` controller's own hierarchy (`cpu.cfs_quota_us`).
    V1,
}

impl CpuQuota {
    /// A group for `name` allowed `cores` cores' worth of CPU time (0.25: a
    /// quarter of one core; 1.5: one and a half). Its folder is this group's
    /// alone: task names repeat across coordinators (every local cluster's first
    /// job is `job-000001`), and two agents on one host must not share a quota.
    pub fn create(name: &str, cores: f64) -> Result<CpuQuota, String> {
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}-{made}-{name}", std::process::id());
        if !(cores > 0.0 && cores.is_finite()) {
            return Err(format!("a CPU quota of {cores} cores"));
        }
        let (quota, period) = quota_and_period(cores);
        let mut why = Vec::new();
        for version in [Version::V2, Version::V1] {
            match Self::try_create(version, &name, quota, period) {
                Ok(q) => return Ok(q),
                Err(e) => why.push(e),
            }
        }
        Err(why.join("; "))
    }

    fn try_create(version: Version, name: &str, quota: u64, period: u64) -> Result<CpuQuota, String> {
        let parent = own_group(version)?;
        let dir = parent.join(format!("hetero-{name}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot make {}: {e}", dir.display())),
        }
        let group = CpuQuota { dir, version };
        let (file, value) = match version {
            Version::V2 => ("cpu.max", format!("{quota} {period}")),
            Version::V1 => {
                group.write("cpu.cfs_period_us", &period.to_string())?;
                ("cpu.cfs_quota_us", quota.to_string())
            }
        };
        group.write(file, &value)?;
        Ok(group)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
    }

    /// Moves process `pid` (with all its threads) into the group.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The group's folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Which interface made it.
    pub fn version(&self) -> Version {
        self.version
    }

    /// How often the kernel held the group's processes back for the quota.
    pub fn times_throttled(&self) -> Result<u64, String> {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat"))
            .map_err(|e| format!("cannot read {}: {e}", self.dir.join("cpu.stat").display()))?;
        stat.lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| format!("{} has no nr_throttled", self.dir.join("cpu.stat").display()))
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // The kernel refuses while a process is still inside; the worker has ended by
        // the time its group is dropped.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The folder of this process's own group for `version`'s CPU controller.
fn own_group(version: Version) -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    // mountinfo: … mount-point … - fstype source super-options
    let mount = mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        let mut right = right.split(' ');
        let fstype = right.next()?;
        let options = right.nth(1).unwrap_or_default();
        let wanted = match version {
            Version::V2 => fstype == "cgroup2",
            Version::V1 => fstype == "cgroup" && options.split(',').any(|o| o == "cpu"),
        };
        wanted.then(|| PathBuf::from(point))
    });
    let mount = mount.ok_or_else(|| format!("no {version:?} cpu controller is mounted"))?;
    // /proc/self/cgroup: hierarchy-id:controllers:path
    let path = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = match version {
            Version::V2 => controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "cpu"),
        };
        ours.then(|| path.trim_start_matches('/').to_string())
    });
    let group = mount.join(path.unwrap_or_default());
    if version == Version::V2 {
        let controllers = std::fs::read_to_string(group.join("cgroup.controllers")).unwrap_or_default();
        if !controllers.split_whitespace().any(|c| c == "cpu") {
            return Err(format!("the cpu controller is not enabled under {}", group.display()));
        }
    }
    Ok(group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_period_is_short_and_stretches_only_for_the_kernels_least_quota() {
        assert_eq!(quota_and_period(0.25), (2_500, 10_000));
        assert_eq!(quota_and_period(2.0), (20_000, 10_000));
        // 0.05 × 10 ms would be 500 µs, under the kernel's 1 ms: the period grows.
        assert_eq!(quota_and_period(0.05), (1_000, 20_000));
        assert_eq!(quota_and_period(1e-9), (1_000, 1_000_000));
    }

    /// Where this process may make control groups (root, a writable controller),
    /// a busy child in a quarter-core group is held back by the kernel. Elsewhere the
    /// refusal names why, and the test says so and stops.
    #[test]
    fn a_busy_process_in_a_quarter_core_group_is_held_back() {
        let quota = match CpuQuota::create(&format!("test-{}", std::process::id()), 0.25) {
            Ok(q) => q,
            Err(why) => {
                assert!(!why.is_empty());
                eprintln!("no CPU quota here ({why}): the agent falls back to the sleep throttle");
                return;
            }
        };
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        quota.add(child.id()).unwrap();
        let procs = std::fs::read_to_string(quota.path().join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|p| p.trim() == child.id().to_string()), "{procs}");
        child.wait().unwrap();
        assert!(
            quota.times_throttled().unwrap() > 0,
            "the kernel held it back at least once"
        );
        let dir = quota.path().to_path_buf();
        drop(quota);
        assert!(!dir.exists(), "the group is removed once its process ended");
    }

    #[test]
    fn two_groups_for_one_task_name_are_two_groups() {
        let (Ok(a), Ok(b)) = (
            CpuQuota::create("job-000001-r0", 0.5),
            CpuQuota::create("job-000001-r0", 0.25),
        ) else {
            eprintln!("no CPU quota here: nothing to share");
            return;
        };
        assert_ne!(a.path(), b.path());
    }

    #[test]
    fn a_quota_of_no_cores_is_refused() {
        assert!(CpuQuota::create("x", 0.0).unwrap_err().contains("0 cores"));
        assert!(CpuQuota::create("x", f64::NAN).is_err());
    }
}
