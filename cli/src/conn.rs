//! Connecting as etcdctl does: its flags (`--endpoints`, `--user`, `--password`, `--cacert`,
//! `--cert`, `--key`, `--dial-timeout`, `--command-timeout`, `--keepalive-time`,
//! `--keepalive-timeout`, `-w/--write-out`) and their `ETCDCTL_*` environment variables, so a
//! script's settings for etcdctl carry over.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::exit::Failure;
use crate::output::Format;

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Connection (etcdctl's flags and ETCDCTL_* variables)")]
pub struct Conn {
    /// gRPC endpoints, comma-separated (https:// or --cacert for TLS).
    #[arg(
        long,
        env = "ETCDCTL_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        global = true
    )]
    endpoints: Vec<String>,
    /// User name, or name:password, for authentication.
    #[arg(long, env = "ETCDCTL_USER", global = true)]
    user: Option<String>,
    /// Password for authentication (if --user does not include it).
    #[arg(long, env = "ETCDCTL_PASSWORD", hide_env_values = true, global = true)]
    password: Option<String>,
    /// Verify the servers' certificates with this CA bundle (PEM).
    #[arg(long, env = "ETCDCTL_CACERT", global = true)]
    cacert: Option<PathBuf>,
    /// Identify with this TLS certificate (PEM; with --key).
    #[arg(long, env = "ETCDCTL_CERT", global = true)]
    cert: Option<PathBuf>,
    /// The TLS key of --cert (PEM).
    #[arg(long, env = "ETCDCTL_KEY", global = true)]
    key: Option<PathBuf>,
    /// How long to wait for a connection.
    #[arg(long, env = "ETCDCTL_DIAL_TIMEOUT", default_value = "2s", value_parser = parse_duration, global = true)]
    dial_timeout: Duration,
    /// How long one request may take.
    #[arg(long, env = "ETCDCTL_COMMAND_TIMEOUT", default_value = "5s", value_parser = parse_duration, global = true)]
    command_timeout: Duration,
    /// HTTP/2 keep-alive interval (etcd refuses one shorter than its --grpc-keepalive-min-time,
    /// 5 s by default; Go's clients, etcdctl included, never ping more often than every 10 s).
    #[arg(long, env = "ETCDCTL_KEEPALIVE_TIME", default_value = "10s", value_parser = parse_duration, global = true)]
    keepalive_time: Duration,
    /// How long a keep-alive ping may go unanswered before the connection is dropped.
    #[arg(long, env = "ETCDCTL_KEEPALIVE_TIMEOUT", default_value = "6s", value_parser = parse_duration, global = true)]
    keepalive_timeout: Duration,
    /// Output format.
    #[arg(
        short = 'w',
        long,
        env = "ETCDCTL_WRITE_OUT",
        value_enum,
        default_value = "simple",
        global = true
    )]
    write_out: Format,
}

/// What to connect to, and how, once checked.
pub struct Connection {
    endpoints: Vec<String>,
    options: ConnectOptions,
    pub dial_timeout: Duration,
    pub command_timeout: Duration,
    pub format: Format,
}

impl Conn {
    /// Checks the flags and reads the TLS files.
    pub fn resolve(self) -> Result<Connection, Failure> {
        let mut options = etcd_coord::recommended_connect_options()
            .with_connect_timeout(self.dial_timeout)
            .with_keep_alive(self.keepalive_time, self.keepalive_timeout)
            .with_keep_alive_while_idle(false);
        if let Some(user) = self.user {
            let (name, password) = match (user.split_once(':'), self.password) {
                (Some((name, password)), _) => (name.to_owned(), password.to_owned()),
                (None, Some(password)) => (user, password),
                (None, None) => {
                    return Err(Failure::Usage(format!(
                        "--user {user}: give the password as --user {user}:PASSWORD, --password or ETCDCTL_PASSWORD"
                    )))
                }
            };
            options = options.with_user(name, password);
        }
        if self.cacert.is_some() || self.cert.is_some() || self.key.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.cacert {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                (None, None) => {}
                _ => return Err(Failure::Usage("--cert and --key go together".into())),
            }
            options = options.with_tls(tls);
        }
        let endpoints: Vec<String> = self
            .endpoints
            .into_iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(Failure::Usage("--endpoints: no endpoint given".into()));
        }
        Ok(Connection {
            endpoints,
            options,
            dial_timeout: self.dial_timeout,
            command_timeout: self.command_timeout,
            format: self.write_out,
        })
    }
}

impl Connection {
    /// A client of the endpoints (with credentials, this authenticates: bounded by the dial and
    /// command timeouts).
    pub async fn client(&self) -> Result<Client, Failure> {
        let limit = self.dial_timeout + self.command_timeout;
        let connect = Client::connect(&self.endpoints, Some(self.options.clone()));
        let unreachable = |why: String| {
            Failure::Unreachable(format!("etcd at {}: {why}", self.endpoints.join(",")))
        };
        match tokio::time::timeout(limit, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(Failure::of(
                &format!("etcd at {}", self.endpoints.join(",")),
                etcd_coord::Error::from(e),
            )),
            Err(_) => Err(unreachable(format!("no connection within {limit:?}"))),
        }
    }

    /// Session options: the lease TTL and the request timeout.
    pub fn session_options(&self, ttl: Duration) -> etcd_coord::SessionOptions {
        etcd_coord::SessionOptions::new()
            .with_ttl(ttl)
            .with_request_timeout(self.command_timeout)
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

/// A duration as etcdctl writes them: `500ms`, `10s`, `1.5m`, `2h`, or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 10s, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_are_read_as_etcdctl_writes_them() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "10x", "-1s", "1e400s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
