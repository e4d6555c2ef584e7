//! `arca run` against a real node: secrets reach the command's environment and files (mode
//! 0600, removed afterwards), every fetch is audited, the command's exit code comes back,
//! signals pass through, and `--mask` hides values in the command's output; a value that
//! is not a string arrives as its JSON text.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arca_audit::Operation;
use common::{Server, arca, audit_events, start};

const VALUE: &str = "s3cret-9f1c";

fn run_cmd(server: &Server, token: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arca"));
    cmd.arg("run").args(args).env("ARCA_ADDR", &server.addr).env("ARCA_TOKEN", token);
    cmd
}

#[test]
fn run_injects_secrets_and_hands_back_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, "n1");
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    assert_eq!(
        arca(&server, Some(&root), &["kv", "put", "secret/app/db", &format!("password={VALUE}"), "user=app"])
            .code,
        0
    );
    let reads_before =
        audit_events(&data.join("arca.db")).iter().filter(|e| e.operation == Operation::KvRead).count();

    // The environment, and the exit code.
    let ok = run_cmd(
        &server,
        &root,
        &["--env", "DB=secret/app/db#password", "--", "sh", "-c", &format!("test \"$DB\" = {VALUE}")],
    )
    .output()
    .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    let seven = run_cmd(&server, &root, &["--env", "DB=secret/app/db#password", "--", "sh", "-c", "exit 7"])
        .output()
        .unwrap();
    assert_eq!(seven.status.code(), Some(7));
    assert!(
        !String::from_utf8_lossy(&seven.stdout).contains(VALUE)
            && !String::from_utf8_lossy(&seven.stderr).contains(VALUE)
    );

    // Files: 0600, in a private directory, gone afterwards; an absolute path too.
    let record = dir.path().join("record");
    std::fs::create_dir(&record).unwrap();
    let absolute = dir.path().join("absolute.pem");
    let script = format!(
        "test \"$(cat \"$ARCA_SECRETS_DIR/db.pw\")\" = {VALUE} && test \"$(cat {abs})\" = app && stat -c %a \"$ARCA_SECRETS_DIR/db.pw\" > {rec}/mode && stat -c %a {abs} > {rec}/absmode && echo \"$ARCA_SECRETS_DIR\" > {rec}/dir",
        abs = absolute.display(),
        rec = record.display()
    );
    let files = run_cmd(
        &server,
        &root,
        &[
            "--file",
            "db.pw=secret/app/db#password",
            "--file",
            &format!("{}=secret/app/db#user", absolute.display()),
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .output()
    .unwrap();
    assert_eq!(files.status.code(), Some(0), "{}", String::from_utf8_lossy(&files.stderr));
    assert_eq!(std::fs::read_to_string(record.join("mode")).unwrap().trim(), "600");
    assert_eq!(std::fs::read_to_string(record.join("absmode")).unwrap().trim(), "600");
    let private = std::fs::read_to_string(record.join("dir")).unwrap().trim().to_owned();
    assert!(!std::path::Path::new(&private).exists(), "the private directory {private} was left behind");
    assert!(!absolute.exists(), "the secret file was left behind");

    // --mask: the command prints the value, its output shows *****.
    let masked = run_cmd(
        &server,
        &root,
        &[
            "--mask",
            "--env",
            "DB=secret/app/db#password",
            "--",
            "sh",
            "-c",
            "echo \"pw=$DB\"; echo \"err $DB\" >&2",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(masked.status.code(), Some(0));
    let (out, err) = (String::from_utf8_lossy(&masked.stdout), String::from_utf8_lossy(&masked.stderr));
    assert_eq!(out.trim(), "pw=*****");
    assert!(err.contains("err *****") && !err.contains(VALUE), "{err}");

    // A missing field: a clear error, no value, no command run.
    let missing = run_cmd(&server, &root, &["--env", "X=secret/app/db#nope", "--", "sh", "-c", "exit 0"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no field \"nope\""));

    // Signals pass through: SIGTERM to arca reaches the command, whose exit code returns.
    let mark = dir.path().join("started");
    let script = format!("trap 'exit 42' TERM; touch {}; while true; do sleep 0.05; done", mark.display());
    let mut child =
        run_cmd(&server, &root, &["--env", "DB=secret/app/db#password", "--", "sh", "-c", &script])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while !mark.exists() {
        assert!(Instant::now() < end, "the command did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(child.wait().unwrap().code(), Some(42));

    // Every fetch was an audited read (one per secret per run).
    let reads =
        audit_events(&data.join("arca.db")).iter().filter(|e| e.operation == Operation::KvRead).count();
    assert_eq!(reads - reads_before, 6, "ok, seven, files, masked, missing, signal");

    // A value that is not a string reaches the command as its JSON text.
    let put = arca(&server, Some(&root), &["kv", "put", "secret/app/cfg", r#"hosts:=["a", {"port": 5432}]"#]);
    assert_eq!(put.code, 0, "{}", put.stderr);
    let json = run_cmd(
        &server,
        &root,
        &["--env", "H=secret/app/cfg#hosts", "--", "sh", "-c", r#"test "$H" = '["a",{"port":5432}]'"#],
    )
    .output()
    .unwrap();
    assert_eq!(json.status.code(), Some(0), "{}", String::from_utf8_lossy(&json.stderr));
}
