//! `etcd-coord rwlock NAME --read|--write [-- CMD…]`: CMD runs while holding the read/write
//! lock NAME, shared with other readers or alone.

use etcd_coord::RwLock;

use crate::conn::Connection;
use crate::exit::Failure;
use crate::hold;

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["read", "write"]))]
pub struct Args {
    /// The lock's name (its keys are NAME/#rwlock/…).
    pub name: String,
    /// Shared: with other readers.
    #[arg(long)]
    pub read: bool,
    /// Exclusive: alone.
    #[arg(long)]
    pub write: bool,
    #[command(flatten)]
    pub flags: hold::Flags,
    /// The command to run while holding the lock, and its arguments (after `--`).
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

pub async fn run(conn: &Connection, args: Args) -> Result<i32, Failure> {
    let name = args.name.clone();
    if args.read {
        let what = format!("rwlock {} (read)", args.name);
        hold::hold(
            conn,
            &args.flags,
            &what,
            &args.cmd,
            |_| Vec::new(),
            |session| async move { RwLock::new(&session, name).read().await },
        )
        .await
    } else {
        let what = format!("rwlock {} (write)", args.name);
        hold::hold(
            conn,
            &args.flags,
            &what,
            &args.cmd,
            |_| Vec::new(),
            |session| async move { RwLock::new(&session, name).write().await },
        )
        .await
    }
}
