//! A toxiproxy-compatible fault server on its own: the testkit's [`FaultServer`], serving
//! toxiproxy's HTTP API until killed. Drive it with any toxiproxy client or `curl`.
//!
//! ```text
//! cargo run -p etcd-coord-testkit --bin etcd-coord-faults -- [--listen 127.0.0.1:8474]
//! ```
//!
//! [`FaultServer`]: etcd_coord_testkit::faults::FaultServer

use etcd_coord_testkit::faults::FaultServer;

fn main() {
    let mut listen = "127.0.0.1:8474".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" | "-listen" | "--host" => match args.next() {
                Some(v) => listen = v,
                None => usage("--listen needs HOST:PORT"),
            },
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let mut server = match FaultServer::start(&listen).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("etcd-coord-faults: cannot listen on {listen}: {e}");
                std::process::exit(1);
            }
        };
        // The first line says where the API is (port 0 picks one), for scripts to read.
        println!("API listening on {}", server.url());
        server.wait().await;
    });
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("etcd-coord-faults: {problem}");
    }
    eprintln!("usage: etcd-coord-faults [--listen HOST:PORT (default 127.0.0.1:8474)]");
    std::process::exit(if problem.is_empty() { 0 } else { 2 });
}
