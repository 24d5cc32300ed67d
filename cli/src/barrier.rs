//! `etcd-coord barrier NAME --hold [-- CMD…]` holds the barrier up while CMD runs (waiting
//! first while someone else holds it); `--wait` returns once it is down; `--count N [-- CMD…]`
//! enters a double barrier of N, runs CMD once all N are in, and leaves with the others.

use etcd_coord::{Barrier, DoubleBarrier, Error};

use crate::conn::Connection;
use crate::exit::Failure;
use crate::hold::{self, interruptible, session};
use crate::run::Signals;

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["hold", "wait", "count"]))]
pub struct Args {
    /// The barrier's name (its keys are NAME/#barrier/… or NAME/#double/…).
    pub name: String,
    /// Hold the barrier up while CMD runs (or until interrupted).
    #[arg(long)]
    pub hold: bool,
    /// Wait until the barrier is down, then exit 0.
    #[arg(long)]
    pub wait: bool,
    /// Enter a double barrier of this many participants: CMD runs once all have entered; the
    /// command returns once all have left.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,
    #[command(flatten)]
    pub flags: hold::Flags,
    /// The command to run, and its arguments (after `--`).
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

pub async fn run(conn: &Connection, args: Args) -> Result<i32, Failure> {
    let name = args.name.clone();
    if let Some(count) = args.count {
        let what = format!("double barrier {} ({count})", args.name);
        return hold::hold(
            conn,
            &args.flags,
            &what,
            &args.cmd,
            |_| Vec::new(),
            |session| async move {
                DoubleBarrier::new(&session, name, count as usize)
                    .enter()
                    .await
            },
        )
        .await;
    }
    let what = format!("barrier {}", args.name);
    if args.hold {
        return hold::hold(
            conn,
            &args.flags,
            &what,
            &args.cmd,
            |_| Vec::new(),
            |session| async move {
                let barrier = Barrier::new(&session, name);
                loop {
                    match barrier.hold().await {
                        Err(Error::AlreadyHeld { .. }) => barrier.wait().await?,
                        other => return other,
                    }
                }
            },
        )
        .await;
    }
    if !args.cmd.is_empty() {
        return Err(Failure::Usage("barrier --wait takes no command".into()));
    }
    let mut signals = Signals::install()?;
    let session = session(conn, args.flags.ttl, &what).await?;
    let barrier = Barrier::new(&session, name);
    let waited = interruptible(&mut signals, async {
        let down = match args.flags.timeout {
            Some(limit) => etcd_coord::timeout(limit, barrier.wait())
                .await
                .ok_or(Failure::Timeout(limit))?,
            None => barrier.wait().await,
        };
        down.map_err(|e| Failure::of(&what, e))
    })
    .await;
    let _ = session.close().await;
    waited.map(|()| 0)
}
