//! `etcd-coord semaphore NAME --permits N [-- CMD…]`: CMD runs while holding one of N permits
//! (at most N such commands at once, across hosts).

use etcd_coord::Semaphore;

use crate::conn::Connection;
use crate::exit::Failure;
use crate::hold;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The semaphore's name (its keys are NAME/#semaphore/…).
    pub name: String,
    /// How many may hold at once (every holder of NAME must give the same number).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub permits: u32,
    #[command(flatten)]
    pub flags: hold::Flags,
    /// The command to run while holding a permit, and its arguments (after `--`).
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

pub async fn run(conn: &Connection, args: Args) -> Result<i32, Failure> {
    let what = format!("semaphore {}", args.name);
    let (name, permits) = (args.name.clone(), args.permits as usize);
    hold::hold(
        conn,
        &args.flags,
        &what,
        &args.cmd,
        |_| Vec::new(),
        |session| async move { Semaphore::new(&session, name, permits).acquire().await },
    )
    .await
}
