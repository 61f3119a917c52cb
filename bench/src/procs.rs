//! Server processes as /proc sees them: CPU seconds spent and peak
//! resident memory, for Cairn's processes and the baseline's alike.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Clock ticks per second of /proc/<pid>/stat times; 100 on every Linux
/// build that matters here (`getconf CLK_TCK`).
const TICKS_PER_SECOND: f64 = 100.0;

/// What /proc/<pid>/stat says of a process.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub state: char,
    pub ppid: u32,
    /// utime, stime, cutime, cstime, in clock ticks.
    pub ticks: [u64; 4],
}

impl Stat {
    /// Not exited: neither a zombie nor dead.
    pub fn live(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

/// /proc/<pid>/stat of `pid`, if it exists.
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name may hold spaces and parentheses: split after the last ')'.
    // After it: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let mut ticks = [0u64; 4];
    for (t, v) in ticks.iter_mut().zip(fields.iter().skip(11)) {
        *t = v.parse().ok()?;
    }
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        ticks,
    })
}

/// Whether `pid` runs (exists and has not exited).
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.live())
}

/// CPU seconds of `pid` including children it has waited for (utime,
/// stime, cutime, cstime).
pub fn cpu_seconds(pid: u32) -> f64 {
    stat(pid).map_or(0.0, |s| {
        s.ticks.iter().sum::<u64>() as f64 / TICKS_PER_SECOND
    })
}

/// CPU seconds of the children `pid` has waited for (cutime, cstime).
pub fn waited_children_cpu(pid: u32) -> f64 {
    stat(pid).map_or(0.0, |s| (s.ticks[2] + s.ticks[3]) as f64 / TICKS_PER_SECOND)
}

/// Total CPU seconds of `pids` (duplicates counted once).
pub fn total_cpu(pids: &[u32]) -> f64 {
    let unique: HashSet<u32> = pids.iter().copied().collect();
    unique.into_iter().map(cpu_seconds).sum()
}

/// Live processes by parent, from one pass over /proc.
fn children_by_parent() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(s) = stat(pid).filter(Stat::live) {
                map.entry(s.ppid).or_default().push(pid);
            }
        }
    }
    map
}

/// Live children of `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut pids = children_by_parent().remove(&parent).unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// Every live process below `roots`, the roots themselves not included.
pub fn descendants(roots: &[u32]) -> Vec<u32> {
    let children = children_by_parent();
    let mut out = Vec::new();
    let mut frontier: Vec<u32> = roots.to_vec();
    while let Some(p) = frontier.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            out.push(c);
            frontier.push(c);
        }
    }
    out.sort_unstable();
    out
}

/// `roots` and every live process below them.
pub fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let mut out = descendants(roots);
    out.extend(roots);
    out.sort_unstable();
    out.dedup();
    out
}

/// A kB field of /proc/<pid>/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What a process is, for the report: its command line's first words.
pub fn describe(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let Some(first) = words.first() else {
        return format!("pid {pid}");
    };
    // nginx rewrites its command line: "nginx: master process /usr/sbin/…".
    if let Some((title, _)) = first.split_once(" /") {
        if title.contains(": ") {
            return title.to_owned();
        }
    }
    let prog = Path::new(first)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| first.clone());
    // "git upload-pack …", "git pack-objects …": the subcommand says what it is.
    match words.get(1) {
        Some(sub) if prog == "git" && !sub.starts_with('-') => format!("git {sub}"),
        _ => prog,
    }
}

/// Resets the kernel's peak-RSS mark (VmHWM) of `pid` so a later reading
/// covers only what follows; needs the right to write clear_refs.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Peak RSS per process of a tree of server processes, sampled every few
/// milliseconds while something runs. Long-lived processes report the
/// kernel's own high-water mark; short-lived children (the baseline's git
/// processes) are caught by the sampling.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<BTreeMap<u32, (String, u64)>>>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    /// Starts sampling `roots` and their descendants; `labels` names known
    /// pids (e.g. "node 1").
    pub fn start(roots: Vec<u32>, labels: HashMap<u32, String>) -> RssSampler {
        for pid in with_descendants(&roots) {
            reset_peak(pid);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Arc<Mutex<BTreeMap<u32, (String, u64)>>> = Arc::default();
        let (s, p) = (stop.clone(), peaks.clone());
        let thread = std::thread::spawn(move || {
            let mut names: HashMap<u32, String> = HashMap::new();
            loop {
                let done = s.load(Ordering::Relaxed);
                for pid in with_descendants(&roots) {
                    let Some(hwm) = status_bytes(pid, "VmHWM:") else {
                        continue;
                    };
                    let name = names
                        .entry(pid)
                        .or_insert_with(|| {
                            labels.get(&pid).cloned().unwrap_or_else(|| describe(pid))
                        })
                        .clone();
                    let mut map = p.lock().unwrap_or_else(PoisonError::into_inner);
                    let e = map.entry(pid).or_insert((name, 0));
                    e.1 = e.1.max(hwm);
                }
                if done {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    /// Stops sampling (after one last sample); peak bytes per process name,
    /// the largest of several processes of one name.
    pub fn finish(mut self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let map = self.peaks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for (name, bytes) in map.values() {
            // A process that exited between listing and reading.
            if *bytes == 0 {
                continue;
            }
            let e = out.entry(name.clone()).or_insert(0);
            *e = (*e).max(*bytes);
        }
        out
    }
}
