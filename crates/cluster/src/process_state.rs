//! Whether a worker process is stopped — by SIGSTOP, a terminal's Ctrl-Z or a
//! debugger — read from the kernel's own record (`/proc/PID/stat`).
//!
//! A stopped worker holds its job hostage: its peers wait on the data plane for
//! data it will not send, and its TCP connections stay healthy (the kernel still
//! answers for it), so neither keepalive nor the connection notices. The agent
//! checks its workers with [`is_stopped`] and kills one that stays stopped
//! (`AgentConfig::stopped_grace`), which the job then handles as a lost worker.

/// Whether process `pid` is stopped (state `T`) or stopped under a tracer (`t`).
/// `false` where `/proc` does not exist or the process is gone.
pub fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| state_of(&stat))
        .is_some_and(|s| s == 'T' || s == 't')
}

/// The state letter of a `/proc/PID/stat` line: the field after the command name,
/// which is in parentheses and may itself hold spaces and parentheses.
fn state_of(stat: &str) -> Option<char> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(state_of("42 (sleep) S 1 42"), Some('S'));
        assert_eq!(state_of("42 (a (b) c) T 1 42"), Some('T'));
        assert_eq!(state_of("garbage"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_stopped_process_reads_stopped_and_a_continued_one_does_not() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let signal = |sig: &str| {
            std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .unwrap()
        };
        assert!(!is_stopped(pid));
        signal("-STOP");
        // The kernel records the stop asynchronously; it is there within moments.
        let stopped = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            is_stopped(pid)
        });
        assert!(stopped);
        signal("-CONT");
        let running = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            !is_stopped(pid)
        });
        assert!(running);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_stopped(pid), "a process that is gone is not stopped");
    }
}
