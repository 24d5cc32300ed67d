//! `etcd-coord inspect NAME [--permits N] [--watch]`: who holds NAME and who waits, in order —
//! for the lock/election queue it shares with etcd's own clients, and for a semaphore,
//! read/write lock or barrier of that name — with each key's lease, the lease's remaining and
//! granted TTL, its age in revisions, its fencing token and which client made it.

use etcd_coord::inspect::{Inspector, Member, MemberClient, QueueKind, QueueState, Role};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::conn::Connection;
use crate::exit::Failure;
use crate::hold::interruptible;
use crate::output::{emit, lease_hex, Format};
use crate::run::Signals;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The name (as given to lock, elect, semaphore, rwlock or barrier).
    pub name: String,
    /// The semaphore's permits, to tell its holders from its waiters.
    #[arg(long)]
    pub permits: Option<usize>,
    /// Keep following: print again after every change (until interrupted).
    #[arg(long)]
    pub watch: bool,
}

pub async fn run(conn: &Connection, args: Args) -> Result<i32, Failure> {
    let what = format!("inspect {}", args.name);
    let mut signals = Signals::install()?;
    let inspector = Inspector::with_request_timeout(conn.client().await?, conn.command_timeout);
    if !args.watch {
        let queues = interruptible(&mut signals, async {
            inspector
                .read_all(&args.name, args.permits)
                .await
                .map_err(|e| Failure::of(&what, e))
        })
        .await?;
        print(conn.format, &args.name, &queues);
        return Ok(0);
    }
    let mut states = inspector.follow(&args.name, args.permits);
    loop {
        let next = interruptible(&mut signals, async { Ok(states.next().await) }).await;
        match next {
            Err(Failure::Signalled(_)) => return Ok(0),
            Err(failure) => return Err(failure),
            Ok(None) => return Ok(0),
            Ok(Some(Err(e))) => return Err(Failure::of(&what, e)),
            Ok(Some(Ok(queues))) => print(conn.format, &args.name, &queues),
        }
    }
}

fn print(format: Format, name: &str, queues: &[QueueState]) {
    let revision = queues.first().map_or(0, QueueState::revision);
    emit(
        format,
        || {
            let mut out = String::new();
            for queue in queues {
                out.push_str(&format!(
                    "{name}: {} at revision {revision}",
                    kind(queue.kind()).0
                ));
                if queue.members().is_empty() {
                    out.push_str(": nobody holds or waits\n");
                    continue;
                }
                out.push('\n');
                for (i, m) in queue.members().iter().enumerate() {
                    out.push_str(&format!("  {}\n", line(i + 1, m)));
                }
            }
            out.trim_end().to_owned()
        },
        || {
            let queues: Vec<Value> = queues
                .iter()
                .map(|q| {
                    let members: Vec<Value> = q
                        .members()
                        .iter()
                        .enumerate()
                        .map(|(i, m)| member(i + 1, m))
                        .collect();
                    json!({"kind": kind(q.kind()).1, "members": members})
                })
                .collect();
            json!({"name": name, "revision": revision, "queues": queues})
        },
    );
}

/// The queue's kind: for people (simple) and for scripts (json).
fn kind(kind: QueueKind) -> (&'static str, &'static str) {
    match kind {
        QueueKind::Mutex => ("lock/election", "mutex"),
        QueueKind::Semaphore => ("semaphore", "semaphore"),
        QueueKind::RwLock => ("rwlock", "rwlock"),
        QueueKind::Barrier => ("barrier", "barrier"),
        _ => ("other", "other"),
    }
}

fn client(client: MemberClient) -> &'static str {
    match client {
        MemberClient::Ours => "ours",
        MemberClient::Go => "go/etcdctl",
        _ => "foreign",
    }
}

fn role(role: Role) -> &'static str {
    match role {
        Role::Reader => "reader",
        Role::Writer => "writer",
        Role::Barrier => "barrier",
        _ => "",
    }
}

fn state(m: &Member) -> &'static str {
    match m.holds() {
        Some(true) => "holds",
        Some(false) => "waits",
        None => "queued",
    }
}

fn ttl(m: &Member) -> String {
    match m.lease_ttl() {
        None => "no lease".into(),
        Some(t) => match t.remaining {
            Some(left) => format!("ttl {}s/{}s", left.as_secs(), t.granted.as_secs()),
            None => "lease gone".into(),
        },
    }
}

fn line(position: usize, m: &Member) -> String {
    let mut text = format!(
        "{position:>3} {:<6} {:<10} {}{}  lease {}  {}  token {}  age {} revisions",
        state(m),
        client(m.client()),
        match role(m.role()) {
            "" => String::new(),
            role => format!("{role} "),
        },
        m.key(),
        lease_hex(m.lease_id()),
        ttl(m),
        m.fencing_token(),
        m.age_revisions(),
    );
    if !m.value().is_empty() {
        text.push_str(&format!("  value {:?}", String::from_utf8_lossy(m.value())));
    }
    text
}

fn member(position: usize, m: &Member) -> Value {
    let ttl = m.lease_ttl();
    json!({
        "position": position,
        "key": m.key(),
        "holds": m.holds(),
        "client": match m.client() { MemberClient::Ours => "ours", MemberClient::Go => "go", _ => "foreign" },
        "role": match role(m.role()) { "" => "member", role => role },
        "lease": lease_hex(m.lease_id()),
        "ttl_remaining_s": ttl.and_then(|t| t.remaining).map(|d| d.as_secs()),
        "ttl_granted_s": ttl.map(|t| t.granted.as_secs()),
        "fencing_token": m.fencing_token(),
        "mod_revision": m.mod_revision(),
        "age_revisions": m.age_revisions(),
        "value": String::from_utf8_lossy(m.value()),
    })
}
