//! `etcd-coord lock|semaphore|rwlock|elect|barrier` end to end, as processes against a real
//! etcd: CMD's environment and exit status, exclusion, CMD killed when the hold is lost, exit
//! codes of failures.

mod common;

use std::time::Duration;

use common::*;

/// Intervals of `start X` … `end X` lines in a record file: the most that ran at once.
fn most_at_once(record: &str) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for line in record.lines() {
        if line.starts_with("start") {
            now += 1;
            most = most.max(now);
        } else if line.starts_with("end") {
            now -= 1;
        }
    }
    most
}

/// A shell command that records its start and end in `file`, running `secs` in between.
fn recorded(file: &std::path::Path, tag: &str, secs: f32) -> String {
    let f = file.display();
    format!("echo start {tag} >> {f}; sleep {secs}; echo end {tag} >> {f}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_runs_cmd_with_its_key_and_fencing_token_and_exits_with_its_status() {
    let etcd = etcd().await;
    let name = unique("env");
    let script = r#"echo "$ETCD_COORD_KEY $ETCD_COORD_FENCING_TOKEN $ETCD_LOCK_KEY $ETCD_LOCK_REV $ETCD_COORD_LEASE"; exit 7"#;
    let (code, out) = coord_output(&etcd, &["lock", &name, "--", "sh", "-c", script]).await;
    assert_eq!(code, 7, "CMD's status is the command's: {out}");
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.len(), 5, "{out}");
    let (key, token, lease) = (fields[0], fields[1], fields[4]);
    assert!(
        key.starts_with(&format!("{name}/#{lease:0>16}-")),
        "{key} is our key on lease {lease}"
    );
    assert!(token.parse::<i64>().unwrap() > 0);
    assert_eq!(
        (fields[2], fields[3]),
        (key, token),
        "etcdctl lock's variables carry the same"
    );
    assert!(
        lock_members(&etcd, &name).await.is_empty(),
        "released after CMD"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmd_gets_sigterm_when_the_lock_is_lost_and_sigkill_if_it_stays() {
    let etcd = etcd().await;
    for (ignores_term, name) in [(false, unique("lost-term")), (true, unique("lost-kill"))] {
        let record = temp_file("lost");
        let trap = if ignores_term {
            "trap '' TERM".to_owned()
        } else {
            format!(
                "trap 'echo terminated >> {}; exit 0' TERM",
                record.display()
            )
        };
        let script = format!(
            "{trap}; echo $$ >> {}; echo started; while :; do sleep 0.1; done",
            record.display()
        );
        let mut lock = coord(
            &etcd,
            &[
                "lock",
                &name,
                "--kill-after",
                "1s",
                "--",
                "sh",
                "-c",
                &script,
            ],
        );
        assert_eq!(lock.line().await, "started");
        let members = lock_members(&etcd, &name).await;
        let lease = members[0]["lease"]
            .as_str()
            .expect("the holder's lease")
            .to_owned();
        // The lease revoked by hand, as an operator (or a partition's expiry) would.
        etcdctl_output(&etcd, &["lease", "revoke", &lease]).await;
        assert_eq!(
            lock.exit_code(Duration::from_secs(10)).await,
            75,
            "lost while CMD ran"
        );
        let record = std::fs::read_to_string(&record).unwrap_or_default();
        let pid = record.lines().next().expect("CMD's pid").trim().to_owned();
        let alive = std::process::Command::new("kill")
            .args(["-0", &pid])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(!alive, "CMD (pid {pid}) is gone, ignoring SIGTERM or not");
        assert_eq!(record.contains("terminated"), !ignores_term, "{record}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_runs_at_most_permits_commands_at_once() {
    let etcd = etcd().await;
    let (name, record) = (unique("sem"), temp_file("sem"));
    let mut jobs: Vec<Proc> = (0..3)
        .map(|i| {
            let script = recorded(&record, &i.to_string(), 1.0);
            coord(
                &etcd,
                &[
                    "semaphore",
                    &name,
                    "--permits",
                    "2",
                    "--",
                    "sh",
                    "-c",
                    &script,
                ],
            )
        })
        .collect();
    for job in &mut jobs {
        assert_eq!(job.exit_code(Duration::from_secs(30)).await, 0);
    }
    let record = std::fs::read_to_string(&record).unwrap();
    assert_eq!(record.lines().count(), 6, "{record}");
    assert_eq!(
        most_at_once(&record),
        2,
        "two at once, never three: {record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rwlock_readers_share_and_a_writer_runs_alone() {
    let etcd = etcd().await;
    let (name, record) = (unique("rw"), temp_file("rw"));
    let reader = |i: &str| {
        coord(
            &etcd,
            &[
                "rwlock",
                &name,
                "--read",
                "--",
                "sh",
                "-c",
                &recorded(&record, i, 1.0),
            ],
        )
    };
    let mut readers = [reader("r1"), reader("r2")];
    assert!(
        eventually(Duration::from_secs(10), || async {
            std::fs::read_to_string(&record)
                .unwrap_or_default()
                .lines()
                .count()
                >= 2
        })
        .await
    );
    let mut writer = coord(
        &etcd,
        &[
            "rwlock",
            &name,
            "--write",
            "--",
            "sh",
            "-c",
            &recorded(&record, "w", 0.5),
        ],
    );
    for proc in readers.iter_mut().chain([&mut writer]) {
        assert_eq!(proc.exit_code(Duration::from_secs(30)).await, 0);
    }
    let record = std::fs::read_to_string(&record).unwrap();
    let lines: Vec<&str> = record.lines().collect();
    assert!(
        lines[..2].iter().all(|l| l.starts_with("start r")),
        "readers overlap: {record}"
    );
    let w = lines
        .iter()
        .position(|l| *l == "start w")
        .expect("the writer ran");
    assert_eq!(
        lines[w + 1],
        "end w",
        "nothing runs beside the writer: {record}"
    );
    assert!(
        lines[..w].iter().filter(|l| l.starts_with("end r")).count() == 2,
        "{record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elect_runs_cmd_only_while_leading_and_shows_its_value_to_etcdctl() {
    let etcd = etcd().await;
    let name = unique("elect");
    let mut first = coord(&etcd, &["elect", &name, "--value", "node-1"]);
    assert!(
        first.line().await.starts_with(&format!("{name}/#")),
        "prints the leader key"
    );
    first.line().await; // fencing token, lease
    let mut observer = etcdctl(&etcd, &["elect", "-l", &name]);
    assert!(observer.line().await.starts_with(&format!("{name}/")));
    assert_eq!(
        observer.line().await,
        "node-1",
        "etcdctl elect -l sees our leader's value"
    );
    let script = r#"echo "leading as $ETCD_COORD_LEADER_VALUE""#;
    let mut second = coord(
        &etcd,
        &[
            "elect", &name, "--value", "node-2", "--", "sh", "-c", script,
        ],
    );
    assert_eq!(
        second.line_within(Duration::from_secs(2)).await,
        None,
        "CMD waits for leadership"
    );
    first.signal("TERM"); // resigns
    assert_eq!(first.exit_code(Duration::from_secs(10)).await, 0);
    assert_eq!(second.line().await, "leading as node-2");
    assert_eq!(second.exit_code(Duration::from_secs(10)).await, 0);
    observer.signal("TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_waiters_go_on_when_the_hold_ends_and_a_double_barrier_starts_all_together() {
    let etcd = etcd().await;
    let name = unique("barrier");
    let mut holder = coord(
        &etcd,
        &[
            "barrier",
            &name,
            "--hold",
            "--",
            "sh",
            "-c",
            "echo up; sleep 1.5",
        ],
    );
    assert_eq!(holder.line().await, "up");
    let mut waiter = coord(&etcd, &["barrier", &name, "--wait"]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(waiter.running(), "waits while the barrier is up");
    assert_eq!(holder.exit_code(Duration::from_secs(10)).await, 0);
    assert_eq!(waiter.exit_code(Duration::from_secs(10)).await, 0);
    let (code, _) = coord_output(&etcd, &["barrier", &name, "--wait", "--timeout", "5s"]).await;
    assert_eq!(code, 0, "down: returns at once");

    let double = unique("double");
    let mut one = coord(
        &etcd,
        &["barrier", &double, "--count", "2", "--", "echo", "in"],
    );
    assert_eq!(
        one.line_within(Duration::from_secs(1)).await,
        None,
        "waits for the second"
    );
    let mut two = coord(
        &etcd,
        &["barrier", &double, "--count", "2", "--", "echo", "in"],
    );
    assert_eq!(one.line().await, "in");
    assert_eq!(two.line().await, "in");
    assert_eq!(one.exit_code(Duration::from_secs(10)).await, 0);
    assert_eq!(two.exit_code(Duration::from_secs(10)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_have_their_documented_exit_codes() {
    let etcd = etcd().await;
    let name = unique("codes");
    let cases: [(&[&str], i32); 5] = [
        (&["lock"], 2),                                    // usage: no NAME
        (&["lock", "bad#name", "--", "true"], 2),          // usage: an invalid name
        (&["lock", &name, "--", "/nonexistent/cmd"], 127), // CMD not found
        (&["lock", &name, "--", "/dev/null"], 126),        // CMD cannot run
        (&["rwlock", &name, "--", "true"], 2),             // usage: neither --read nor --write
    ];
    for (args, code) in cases {
        assert_eq!(coord_output(&etcd, args).await.0, code, "{args:?}");
    }
    let started = std::time::Instant::now();
    let unreachable = [
        "--endpoints",
        "127.0.0.1:1",
        "--dial-timeout",
        "1s",
        "--command-timeout",
        "1s",
        "lock",
        &name,
        "--",
        "true",
    ];
    assert_eq!(
        coord_output(&etcd, &unreachable).await.0,
        69,
        "etcd unreachable"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "no hang without --timeout"
    );
}
