//! Supervising one replica group of local `whaleflux-worker` processes: start them, wait until
//! every process is ready (progress bars on a terminal, log lines otherwise), restart the whole
//! group when a process dies (within the restart budget), hand a fatal GPU fault back to be
//! re-planned without that GPU, and stop them cleanly on a signal.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use whaleflux_crds::worker::{
    EXIT_GPU_FAULT, EXIT_GROUP_FAILED, GROUP_SECRET_ENV, POD_NAME_ENV, VISIBLE_DEVICES_ENV,
    faulty_gpu_uuid,
};

use super::RunError;
use super::http;

/// How often the supervisor looks at its processes.
const TICK: Duration = Duration::from_millis(100);
/// Longest a readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// The window the restart budget counts restarts in.
const BUDGET_WINDOW: Duration = Duration::from_secs(3600);
/// How long to let the peers of a dead process follow it before reporting who died.
const SETTLE: Duration = Duration::from_millis(300);
/// Lines of a dead process's log shown with the news.
const LOG_TAIL_LINES: usize = 8;

/// One worker process of the group.
#[derive(Debug, Clone)]
pub(crate) struct Rank {
    /// How logs name it: `stage 1` or `stage 1 tp 2`.
    pub label: String,
    /// Where its `/readyz` answers.
    pub probe: SocketAddr,
    /// Its rendered configuration file.
    pub config: PathBuf,
    /// File its standard output and error go to (appended across restarts).
    pub log: PathBuf,
    /// Where it reports a fatal GPU fault before exiting (created empty at each start).
    pub termination_log: PathBuf,
    /// UUIDs of its GPUs, given to it as `CUDA_VISIBLE_DEVICES` (none on CPU slots).
    pub gpus: Vec<String>,
}

/// Everything needed to run the group.
#[derive(Debug, Clone)]
pub(crate) struct GroupSpec {
    /// The `whaleflux-worker` executable.
    pub worker: PathBuf,
    /// Address every process listens on (`--host`).
    pub host: String,
    /// Group secret the processes present to each other.
    pub secret: String,
    /// The processes, stage-major.
    pub ranks: Vec<Rank>,
    /// Longest the group may take to become ready.
    pub ready_timeout: Duration,
    /// How long processes get to exit after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
}

/// Group restarts allowed per hour (`spec.failover.restartBudget`), counted across re-plans.
#[derive(Debug, Clone)]
pub(crate) struct RestartBudget {
    per_hour: u32,
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    pub(crate) fn new(per_hour: u32) -> Self {
        Self {
            per_hour,
            recent: VecDeque::new(),
        }
    }

    /// Counts one restart at `now`, or says the hour's budget is spent (counting nothing).
    /// Returns the restarts counted this hour.
    fn take(&mut self, now: Instant) -> Option<usize> {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > BUDGET_WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() as u64 >= u64::from(self.per_hour) {
            return None;
        }
        self.recent.push_back(now);
        Some(self.recent.len())
    }
}

/// How a supervised group ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A stop signal: every process stopped.
    Stopped,
    /// A rank stopped on a fatal fault of one of the group's GPUs (counted as a restart):
    /// every process stopped, and the group is to be planned again without that GPU.
    GpuFailed {
        /// The GPU's UUID.
        uuid: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Spawned, HTTP not answering yet.
    Starting,
    /// HTTP answers, `/readyz` not yet 200 (loading its part of the model, meeting peers).
    Loading,
    /// `/readyz` answered 200.
    Ready,
}

struct Proc {
    child: Child,
    state: State,
    since: Instant,
}

/// Progress of one start-up of the group: bars on a terminal, log lines otherwise.
struct Ui {
    /// Kept so the bars stay drawn together while they live.
    _multi: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    bars: Vec<ProgressBar>,
}

impl Ui {
    fn new(ranks: &[Rank]) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                _multi: None,
                overall: None,
                bars: Vec::new(),
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall_style =
            ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} ready [{elapsed}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        let overall = multi.add(ProgressBar::new(ranks.len() as u64));
        overall.set_style(overall_style);
        overall.set_prefix("worker group");
        let style = ProgressStyle::with_template("{prefix:>14} {spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = ranks
            .iter()
            .map(|r| {
                let b = multi.add(ProgressBar::new_spinner());
                b.set_style(style.clone());
                b.set_prefix(r.label.clone());
                b.set_message("starting the process");
                b.enable_steady_tick(Duration::from_millis(120));
                b
            })
            .collect();
        Self {
            _multi: Some(multi),
            overall: Some(overall),
            bars,
        }
    }

    fn update(&self, i: usize, rank: &Rank, state: State, took: Duration) {
        match (self.bars.get(i), state) {
            (Some(b), State::Loading) => b.set_message("loading the model, meeting peers"),
            (Some(b), State::Ready) => {
                b.finish_with_message(format!("ready in {:.1} s", took.as_secs_f64()));
                if let Some(o) = &self.overall {
                    o.inc(1);
                }
            }
            (Some(_), State::Starting) => {}
            (None, State::Loading) => {
                tracing::info!("{}: listening; loading the model", rank.label)
            }
            (None, State::Ready) => {
                tracing::info!("{}: ready in {:.1} s", rank.label, took.as_secs_f64())
            }
            (None, State::Starting) => {}
        }
    }

    fn clear(&self) {
        for b in &self.bars {
            b.finish_and_clear();
        }
        if let Some(o) = &self.overall {
            o.finish_and_clear();
        }
    }
}

/// Starts one process of the group.
fn spawn(spec: &GroupSpec, rank: &Rank) -> Result<Child, RunError> {
    let io = |what: String| move |source| RunError::Io { what, source };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&rank.log)
        .map_err(io(format!("opening {}", rank.log.display())))?;
    let err_log = log
        .try_clone()
        .map_err(io(format!("opening {}", rank.log.display())))?;
    // The worker writes a fatal GPU fault only into a file that exists, as the kubelet's.
    std::fs::write(&rank.termination_log, "")
        .map_err(io(format!("creating {}", rank.termination_log.display())))?;
    let mut cmd = Command::new(&spec.worker);
    cmd.arg("serve")
        .arg("--config")
        .arg(&rank.config)
        .arg("--host")
        .arg(&spec.host)
        .arg("--termination-log")
        .arg(&rank.termination_log)
        .env(GROUP_SECRET_ENV, &spec.secret)
        .env_remove(POD_NAME_ENV)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log);
    if !rank.gpus.is_empty() {
        cmd.env(VISIBLE_DEVICES_ENV, rank.gpus.join(","));
    }
    {
        use std::os::unix::process::CommandExt;
        // Its own process group: a Ctrl-C on the terminal reaches only `whaleflux run`, which
        // then stops the workers in order.
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent; it makes
        // the kernel kill the worker if `whaleflux run` itself dies without cleaning up.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(io(format!(
        "starting {} for {}",
        spec.worker.display(),
        rank.label
    )))
}

/// An exit seen by a watcher: start-up generation, process index.
type ExitNews = (u64, usize);

/// Waits (in a thread) until process `pid` has exited, without reaping it (`WNOWAIT`: the
/// supervisor reaps, so the pid cannot be reused while it may still signal it), and sends
/// `(generation, index)`. Exits arrive in the order they happened, so the process that died
/// first is the one named, not a peer that failed because of it.
fn watch(pid: u32, news: (u64, usize), tx: Sender<ExitNews>) {
    std::thread::spawn(move || {
        let id = libc::id_t::from(pid);
        loop {
            // SAFETY: siginfo_t is plain data and all-zero is a valid value; waitid(2) writes
            // into it and, with WNOWAIT, leaves the child to be reaped by its owner.
            let rc = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT)
            };
            if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        let _ = tx.send(news);
    });
}

fn start_all(
    spec: &GroupSpec,
    generation: u64,
    tx: &Sender<ExitNews>,
) -> Result<Vec<Proc>, RunError> {
    let mut procs = Vec::with_capacity(spec.ranks.len());
    for (i, rank) in spec.ranks.iter().enumerate() {
        match spawn(spec, rank) {
            Ok(child) => {
                tracing::debug!(pid = child.id(), "{}: started", rank.label);
                watch(child.id(), (generation, i), tx.clone());
                procs.push(Proc {
                    child,
                    state: State::Starting,
                    since: Instant::now(),
                });
            }
            Err(e) => {
                stop_all(spec, &mut procs);
                return Err(e);
            }
        }
    }
    Ok(procs)
}

fn signal_group(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the process group this supervisor created for the worker
        // (process_group(0) at spawn); it touches no memory.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

/// SIGTERM every live process, wait up to the grace period, then SIGKILL what is left and
/// reap everything, so no worker outlives the call.
fn stop_all(spec: &GroupSpec, procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if matches!(p.child.try_wait(), Ok(None)) {
            signal_group(&p.child, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + spec.stop_grace;
    loop {
        let mut alive = 0;
        for p in procs.iter_mut() {
            if matches!(p.child.try_wait(), Ok(None)) {
                alive += 1;
            }
        }
        if alive == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (p, rank) in procs.iter_mut().zip(&spec.ranks) {
        if matches!(p.child.try_wait(), Ok(None)) {
            tracing::warn!(
                "{}: still running {:.0} s after SIGTERM; killing it",
                rank.label,
                spec.stop_grace.as_secs_f64()
            );
            signal_group(&p.child, libc::SIGKILL);
        }
        let _ = p.child.wait();
    }
}

/// A process that has exited: index, pid, status.
type Exit = (usize, u32, ExitStatus);

/// Rank `i` exited with [`EXIT_GPU_FAULT`] and its report names one of the group's GPUs:
/// (rank, the GPU's UUID, the report).
fn gpu_fault(spec: &GroupSpec, i: usize, status: ExitStatus) -> Option<(usize, String, String)> {
    if status.code() != Some(EXIT_GPU_FAULT) {
        return None;
    }
    let report = std::fs::read_to_string(&spec.ranks.get(i)?.termination_log).ok()?;
    let uuid = faulty_gpu_uuid(&report)?;
    spec.ranks
        .iter()
        .any(|r| r.gpus.iter().any(|g| g == uuid))
        .then(|| (i, uuid.to_string(), report.trim().to_string()))
}

/// Reaps the processes that have exited, `first` (the first news) and those whose news
/// followed, then any other that has exited by now. Returns the one to blame first — the first
/// that died of a signal (killed or crashed; its peers notice its sockets close, often before
/// it is fully gone, and exit on their own), else the first that did not exit because its
/// group failed, else the first reported — and the rest.
fn reap(procs: &mut [Proc], first: usize, news: &[usize]) -> (Exit, Vec<Exit>) {
    let mut order = vec![first];
    order.extend(news.iter().copied().filter(|j| *j != first));
    order.extend((0..procs.len()).filter(|j| !news.contains(j) && *j != first));
    let mut exited: Vec<Exit> = order
        .into_iter()
        .filter_map(|j| {
            let p = &mut procs[j];
            match p.child.try_wait() {
                Ok(Some(status)) => Some((j, p.child.id(), status)),
                _ => None,
            }
        })
        .collect();
    let blame = exited
        .iter()
        .position(|(_, _, st)| st.signal().is_some())
        .or_else(|| {
            exited
                .iter()
                .position(|(_, _, st)| st.code() != Some(EXIT_GROUP_FAILED))
        })
        .unwrap_or(0);
    if exited.is_empty() {
        // The news came but the status is gone (reaped elsewhere): report what is known.
        let pid = procs[first].child.id();
        return ((first, pid, ExitStatus::from_raw(0)), Vec::new());
    }
    let culprit = exited.remove(blame);
    (culprit, exited)
}

/// The last lines of a log file, indented, for error messages; when the process ended with an
/// error report (`Error: ...`, possibly followed by a backtrace), from that report on.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = match lines.iter().rposition(|l| l.starts_with("Error: ")) {
        Some(i) => i,
        None => lines.len().saturating_sub(LOG_TAIL_LINES),
    };
    lines[start..]
        .iter()
        .take(LOG_TAIL_LINES)
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Probes the processes that are not ready yet; true when all are.
fn probe(spec: &GroupSpec, procs: &mut [Proc], ui: &Ui) -> bool {
    for (i, (p, rank)) in procs.iter_mut().zip(&spec.ranks).enumerate() {
        if p.state == State::Ready {
            continue;
        }
        let state = match http::get(rank.probe, "/readyz", PROBE_TIMEOUT) {
            Ok(r) if r.status == 200 => State::Ready,
            Ok(_) => State::Loading,
            Err(_) => p.state,
        };
        if state != p.state {
            let took = p.since.elapsed();
            p.state = state;
            ui.update(i, rank, state, took);
        }
    }
    procs.iter().all(|p| p.state == State::Ready)
}

/// Runs the group until `shutdown` is set (then stops it and returns `Ok`), or until it cannot
/// go on: a process dies before the group was ever ready, the restart budget is spent, or the
/// group is not ready within the timeout. `on_ready` is called each time the whole group
/// becomes ready, with `true` the first time.
pub(crate) fn supervise(
    spec: &GroupSpec,
    shutdown: &AtomicBool,
    budget: &mut RestartBudget,
    mut on_ready: impl FnMut(bool),
) -> Result<Outcome, RunError> {
    let (tx, exits) = channel::<ExitNews>();
    let mut generation = 0u64;
    let mut ui = Ui::new(&spec.ranks);
    let mut procs = start_all(spec, generation, &tx)?;
    let mut started = Instant::now();
    let mut ready = false;
    let mut ever_ready = false;
    loop {
        if shutdown.load(Ordering::SeqCst) {
            ui.clear();
            tracing::info!("shutting down: stopping {} worker process(es)", procs.len());
            stop_all(spec, &mut procs);
            tracing::info!("all worker processes stopped");
            return Ok(Outcome::Stopped);
        }
        let exited = match exits.recv_timeout(TICK) {
            Ok((g, i)) if g == generation => Some(i),
            _ => None,
        };
        if let Some(i) = exited {
            ui.clear();
            // Peers notice a dead process within a moment and exit too; let them, so the news
            // says who went first and who followed.
            std::thread::sleep(SETTLE);
            let mut news = Vec::new();
            while let Ok((g, j)) = exits.try_recv() {
                if g == generation {
                    news.push(j);
                }
            }
            let ((i, pid, status), others) = reap(&mut procs, i, &news);
            // A fatal fault of one of the group's GPUs, reported by the rank that saw it.
            let gpu_fault = std::iter::once(&(i, pid, status))
                .chain(&others)
                .find_map(|(j, _, st)| gpu_fault(spec, *j, *st));
            let rank = &spec.ranks[i];
            let status = if others.is_empty() {
                status.to_string()
            } else {
                let others: Vec<String> = others
                    .iter()
                    .map(|(j, pid, st)| format!("{} (pid {pid}, {st})", spec.ranks[*j].label))
                    .collect();
                format!("{status} (then: {})", others.join(", "))
            };
            let tail = log_tail(&rank.log);
            // A GPU fault is no fault of the configuration: it is re-planned even while the
            // group starts.
            if !ever_ready && gpu_fault.is_none() {
                stop_all(spec, &mut procs);
                return Err(RunError::Group(format!(
                    "{} (pid {pid}) exited with {status} while the group was starting; the end of its log {}:\n{tail}",
                    rank.label,
                    rank.log.display()
                )));
            }
            let Some(count) = budget.take(Instant::now()) else {
                stop_all(spec, &mut procs);
                return Err(RunError::Group(format!(
                    "{} (pid {pid}) exited with {status}, and the restart budget of {} group restart(s) per hour (spec.failover.restartBudget) is spent; giving up. The end of its log {}:\n{tail}",
                    rank.label,
                    budget.per_hour,
                    rank.log.display()
                )));
            };
            stop_all(spec, &mut procs);
            if let Some((j, uuid, report)) = gpu_fault {
                tracing::warn!(
                    "{} stopped on a fatal fault of its GPU {uuid} ({report}); planning the group again without that GPU (restart {count} of {} this hour)",
                    spec.ranks[j].label,
                    budget.per_hour
                );
                return Ok(Outcome::GpuFailed { uuid });
            }
            tracing::warn!(
                "{} (pid {pid}) exited with {status}; restarting the group (restart {count} of {} this hour); the end of its log:\n{tail}",
                rank.label,
                budget.per_hour
            );
            generation += 1;
            ui = Ui::new(&spec.ranks);
            procs = start_all(spec, generation, &tx)?;
            started = Instant::now();
            ready = false;
            continue;
        }
        if !ready {
            if probe(spec, &mut procs, &ui) {
                ready = true;
                ui.clear();
                tracing::info!(
                    "worker group ready: {} process(es) in {:.1} s",
                    procs.len(),
                    started.elapsed().as_secs_f64()
                );
                on_ready(!ever_ready);
                ever_ready = true;
            } else if started.elapsed() > spec.ready_timeout {
                ui.clear();
                let waiting: Vec<&str> = procs
                    .iter()
                    .zip(&spec.ranks)
                    .filter(|(p, _)| p.state != State::Ready)
                    .map(|(_, r)| r.label.as_str())
                    .collect();
                stop_all(spec, &mut procs);
                return Err(RunError::Group(format!(
                    "the worker group was not ready within {} s (--ready-timeout); not ready: {}",
                    spec.ready_timeout.as_secs(),
                    waiting.join(", ")
                )));
            }
        }
    }
}
