//! `etcd-coord services TARGET [--watch]`: the endpoints registered under TARGET/ in the layout
//! of etcd's Go `naming/endpoints` (this crate's registrations, Go's `AddEndpoint`, grpc-go's
//! resolver's source); with `--watch`, every change after them, until interrupted.

use etcd_coord::discovery::{Discovery, Endpoint, ViewChange};
use futures::StreamExt;
use serde_json::json;

use crate::conn::Connection;
use crate::exit::Failure;
use crate::hold::interruptible;
use crate::output::{emit, Format};
use crate::run::Signals;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The discovery target (endpoints are TARGET/…).
    pub target: String,
    /// Keep following: print every change as ADD, UPDATE or DELETE (until interrupted).
    #[arg(long)]
    pub watch: bool,
}

pub async fn run(conn: &Connection, args: Args) -> Result<i32, Failure> {
    let what = format!("services {}", args.target);
    let mut signals = Signals::install()?;
    let discovery = Discovery::new(conn.client().await?, args.target.clone())
        .with_request_timeout(conn.command_timeout);
    if !args.watch {
        let endpoints = interruptible(&mut signals, async {
            discovery.list().await.map_err(|e| Failure::of(&what, e))
        })
        .await?;
        for (key, endpoint) in &endpoints {
            print(conn.format, None, key, Some(endpoint));
        }
        return Ok(0);
    }
    let view = interruptible(&mut signals, async {
        discovery.view().await.map_err(|e| Failure::of(&what, e))
    })
    .await?;
    let mut changes = view.changes_from_empty();
    loop {
        let next = interruptible(&mut signals, async { Ok(changes.next().await) }).await;
        match next {
            Err(Failure::Signalled(_)) | Ok(None) => return Ok(0),
            Err(failure) => return Err(failure),
            Ok(Some(Err(e))) => return Err(Failure::of(&what, e)),
            Ok(Some(Ok(change))) => match &change {
                ViewChange::Added { key, endpoint } => {
                    print(conn.format, Some("add"), key, Some(endpoint))
                }
                ViewChange::Updated { key, endpoint, .. } => {
                    print(conn.format, Some("update"), key, Some(endpoint))
                }
                ViewChange::Removed { key, .. } => print(conn.format, Some("delete"), key, None),
            },
        }
    }
}

fn print(format: Format, op: Option<&str>, key: &str, endpoint: Option<&Endpoint>) {
    emit(
        format,
        || {
            let mut line = op
                .map(|op| format!("{} ", op.to_uppercase()))
                .unwrap_or_default();
            line.push_str(key);
            if let Some(e) = endpoint {
                line.push_str(&format!(" {}", e.addr()));
                if !e.metadata().is_null() {
                    line.push_str(&format!(" {}", e.metadata()));
                }
            }
            line
        },
        || {
            let mut value = json!({"key": key});
            if let Some(op) = op {
                value["op"] = json!(op);
            }
            if let Some(e) = endpoint {
                value["addr"] = json!(e.addr());
                value["metadata"] = e.metadata().clone();
            }
            value
        },
    );
}
