//! Clients in their own OS processes: the test binary started again as
//! `harness::chaos_client_process`, reporting on stdout and told what to do on stdin — and
//! killed with SIGKILL, or stopped with SIGSTOP, by the faults.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex};

use etcd_coord::BackgroundTasks;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::client::{client_loop, resume_and_release, Control, Resume};
use super::report::{mono_ns, Report, Shared, Sink, REPORT};
use super::{connect, count_panics, Broken, Primitive, Secure, PANICS, TTL};

/// The environment variable that turns the chaos test binary into a client process:
/// `<id> <primitive> <name> <endpoint>`.
const CLIENT_ENV: &str = "ETCD_COORD_CHAOS_CLIENT";
/// What a restarted client process takes back first: `<lease> <key> <token> <delay ms>` of the
/// lock its killed predecessor held, and how long it waits before it tries (empty: nothing).
const RESUME_ENV: &str = "ETCD_COORD_CHAOS_RESUME";
/// How a client process reaches a secured etcd: `<CA file> <user> <password>` (empty: plain).
pub const SECURE_ENV: &str = "ETCD_COORD_CHAOS_SECURE";
/// How a client process deliberately misbehaves (empty: it does not).
const BROKEN_ENV: &str = "ETCD_COORD_CHAOS_BROKEN";

/// The entry point of a client process (see `chaos_client_process`): runs one client whose
/// configuration is in [`CLIENT_ENV`], reporting on stdout, until `stop` arrives on stdin
/// (or stdin closes); `go` lets a release proceed, `long` makes the next acquisition a long
/// hold, `let-go` ends it, `healed` says the faults are over. Then it checks that every
/// session task it started has ended and that nothing panicked, and reports `done`.
pub fn client_process_main() {
    let Ok(config) = std::env::var(CLIENT_ENV) else {
        return; // not started by the harness: nothing to do
    };
    let words: Vec<&str> = config.split_whitespace().collect();
    let [id, primitive, name, endpoint] = words[..] else {
        panic!("bad {CLIENT_ENV}: {config}");
    };
    let (id, primitive) = (
        id.parse::<usize>().expect("an id"),
        Primitive::parse(primitive),
    );
    let env = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
    let broken = env(BROKEN_ENV).map(|b| Broken::parse(&b));
    let ctl = Arc::new(Control::new(id, primitive, name.to_owned(), broken));
    crate::common::init_tracing();
    count_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let (go_tx, go_rx) = tokio::sync::mpsc::unbounded_channel();
        let commands = Arc::clone(&ctl);
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match line.trim() {
                    "go" => {
                        let _ = go_tx.send(());
                    }
                    "long" => commands.arm_long_hold(),
                    "let-go" => commands.let_go(),
                    "healed" => commands.healed.cancel(),
                    "stop" => break,
                    _ => {}
                }
            }
            commands.stopped.cancel();
        });
        let secure = env(SECURE_ENV).and_then(|s| Secure::from_env(&s));
        let client = connect(endpoint.to_owned(), secure.as_ref()).await;
        let tasks = Arc::new(StdMutex::new(Vec::new()));
        let sink = Sink::Pipe(Arc::new(tokio::sync::Mutex::new(go_rx)));
        if let Some(resume) = env(RESUME_ENV).and_then(|r| Resume::from_env(&r)) {
            tokio::select! {
                _ = resume_and_release(&ctl, &client, &resume, &sink, &tasks) => {}
                _ = ctl.stopped.cancelled() => {}
            }
        }
        // On the heap: the futures of a selector's loop are too deep for a test thread's stack.
        Box::pin(client_loop(
            Arc::clone(&ctl),
            client,
            sink,
            Arc::clone(&tasks),
        ))
        .await;
        let monitors: Vec<BackgroundTasks> = tasks.lock().unwrap().clone();
        for t in monitors {
            // A deliberately leaked guard keeps its session's task: not what is checked.
            if broken != Some(Broken::Leaks) {
                tokio::time::timeout(TTL * 3, t.finished())
                    .await
                    .expect("a session's task outlived its session");
            }
        }
    });
    let panics = PANICS.load(Ordering::SeqCst);
    assert_eq!(panics, 0, "{panics} panic(s) in client process {id}");
    println!("{REPORT} {} done", mono_ns());
}

/// A client running in its own OS process.
pub struct ProcessClient {
    child: tokio::process::Child,
    stdin: Arc<tokio::sync::Mutex<tokio::process::ChildStdin>>,
    /// Completes with whether the process reported `done`.
    reader: tokio::task::JoinHandle<bool>,
}

impl ProcessClient {
    /// Starts client `id` as a process of this test binary, reaching etcd at `endpoint`.
    pub fn spawn(
        id: usize,
        sh: &Arc<Shared>,
        endpoint: String,
        resume: Option<&Resume>,
        broken: Option<Broken>,
    ) -> ProcessClient {
        // This very binary, even if a rebuild has replaced the file at its path since.
        let exe = if cfg!(target_os = "linux") {
            std::path::PathBuf::from("/proc/self/exe")
        } else {
            std::env::current_exe().expect("the test binary")
        };
        let mut child = tokio::process::Command::new(exe)
            .args([
                "harness::chaos_client_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(
                CLIENT_ENV,
                format!("{id} {:?} {} {endpoint}", sh.primitive, sh.name),
            )
            .env(
                SECURE_ENV,
                sh.secure.as_ref().map(Secure::to_env).unwrap_or_default(),
            )
            .env(RESUME_ENV, resume.map(Resume::to_env).unwrap_or_default())
            .env(BROKEN_ENV, broken.map(Broken::name).unwrap_or_default())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("a client process");
        let stdin = Arc::new(tokio::sync::Mutex::new(child.stdin.take().expect("stdin")));
        let stdout = child.stdout.take().expect("stdout");
        let (sh, to_child) = (Arc::clone(sh), Arc::clone(&stdin));
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut done = false;
            // Read to the end: the test harness in the process still writes after `done`.
            while let Ok(Some(line)) = lines.next_line().await {
                // libtest writes "test … ... " without a newline before the first report.
                let Some(rest) = line.find(REPORT).map(|i| &line[i + REPORT.len()..]) else {
                    continue; // the test harness's own output
                };
                let words: Vec<&str> = rest.split_whitespace().collect();
                let Some(at) = words.first().and_then(|w| w.parse::<u64>().ok()) else {
                    continue;
                };
                let at = sh.instant_of(at);
                match words.get(1).copied() {
                    Some("done") => done = true,
                    Some("releasing") => {
                        sh.maybe_lose_release(id).await;
                        let _ = to_child.lock().await.write_all(b"go\n").await;
                    }
                    _ => match Report::decode(&words[1..]) {
                        Some(report) => sh.apply(id, report, at),
                        None => panic!("client {id}: unreadable report {line:?}"),
                    },
                }
            }
            done
        });
        ProcessClient {
            child,
            stdin,
            reader,
        }
    }

    /// Sends a command line.
    pub async fn tell(&self, command: &str) {
        let _ = self
            .stdin
            .lock()
            .await
            .write_all(format!("{command}\n").as_bytes())
            .await;
    }

    /// SIGKILL: a crash. Nothing is released or revoked. What the process reported before it
    /// died is still in the pipe: read it to the end.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = self.reader.await;
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("a running process");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .expect("the signal is sent");
    }

    /// Asks it to stop and waits until it exited, having reported `done`.
    pub async fn stop(mut self, id: usize, seed: u64) {
        self.tell("stop").await;
        let status = tokio::time::timeout(TTL * 3, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: client process {id} did not stop"))
            .expect("an exit status");
        let done = self.reader.await.unwrap_or(false);
        assert!(
            status.success() && done,
            "seed {seed}: client process {id} failed ({status}; reported done: {done})"
        );
    }
}
