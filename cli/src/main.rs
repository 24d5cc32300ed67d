//! `etcd-coord`: run shell jobs under etcd locks, semaphores, read/write locks, elections and
//! barriers — interoperating with `etcdctl lock` and etcd's Go clients — and look at who holds
//! and who waits. Connection flags and `ETCDCTL_*` variables are etcdctl's. Exit codes:
//! [`exit`] (and docs/operations.md).

mod barrier;
mod conn;
mod elect;
mod exit;
mod hold;
mod inspect;
mod lock;
mod output;
mod run;
mod rwlock;
mod semaphore;
mod services;

use clap::{Parser, Subcommand};

use crate::exit::Failure;

/// Distributed locks, semaphores, read/write locks, elections and barriers on etcd for shell
/// jobs, and a look at who holds them and who waits.
#[derive(Debug, Parser)]
#[command(name = "etcd-coord", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    conn: conn::Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs CMD while holding the lock NAME (shared with `etcdctl lock NAME` and Go's
    /// `concurrency.Mutex`); without CMD, prints the key and holds until interrupted.
    Lock(lock::Args),
    /// Runs CMD while holding one of N permits of the semaphore NAME.
    Semaphore(semaphore::Args),
    /// Runs CMD while holding the read/write lock NAME for reading or writing.
    Rwlock(rwlock::Args),
    /// Runs CMD while leading the election NAME (shared with `etcdctl elect NAME`).
    Elect(elect::Args),
    /// Holds the barrier NAME up while CMD runs, waits until it is down, or (with --count)
    /// enters a double barrier, runs CMD and leaves with the others.
    Barrier(barrier::Args),
    /// Shows who holds NAME (lock, election, semaphore, read/write lock, barrier) and who
    /// waits, in order, with leases, TTLs, fencing tokens and which client made each key.
    Inspect(inspect::Args),
    /// Lists the endpoints registered under a discovery TARGET (Go's naming/endpoints
    /// layout); with --watch, follows them.
    Services(services::Args),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version exit 0; a usage error exits 2 (exit::USAGE).
            let _ = e.print();
            std::process::exit(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("etcd-coord: cannot start: {e}");
            std::process::exit(exit::INTERNAL);
        }
    };
    let code = runtime.block_on(dispatch(cli));
    // Requests still finishing in the background (a release handed to a session's task) are
    // not waited for beyond this.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}

async fn dispatch(cli: Cli) -> i32 {
    let result: Result<i32, Failure> = async {
        let conn = cli.conn.resolve()?;
        match cli.command {
            Command::Lock(args) => lock::run(&conn, args).await,
            Command::Semaphore(args) => semaphore::run(&conn, args).await,
            Command::Rwlock(args) => rwlock::run(&conn, args).await,
            Command::Elect(args) => elect::run(&conn, args).await,
            Command::Barrier(args) => barrier::run(&conn, args).await,
            Command::Inspect(args) => inspect::run(&conn, args).await,
            Command::Services(args) => services::run(&conn, args).await,
        }
    }
    .await;
    match result {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("etcd-coord: {failure}");
            failure.code()
        }
    }
}
