//! What clients report, and where the reports go: the shared history of the run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
use std::time::{Duration, Instant};

use etcd_coord::BackgroundTasks;
use etcd_coord_testkit::checker::{Event, History, Mode, Step};
use tokio_util::sync::CancellationToken;

use super::faults::ApiProxy;
use super::{Primitive, Secure};

/// The prefix of the lines a client process reports on.
pub const REPORT: &str = "@chaos";

/// CLOCK_MONOTONIC in nanoseconds: the clock of `std::time::Instant` on Linux, read the same
/// way in the harness and in client processes, so their reports land on one timeline.
pub fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("a clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The tally's count of decisions made from a session's mirror of a long line.
pub const MIRRORED: &str = "decisions from a mirror";

/// The tally's key for decisions made from a mirror in waits that began after the last fault
/// healed, by the clients through proxy `proxy`.
pub fn mirrored_after_the_heal(proxy: usize) -> String {
    format!("{MIRRORED} after the heal, proxy {proxy}")
}

/// The tally's count of acquisitions whose wait began after the heal in a session whose
/// watch stream had been opened again (after a reset, say).
pub const REOPENED_WAITS: &str = "waits after the heal on a reopened stream";
/// The tally's count of decisions from a mirror in those waits.
pub const REOPENED_MIRRORED: &str = "decisions from a mirror after the heal on a reopened stream";

/// What a client reports as it goes: applied to the shared history at once by a client in
/// this process, sent as a line (with its CLOCK_MONOTONIC time) by a client process.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A new session with this lease (the client's from now on).
    Lease(i64),
    /// It starts to want: an acquisition, a barrier's wait — or a session to make them with.
    Waiting,
    /// An attempt failed, for this reason (one word): the client still wants.
    GaveUp(String),
    Acquired {
        token: i64,
        lease: i64,
        mode: Mode,
    },
    /// The acquisition with `token` is a long hold: it lasts until `lost()` (or the harness
    /// lets it go).
    LongHold {
        token: i64,
    },
    /// It no longer believes it holds `token`.
    Ended {
        token: i64,
    },
    /// A write with `token` to the protected resource's `key` succeeded, as the client saw it.
    Wrote {
        token: i64,
        key: String,
    },
    /// etcd refused a write with `token` made after the holder let go (`late`: at its next
    /// hold) or lost (as it learned of the loss, or past its deadline): its fence's compares
    /// failed.
    Refused {
        token: i64,
        late: bool,
    },
    /// A barrier's wait, called at the given time, passed.
    Passed {
        called_ns: u64,
    },
    Participant {
        lease: i64,
        step: Step,
    },
    /// A leader selector's `leaders()` shows this leader (a fencing token), or nobody.
    Leader(Option<i64>),
    /// A session ended Lost, for this reason (one word).
    SessionLost(String),
    /// An acquisition went through after this many decisions from its session's mirror of a
    /// long line (`SessionMetrics::mirrored_decisions`); its wait began after the client was
    /// told the faults healed, or not, and in a session whose watch stream had been opened
    /// more than once (`SessionMetrics::watch_streams`), or not.
    Mirrored {
        decisions: u64,
        after_heal: bool,
        reopened: bool,
    },
    /// A work queue's producer starts to enqueue the job named `job`.
    Enqueuing {
        job: String,
    },
    /// Its enqueue of `job` returned the job's `id`.
    Enqueued {
        job: String,
        id: String,
    },
    /// A worker claimed job `id` (named `job`), delivery `attempt`, with the claim's fencing
    /// `token` under `lease`: it believes it holds the job until the `Ended` of `token`.
    Claimed {
        job: String,
        id: String,
        token: i64,
        lease: i64,
        attempt: u32,
    },
    /// etcd accepted the acknowledgement through claim `token` (`certain`), or its answer was
    /// lost and it may have.
    Acked {
        token: i64,
        certain: bool,
    },
    /// etcd refused an acknowledgement through claim `token` sent past the claim's loss.
    AckRefused {
        token: i64,
    },
}

impl Report {
    pub fn encode(&self) -> String {
        match self {
            Report::Lease(l) => format!("lease {l}"),
            Report::Waiting => "waiting".into(),
            Report::GaveUp(why) => format!("gave-up {why}"),
            Report::Acquired { token, lease, mode } => {
                let mode = if *mode == Mode::Shared {
                    "shared"
                } else {
                    "exclusive"
                };
                format!("acquired {token} {lease} {mode}")
            }
            Report::LongHold { token } => format!("long-hold {token}"),
            Report::Ended { token } => format!("ended {token}"),
            Report::Wrote { token, key } => format!("wrote {token} {key}"),
            Report::Refused { token, late } => {
                format!(
                    "refused {token} {}",
                    if *late { "late" } else { "after-loss" }
                )
            }
            Report::Passed { called_ns } => format!("passed {called_ns}"),
            Report::Participant { lease, step } => format!("participant {lease} {step:?}"),
            Report::Leader(l) => format!("leader {}", l.unwrap_or(0)),
            Report::SessionLost(why) => format!("session-lost {why}"),
            Report::Mirrored {
                decisions,
                after_heal,
                reopened,
            } => format!("mirrored {decisions} {after_heal} {reopened}"),
            Report::Enqueuing { job } => format!("enqueuing {job}"),
            Report::Enqueued { job, id } => format!("enqueued {job} {id}"),
            Report::Claimed {
                job,
                id,
                token,
                lease,
                attempt,
            } => format!("claimed {job} {id} {token} {lease} {attempt}"),
            Report::Acked { token, certain } => format!("acked {token} {certain}"),
            Report::AckRefused { token } => format!("ack-refused {token}"),
        }
    }

    pub fn decode(words: &[&str]) -> Option<Report> {
        let n = |i: usize| words.get(i).and_then(|w| w.parse::<i64>().ok());
        let word = |i: usize| words.get(i).map(|w| (*w).to_owned());
        Some(match *words.first()? {
            "lease" => Report::Lease(n(1)?),
            "waiting" => Report::Waiting,
            "gave-up" => Report::GaveUp(word(1)?),
            "acquired" => Report::Acquired {
                token: n(1)?,
                lease: n(2)?,
                mode: if *words.get(3)? == "shared" {
                    Mode::Shared
                } else {
                    Mode::Exclusive
                },
            },
            "long-hold" => Report::LongHold { token: n(1)? },
            "ended" => Report::Ended { token: n(1)? },
            "wrote" => Report::Wrote {
                token: n(1)?,
                key: word(2)?,
            },
            "refused" => Report::Refused {
                token: n(1)?,
                late: *words.get(2)? == "late",
            },
            "passed" => Report::Passed {
                called_ns: words.get(1)?.parse().ok()?,
            },
            "participant" => Report::Participant {
                lease: n(1)?,
                step: match *words.get(2)? {
                    "Entering" => Step::Entering,
                    "Entered" => Step::Entered,
                    "Leaving" => Step::Leaving,
                    _ => Step::Left,
                },
            },
            "leader" => Report::Leader(n(1).filter(|t| *t != 0)),
            "session-lost" => Report::SessionLost(word(1)?),
            "mirrored" => Report::Mirrored {
                decisions: words.get(1)?.parse().ok()?,
                after_heal: words.get(2)?.parse().ok()?,
                reopened: words.get(3)?.parse().ok()?,
            },
            "enqueuing" => Report::Enqueuing { job: word(1)? },
            "enqueued" => Report::Enqueued {
                job: word(1)?,
                id: word(2)?,
            },
            "claimed" => Report::Claimed {
                job: word(1)?,
                id: word(2)?,
                token: n(3)?,
                lease: n(4)?,
                attempt: words.get(5)?.parse().ok()?,
            },
            "ack-refused" => Report::AckRefused { token: n(1)? },
            "acked" => Report::Acked {
                token: n(1)?,
                certain: words.get(2)?.parse().ok()?,
            },
            _ => return None,
        })
    }
}

/// The observer number under which a leader selector's `leaders()` is recorded.
pub fn selector_observer(client: usize) -> usize {
    100 + client
}

/// What the clients of one run share (in this process).
pub struct Shared {
    pub primitive: Primitive,
    pub name: String,
    pub history: History,
    pub stopped: CancellationToken,
    /// The harness's reading of CLOCK_MONOTONIC and `Instant` at one moment, to place client
    /// processes' reports.
    pub epoch: (Instant, u64),
    /// What each client holds now (to end its interval if its process is killed), and
    /// whether that is a long hold.
    pub holding: StdMutex<Vec<Option<(i64, bool)>>>,
    /// Every lease ever used and every in-process session's task monitor, for the leak checks.
    pub leases: StdMutex<Vec<i64>>,
    pub tasks: StdMutex<Vec<BackgroundTasks>>,
    /// Client `i` goes through `proxies[i % proxies.len()]`.
    pub proxies: Vec<Arc<ApiProxy>>,
    /// Clients whose next release is to lose its response (Fault::LoseRelease).
    pub lose_release: StdMutex<Vec<bool>>,
    /// Clients that began to release (acknowledge) what they hold, and have not ended it: a
    /// killed worker's acknowledgement may have applied.
    pub releasing: StdMutex<Vec<bool>>,
    /// TLS and a user, if the cluster requires them.
    pub secure: Option<Secure>,
    /// Every write a client saw succeed: key and token.
    pub written: StdMutex<Vec<(String, i64)>>,
    /// Counts of what happened that the checker does not judge: late writes etcd refused,
    /// failed attempts and lost sessions by reason.
    pub tally: StdMutex<BTreeMap<String, usize>>,
    /// When the last fault healed.
    pub healed: OnceLock<Instant>,
}

impl Shared {
    /// The `Instant` of a CLOCK_MONOTONIC reading.
    pub fn instant_of(&self, ns: u64) -> Instant {
        let (instant, base) = self.epoch;
        if ns >= base {
            instant + Duration::from_nanos(ns - base)
        } else {
            instant - Duration::from_nanos(base - ns)
        }
    }

    pub fn count(&self, what: String) {
        *self.tally.lock().unwrap().entry(what).or_default() += 1;
    }

    /// Applies client `client`'s report, made at `at`.
    pub fn apply(&self, client: usize, report: Report, at: Instant) {
        let h = &self.history;
        match report {
            Report::Lease(lease) => {
                self.leases.lock().unwrap().push(lease);
                h.record(Event::Session { client, lease, at });
            }
            Report::Waiting => h.record(Event::Waiting { client, at }),
            Report::GaveUp(why) => {
                self.count(format!("gave up: {why}"));
                h.record(Event::GaveUp { client, at });
            }
            Report::Acquired { token, lease, mode } => {
                self.holding.lock().unwrap()[client] = Some((token, false));
                h.record(Event::Acquired {
                    client,
                    token,
                    lease,
                    mode,
                    at,
                });
            }
            Report::LongHold { token } => {
                self.count("long holds".into());
                self.holding.lock().unwrap()[client] = Some((token, true));
            }
            Report::Ended { token } => {
                self.holding.lock().unwrap()[client] = None;
                self.releasing.lock().unwrap()[client] = false;
                h.record(Event::Ended { client, token, at });
            }
            Report::Wrote { token, key } => {
                self.written.lock().unwrap().push((key, token));
            }
            Report::Refused { late: true, .. } => self.count("late writes refused".into()),
            Report::Refused { late: false, .. } => self.count("writes after a loss refused".into()),
            Report::Passed { called_ns } => h.record(Event::Passed {
                client,
                called: self.instant_of(called_ns),
                at,
            }),
            Report::Participant { lease, step } => h.record(Event::Participant {
                client,
                lease,
                step,
                at,
            }),
            Report::Leader(leader) => h.record(Event::Observed {
                observer: selector_observer(client),
                leader,
                fresh: false,
                at,
            }),
            Report::SessionLost(why) => self.count(format!("session lost: {why}")),
            Report::Mirrored {
                decisions,
                after_heal,
                reopened,
            } => {
                let mut tally = self.tally.lock().unwrap();
                let mut add = |key: String, n: usize| *tally.entry(key).or_default() += n;
                let decisions = decisions as usize;
                add(MIRRORED.into(), decisions);
                if after_heal {
                    let proxy = client % self.proxies.len();
                    add(mirrored_after_the_heal(proxy), decisions);
                }
                if after_heal && reopened {
                    add(REOPENED_WAITS.into(), 1);
                    add(REOPENED_MIRRORED.into(), decisions);
                }
            }
            Report::Enqueuing { job } => h.record(Event::JobEnqueuing { client, job, at }),
            Report::Enqueued { job, id } => {
                self.count("jobs enqueued".into());
                h.record(Event::JobEnqueued {
                    client,
                    job,
                    id,
                    at,
                });
            }
            Report::Claimed {
                job,
                id,
                token,
                lease,
                attempt,
            } => {
                self.holding.lock().unwrap()[client] = Some((token, false));
                if attempt > 1 {
                    self.count("redeliveries".into());
                }
                h.record(Event::JobClaimed {
                    client,
                    job,
                    id,
                    token,
                    lease,
                    attempt,
                    at,
                });
            }
            Report::AckRefused { .. } => self.count("late acks refused".into()),
            Report::Acked { token, certain } => {
                if !certain {
                    self.count("acks with a lost answer".into());
                }
                h.record(Event::JobAcked {
                    client,
                    token,
                    certain,
                    at,
                });
            }
        }
    }

    /// If a lost release response is armed for `client`, drops the responses on its path
    /// now and restores them (with a reset) half a second later.
    pub async fn maybe_lose_release(&self, client: usize) {
        self.releasing.lock().unwrap()[client] = true;
        let armed = std::mem::take(&mut self.lose_release.lock().unwrap()[client]);
        if !armed {
            return;
        }
        tracing::debug!(client, "the response of this release will be lost");
        let proxy = Arc::clone(&self.proxies[client % self.proxies.len()]);
        proxy.drop_responses().await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            proxy.stop_dropping_responses().await;
            proxy.reset_peer().await;
        });
    }
}

/// Where a client's reports go.
#[derive(Clone)]
pub enum Sink {
    /// A client in this process.
    Local(Arc<Shared>),
    /// A client process: lines on stdout; `go` lines on stdin arrive through `go`.
    Pipe(Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>>),
}

impl Sink {
    pub fn report(&self, client: usize, report: Report) {
        match self {
            Sink::Local(sh) => sh.apply(client, report, Instant::now()),
            Sink::Pipe(_) => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{REPORT} {} {}", mono_ns(), report.encode());
                let _ = out.flush();
            }
        }
    }

    /// Called just before a release: lets the harness arm a lost release response first.
    pub async fn releasing(&self, client: usize) {
        match self {
            Sink::Local(sh) => sh.maybe_lose_release(client).await,
            Sink::Pipe(go) => {
                {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{REPORT} {} releasing", mono_ns());
                    let _ = out.flush();
                }
                let _ = go.lock().await.recv().await;
            }
        }
    }

    pub fn watch_tasks(&self, tasks: BackgroundTasks, own: &StdMutex<Vec<BackgroundTasks>>) {
        match self {
            Sink::Local(sh) => sh.tasks.lock().unwrap().push(tasks),
            Sink::Pipe(_) => own.lock().unwrap().push(tasks),
        }
    }
}
