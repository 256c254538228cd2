//! The coordinator's embedded store (redb): jobs, nodes and every log line.
//!
//! Every change the coordinator accepts is committed here before the call that
//! caused it returns, so a coordinator killed at any moment and started again on
//! the same file still lists every job it accepted, with its logs.
//!
//! A write that fails on I/O (a full disk) fails its call, and redb then refuses
//! every later transaction until the database is opened again; the store closes it
//! at once and reopens it on the next call, so the coordinator goes on writing once
//! the disk has room, without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::ClusterError;
use crate::alerts::AlertRecord;
use crate::records::{JobRecord, NodeRecord};

const JOBS: TableDefinition<&str, &str> = TableDefinition::new("jobs");
const NODES: TableDefinition<&str, &str> = TableDefinition::new("nodes");
const LOGS: TableDefinition<(&str, u64), &str> = TableDefinition::new("logs");
const ALERTS: TableDefinition<u64, &str> = TableDefinition::new("alerts");

/// One stored log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Position in the job's log, from 1.
    pub seq: u64,
    /// Worker rank, or −1 for the coordinator.
    pub rank: i32,
    /// When (Unix ms).
    pub unix_ms: i64,
    /// What the line is.
    pub kind: LogKind,
    /// The line.
    pub text: String,
}

/// What a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// A line a worker printed.
    Log,
    /// A worker's progress event (JSON, [`hetero_job::events::Event`]).
    Event,
    /// A change of a job or a worker, written by the coordinator.
    State,
}

impl LogKind {
    /// Its name, as stored and sent.
    pub fn name(self) -> &'static str {
        match self {
            LogKind::Log => "log",
            LogKind::Event => "event",
            LogKind::State => "state",
        }
    }
}

/// The database (closed after an I/O error, until the next call reopens it).
pub struct Store {
    db: Mutex<Option<Database>>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, ClusterError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ClusterError::io(format!("creating {}", dir.display()), e))?;
        }
        // The store names every job, node and log line: the owner's alone (0600),
        // from its first byte (redb initialises an empty file), and tightened if an
        // older version left it readable.
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let created = options
            .open(path)
            .map_err(|e| ClusterError::io(format!("creating {}", path.display()), e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            created
                .set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| ClusterError::io(format!("making {} private (0600)", path.display()), e))?;
        }
        drop(created);
        let store = Store {
            db: Mutex::new(None),
            path: path.to_path_buf(),
        };
        store.write(|tx| {
            tx.open_table(JOBS)?;
            tx.open_table(NODES)?;
            tx.open_table(LOGS)?;
            tx.open_table(ALERTS)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Store {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Runs `f` on the database, opening it first if it is closed; an I/O error
    /// closes it (see the module's doc).
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, redb::Error>) -> Result<T, ClusterError> {
        let mut slot: MutexGuard<'_, Option<Database>> = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let db = Database::create(&self.path).map_err(|e| self.err(format!("cannot open: {e}")))?;
            *slot = Some(db);
        }
        let result = f(slot.as_ref().expect("opened above"));
        if let Err(redb::Error::Io(_) | redb::Error::PreviousIo) = &result {
            *slot = None;
        }
        result.map_err(|e| self.err(e))
    }

    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>) -> Result<(), ClusterError> {
        self.with_db(|db| {
            let tx = db.begin_write()?;
            f(&tx)?;
            Ok(tx.commit()?)
        })
    }

    /// The stored strings of a table's rows.
    fn rows(&self, def: TableDefinition<&str, &str>) -> Result<Vec<(String, String)>, ClusterError> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(def)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                out.push((k.value().to_string(), v.value().to_string()));
            }
            Ok(out)
        })
    }

    /// Saves (inserts or replaces) a job.
    pub fn put_job(&self, job: &JobRecord) -> Result<(), ClusterError> {
        let json = serde_json::to_string(job).expect("records serialise");
        self.write(|tx| {
            tx.open_table(JOBS)?.insert(job.job_id.as_str(), json.as_str())?;
            Ok(())
        })
    }

    /// Saves (inserts or replaces) a node.
    pub fn put_node(&self, node: &NodeRecord) -> Result<(), ClusterError> {
        let json = serde_json::to_string(node).expect("records serialise");
        self.write(|tx| {
            tx.open_table(NODES)?.insert(node.agent_id.as_str(), json.as_str())?;
            Ok(())
        })
    }

    /// Appends log lines to a job's log.
    pub fn append_logs(&self, job_id: &str, lines: &[LogRecord]) -> Result<(), ClusterError> {
        if lines.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut t = tx.open_table(LOGS)?;
            for l in lines {
                let json = serde_json::to_string(l).expect("records serialise");
                t.insert((job_id, l.seq), json.as_str())?;
            }
            Ok(())
        })
    }

    fn all<T: for<'de> Deserialize<'de>>(&self, def: TableDefinition<&str, &str>) -> Result<Vec<T>, ClusterError> {
        self.rows(def)?
            .into_iter()
            .map(|(k, v)| serde_json::from_str(&v).map_err(|e| self.err(format!("record {k} is corrupt: {e}"))))
            .collect()
    }

    /// Stored JSON values read back, each one `what` for the error that names a
    /// corrupt one.
    fn parse_each<T: for<'de> Deserialize<'de>>(&self, values: &[String], what: &str) -> Result<Vec<T>, ClusterError> {
        values
            .iter()
            .map(|v| serde_json::from_str(v).map_err(|e| self.err(format!("corrupt {what}: {e}"))))
            .collect()
    }

    /// Every job, in id order.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, ClusterError> {
        self.all(JOBS)
    }

    /// Every node.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, ClusterError> {
        self.all(NODES)
    }

    /// A job's log lines with `seq > after`, at most `limit` of them.
    pub fn logs(&self, job_id: &str, after: u64, limit: usize) -> Result<Vec<LogRecord>, ClusterError> {
        let lines = self.with_db(|db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(LOGS)?;
            let mut out = Vec::new();
            for row in table
                .range((job_id, after.saturating_add(1))..=(job_id, u64::MAX))?
                .take(limit)
            {
                out.push(row?.1.value().to_string());
            }
            Ok(out)
        })?;
        self.parse_each(&lines, "log line")
    }

    /// Saves an alert.
    pub fn put_alert(&self, alert: &AlertRecord) -> Result<(), ClusterError> {
        let json = serde_json::to_string(alert).expect("records serialise");
        self.write(|tx| {
            tx.open_table(ALERTS)?.insert(alert.id, json.as_str())?;
            Ok(())
        })
    }

    /// Alerts with `id > after`, oldest first.
    pub fn alerts(&self, after: u64) -> Result<Vec<AlertRecord>, ClusterError> {
        let alerts = self.with_db(|db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(ALERTS)?;
            let mut out = Vec::new();
            for row in table.range(after.saturating_add(1)..)? {
                out.push(row?.1.value().to_string());
            }
            Ok(out)
        })?;
        self.parse_each(&alerts, "alert")
    }

    /// The highest log sequence number of a job (0 when it has none).
    pub fn last_log_seq(&self, job_id: &str) -> Result<u64, ClusterError> {
        self.with_db(|db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(LOGS)?;
            let last = table
                .range((job_id, 0)..=(job_id, u64::MAX))?
                .next_back()
                .transpose()?
                .map(|(k, _)| k.value().1);
            Ok(last.unwrap_or(0))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::JobState;

    fn job(id: &str) -> JobRecord {
        JobRecord {
            job_id: id.into(),
            name: "n".into(),
            spec_json: "{}".into(),
            workers: 2,
            program: String::new(),
            threads_per_worker: 0,
            output_dir: "/tmp".into(),
            state: JobState::Queued,
            message: String::new(),
            submitted_ms: 1,
            started_ms: 0,
            finished_ms: 0,
            tasks: vec![],
            summary_json: String::new(),
            priority: 0,
            after: vec![],
            policy: Default::default(),
            device: "cpu".into(),
            memory_per_worker_mb: 0,
            weighted: false,
            migratable: false,
            server: false,
            formed: false,
            rendezvous: Default::default(),
        }
    }

    /// A tmpfs of `mib` MiB mounted on a fresh folder, unmounted when dropped.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        /// `None` where this process may not mount (not root).
        fn mount(mib: u32) -> Option<Tmpfs> {
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Tmpfs(dir))
        }

        /// Takes every byte left.
        fn fill(&self) -> std::path::PathBuf {
            let filler = self.0.path().join("filler");
            let mut f = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 64 << 10];
            while std::io::Write::write_all(&mut f, &block).is_ok() {}
            filler
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_fails_the_write_and_the_store_writes_again_once_there_is_room() {
        // Mounting needs root, which CI and the test bed have.
        let Some(fs) = Tmpfs::mount(4) else {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        };
        let s = Store::open(&fs.0.path().join("c.redb")).unwrap();
        s.put_job(&job("job-000001")).unwrap();
        let filler = fs.fill();
        let mut big = job("job-000002");
        big.spec_json = "x".repeat(256 << 10);
        let err = s.put_job(&big).unwrap_err().to_string();
        assert!(err.contains("c.redb"), "{err}");
        std::fs::remove_file(filler).unwrap();
        // redb refuses every transaction after an I/O error until reopened: the store
        // reopens it by itself.
        s.put_job(&big).unwrap();
        let ids: Vec<String> = s.jobs().unwrap().into_iter().map(|j| j.job_id).collect();
        assert_eq!(ids, ["job-000001", "job-000002"]);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put_job(&job("job-000001")).unwrap();
            let mut j = job("job-000002");
            j.state = JobState::Running;
            s.put_job(&j).unwrap();
            let line = |seq| LogRecord {
                seq,
                rank: 0,
                unix_ms: 0,
                kind: LogKind::Log,
                text: format!("line {seq}"),
            };
            s.append_logs("job-000002", &[line(1), line(2), line(3)]).unwrap();
            s.append_logs("job-000001", &[line(1)]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let jobs = s.jobs().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].state, JobState::Running);
        let logs = s.logs("job-000002", 1, 10).unwrap();
        assert_eq!(logs.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.last_log_seq("job-000002").unwrap(), 3);
        assert_eq!(s.last_log_seq("job-000003").unwrap(), 0);
    }
}
