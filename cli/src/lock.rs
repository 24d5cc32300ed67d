//! `etcd-coord lock NAME [-- CMD…]`: CMD runs while holding the lock NAME, which is shared with
//! `etcdctl lock NAME` and Go's `concurrency.Mutex` (docs/interop.md).

use etcd_coord::Mutex;

use crate::conn::Connection;
use crate::exit::Failure;
use crate::hold;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The lock's name (its keys are NAME/…, as etcdctl lock's).
    pub name: String,
    #[command(flatten)]
    pub flags: hold::Flags,
    /// The command to run while holding the lock, and its arguments (after `--`). Without it,
    /// the key and fencing token are printed and the lock held until interrupted.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

pub async fn run(conn: &Connection, args: Args) -> Result<i32, Failure> {
    let what = format!("lock {}", args.name);
    let name = args.name.clone();
    hold::hold(
        conn,
        &args.flags,
        &what,
        &args.cmd,
        // etcdctl lock's names too, so a script written for it runs unchanged.
        |fence| {
            vec![
                ("ETCD_LOCK_KEY", fence.key().to_owned()),
                ("ETCD_LOCK_REV", fence.fencing_token().to_string()),
            ]
        },
        |session| async move { Mutex::new(&session, name).lock().await },
    )
    .await
}
