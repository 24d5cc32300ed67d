//! `etcd-coord elect NAME --value V [-- CMD…]`: campaigns in the election NAME (shared with
//! `etcdctl elect NAME` and Go's `concurrency.Election`) and runs CMD while leading.

use etcd_coord::Election;

use crate::conn::Connection;
use crate::exit::Failure;
use crate::hold;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The election's name (its keys are NAME/…, as etcdctl elect's).
    pub name: String,
    /// The value to lead with (what `etcdctl elect -l NAME` and observers see).
    #[arg(long)]
    pub value: String,
    #[command(flatten)]
    pub flags: hold::Flags,
    /// The command to run while leading, and its arguments (after `--`). Without it, the key
    /// and fencing token are printed and the leadership held until interrupted.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

pub async fn run(conn: &Connection, args: Args) -> Result<i32, Failure> {
    let what = format!("election {}", args.name);
    let (name, value) = (args.name.clone(), args.value.clone());
    hold::hold(
        conn,
        &args.flags,
        &what,
        &args.cmd,
        |_| vec![("ETCD_COORD_LEADER_VALUE", args.value.clone())],
        |session| async move { Election::new(&session, name).campaign(value).await },
    )
    .await
}
