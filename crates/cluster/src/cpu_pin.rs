//! Which CPUs a worker may run on: an agent given a set (`hetero agent --cpus 1`,
//! or the sets `hetero local` and `hetero bench hetero` pack emulated devices into)
//! starts every worker pinned to it.
//!
//! ## Design
//! Emulated devices share one host. Unpinned, the kernel moves a full-speed worker
//! onto a core where a capped one is running, and the full-speed device computes
//! 10–20 % slower beside the others than alone — a cost separate machines would not
//! have, which a benchmark then blames on the job. Packed onto cores of their own
//! (a full-speed device on one, a 0.5 and a 0.25 device sharing another), every
//! device keeps its own core's caches and gets its quota's worth of time whatever
//! the others do. The affinity is set in the child between `fork` and `exec`, so
//! every thread the worker ever starts inherits it; a set the agent itself may not
//! use is refused by [`CpuSet::checked`] when the agent starts, not when a worker
//! fails to. Linux only: elsewhere no set can be read or pinned to.

use std::fmt;

/// The most CPUs a set may name (the kernel's `CPU_SETSIZE`).
pub const MAX_CPUS: usize = 1024;

/// A non-empty set of CPU numbers, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSet(Vec<usize>);

impl CpuSet {
    /// The set `text` names in the kernel's list format: `1`, `0-3`, `0,2-3`.
    pub fn parse(text: &str) -> Result<CpuSet, String> {
        // A bitmap, so a list that repeats a long range holds no more than MAX_CPUS.
        let mut named = vec![false; MAX_CPUS];
        for part in text.split(',').map(str::trim) {
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (cpu_number(a, text)?, cpu_number(b, text)?),
                None => {
                    let n = cpu_number(part, text)?;
                    (n, n)
                }
            };
            if first > last {
                return Err(format!("CPU list {text:?}: {part:?} runs backwards"));
            }
            named[first..=last].iter_mut().for_each(|n| *n = true);
        }
        let cpus = (0..MAX_CPUS).filter(|&c| named[c]).collect();
        CpuSet::of(cpus).ok_or_else(|| format!("CPU list {text:?} names no CPU"))
    }

    /// The set of `cpus`, or `None` when it is empty or names a CPU past [`MAX_CPUS`].
    pub fn of(mut cpus: Vec<usize>) -> Option<CpuSet> {
        cpus.sort_unstable();
        cpus.dedup();
        (!cpus.is_empty() && cpus.iter().all(|&c| c < MAX_CPUS)).then_some(CpuSet(cpus))
    }

    /// The CPUs this process may run on.
    #[cfg(not(target_os = "linux"))]
    pub fn allowed() -> Result<CpuSet, String> {
        Err("pinning workers to CPUs needs Linux".into())
    }

    /// The CPUs this process may run on.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    pub fn allowed() -> Result<CpuSet, String> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes
        // at most size_of::<cpu_set_t>() bytes into it, and CPU_ISSET reads within it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(format!(
                    "cannot read this process's CPUs: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let cpus = (0..MAX_CPUS).filter(|&c| libc::CPU_ISSET(c, &set)).collect();
            CpuSet::of(cpus).ok_or_else(|| "this process may run on no CPU".to_string())
        }
    }

    /// This set, or why the agent may not pin to it (a CPU it may not use itself).
    pub fn checked(self) -> Result<CpuSet, String> {
        let allowed = CpuSet::allowed()?;
        match self.0.iter().find(|c| !allowed.0.contains(c)) {
            Some(c) => Err(format!("CPU {c} is not one this host lets the agent use ({allowed})")),
            None => Ok(self),
        }
    }

    /// The CPU numbers, ascending.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// Makes `command`'s process, and every thread it starts, run on this set only
    /// (nothing where that needs Linux: [`CpuSet::checked`] refused every set).
    #[cfg(not(target_os = "linux"))]
    pub fn pin(&self, _command: &mut tokio::process::Command) {}

    /// Makes `command`'s process, and every thread it starts, run on this set only.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    pub fn pin(&self, command: &mut tokio::process::Command) {
        // SAFETY: a zeroed cpu_set_t is a valid empty set and CPU_SET writes within
        // it (every CPU is below MAX_CPUS = CPU_SETSIZE). The closure runs in the
        // child between fork and exec, where only async-signal-safe calls are
        // allowed: it makes one system call and allocates nothing.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &self.0 {
                libc::CPU_SET(c, &mut set);
            }
            command.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
}

fn cpu_number(part: &str, text: &str) -> Result<usize, String> {
    let part = part.trim();
    let not_a_number = || format!("CPU list {text:?}: {part:?} is not a CPU number");
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_a_number());
    }
    let n: usize = part.parse().map_err(|_| not_a_number())?;
    if n >= MAX_CPUS {
        return Err(format!(
            "CPU list {text:?}: CPU {n} is past the last one ({})",
            MAX_CPUS - 1
        ));
    }
    Ok(n)
}

impl fmt::Display for CpuSet {
    /// The kernel's list format, runs joined: `0-2,5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &c in &self.0 {
            match runs.last_mut() {
                Some((_, last)) if *last + 1 == c => *last = c,
                _ => runs.push((c, c)),
            }
        }
        let parts: Vec<String> = runs
            .iter()
            .map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Packs devices onto `cpus`: `demands[d]` is device `d`'s cores' worth of time
/// (its speed cap × threads × workers). Returns each device's CPUs, in the order
/// given, or why they do not fit.
///
/// Largest first, a device of at most one core goes to the CPU whose time left
/// fits it most tightly; a larger one takes whole free CPUs and the tightest fit
/// for its remainder. So 1 / 0.5 / 0.25 is a CPU for the full-speed device and one
/// shared by the others, and no CPU is asked for more than its whole time.
pub fn pack(demands: &[f64], cpus: &CpuSet) -> Result<Vec<CpuSet>, String> {
    // Caps come as f32 (0.8 + 0.2 is 1.0000000149 widened): a millionth of a core
    // is no more than rounding.
    const SLACK: f64 = 1e-6;
    if let Some(d) = demands.iter().find(|d| !(**d > 0.0 && d.is_finite())) {
        return Err(format!("a device asks for {d} cores"));
    }
    let total: f64 = demands.iter().sum();
    let n = cpus.0.len();
    let too_many = || match total > n as f64 + SLACK {
        true => format!("the devices ask for {total:.2} cores' worth of time and this host lets them use {n} ({cpus})"),
        false => format!(
            "the devices' {total:.2} cores' worth of time does not split onto {n} CPUs ({cpus}) without one device spanning two"
        ),
    };
    let mut left = vec![1.0f64; cpus.0.len()];
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| demands[b].total_cmp(&demands[a]));
    let mut placed = vec![Vec::new(); demands.len()];
    for d in order {
        let whole = (demands[d] - SLACK).floor().max(0.0) as usize;
        let rest = demands[d] - whole as f64;
        let free: Vec<usize> = (0..left.len()).filter(|&c| left[c] >= 1.0 - SLACK).collect();
        if free.len() < whole {
            return Err(too_many());
        }
        for &c in &free[..whole] {
            left[c] = 0.0;
            placed[d].push(cpus.0[c]);
        }
        let tightest = (0..left.len())
            .filter(|&c| left[c] + SLACK >= rest && !placed[d].contains(&cpus.0[c]))
            .min_by(|&a, &b| left[a].total_cmp(&left[b]));
        let c = tightest.ok_or_else(too_many)?;
        left[c] -= rest;
        placed[d].push(cpus.0[c]);
    }
    Ok(placed
        .into_iter()
        .map(|p| CpuSet::of(p).expect("every device got a CPU below MAX_CPUS"))
        .collect())
}

/// The cores an agent's workers compute on: its pinned CPUs, else the host's.
pub fn cores(pinned: Option<&CpuSet>) -> u32 {
    match pinned {
        Some(cpus) => cpus.0.len() as u32,
        None => std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
    }
}

/// [`pack`] onto the CPUs this process may use.
pub fn pack_here(demands: &[f64]) -> Result<Vec<CpuSet>, String> {
    pack(demands, &CpuSet::allowed()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> CpuSet {
        CpuSet::parse(text).unwrap()
    }

    #[test]
    fn lists_parse_and_print_in_the_kernels_format() {
        assert_eq!(set("3,0-1").cpus(), &[0, 1, 3]);
        assert_eq!(set(" 2 , 1-2 ").to_string(), "1-2");
        assert_eq!(set("0-2,5,6").to_string(), "0-2,5-6");
        for (bad, why) in [
            ("", "not a CPU number"),
            ("+3", "not a CPU number"),
            ("a", "not a CPU number"),
            ("3-1", "runs backwards"),
            ("1,,2", "not a CPU number"),
            ("5000", "past the last one"),
            ("0-99999999999", "past the last one"),
        ] {
            let e = CpuSet::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_full_speed_device_gets_a_cpu_of_its_own_and_slower_ones_share() {
        let placed = pack(&[0.25, 1.0, 0.5], &set("0-1")).unwrap();
        assert_eq!(placed, vec![set("1"), set("0"), set("1")]);
        // As the command line gives them: f32 caps that fill each CPU exactly.
        let caps: Vec<f64> = [0.8f32, 0.8, 0.2].iter().map(|&c| c as f64).collect();
        let placed = pack(&caps, &set("4,7")).unwrap();
        assert_eq!(placed, vec![set("4"), set("7"), set("4")]);
        let caps: Vec<f64> = [0.6f32, 0.4, 0.3, 0.7].iter().map(|&c| c as f64).collect();
        assert_eq!(
            pack(&caps, &set("0-1")).unwrap(),
            vec![set("1"), set("1"), set("0"), set("0")]
        );
        // Two cores' worth with a remainder: two whole CPUs and the tightest fit.
        let placed = pack(&[2.5, 0.5, 0.5], &set("0-3")).unwrap();
        assert_eq!(placed, vec![set("0-2"), set("2"), set("3")]);
    }

    #[test]
    fn no_cpu_is_asked_for_more_than_its_time() {
        let e = pack(&[1.0, 1.0, 0.25], &set("0-1")).unwrap_err();
        assert!(e.contains("2.25 cores") && e.contains("use 2 (0-1)"), "{e}");
        assert!(pack(&[0.6, 0.6], &set("0")).is_err());
        // Enough time in all, but no device may span two CPUs that others share.
        let e = pack(&[0.6, 0.6, 0.6], &set("0-1")).unwrap_err();
        assert!(e.contains("does not split onto 2 CPUs"), "{e}");
        assert!(pack(&[0.0], &set("0")).is_err());
        assert!(pack(&[f64::NAN], &set("0")).is_err());
    }

    #[test]
    fn a_pinned_child_and_its_threads_run_only_on_its_cpus() {
        let allowed = CpuSet::allowed().unwrap();
        if allowed.cpus().len() < 2 {
            eprintln!("one CPU here ({allowed}): a pinned child could run nowhere else");
            return;
        }
        let one = CpuSet::of(vec![*allowed.cpus().last().unwrap()]).unwrap();
        assert!(one.clone().checked().is_ok());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = rt.block_on(async {
            let mut cmd = tokio::process::Command::new("sh");
            // The shell's own affinity, as the kernel reports it.
            cmd.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
            one.pin(&mut cmd);
            cmd.output().await.unwrap()
        });
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.split(':').nth(1).map(str::trim),
            Some(one.to_string().as_str()),
            "{text}"
        );
        let past = CpuSet::of(vec![MAX_CPUS - 1]).unwrap();
        if !allowed.cpus().contains(&(MAX_CPUS - 1)) {
            assert!(past.checked().unwrap_err().contains("not one this host lets"));
        }
    }
}
