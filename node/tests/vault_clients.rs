//! The Vault-compatible HTTP API driven by real third-party clients as separate processes:
//! OpenBao's `bao` CLI and `bao agent`, and Python's `hvac`. `scripts/setup.sh` installs them
//! into `.tools/`. Plus Vault's error statuses and bodies, each request audited once.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Server, arca, audit_events, start};
use serde_json::Value;

fn tools() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools");
    assert!(dir.join("bao").exists(), "the bao CLI is missing: run scripts/setup.sh (the test command does)");
    dir
}

struct Dev {
    _dir: tempfile::TempDir,
    data: PathBuf,
    server: Server,
    root: String,
}

fn dev() -> Dev {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, "node-a");
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    Dev { _dir: dir, data, server, root }
}

fn bao(dev: &Dev, token: &str, args: &[&str]) -> Output {
    Command::new(tools().join("bao"))
        .args(args)
        .env("BAO_ADDR", &dev.server.http)
        .env("BAO_TOKEN", token)
        .env("HOME", dev._dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn bao_ok(dev: &Dev, args: &[&str]) -> String {
    let out = bao(dev, &dev.root, args);
    assert!(out.status.success(), "bao {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `bao <command…> -format=json <args…>`.
fn bao_json(dev: &Dev, command: &[&str], args: &[&str]) -> Value {
    let mut full = command.to_vec();
    full.push("-format=json");
    full.extend_from_slice(args);
    serde_json::from_str(&bao_ok(dev, &full)).unwrap()
}

#[test]
fn the_bao_cli_manages_secrets_tokens_policies_and_approle() {
    let dev = dev();
    bao_ok(&dev, &["kv", "put", "secret/app/db", "password=one", "user=svc"]);
    bao_ok(&dev, &["kv", "put", "secret/app/db", "password=two", "user=svc"]);
    let got = bao_json(&dev, &["kv", "get"], &["secret/app/db"]);
    assert_eq!(got["data"]["data"]["password"], "two");
    assert_eq!(got["data"]["metadata"]["version"], 2);
    assert_eq!(bao_ok(&dev, &["kv", "get", "-version=1", "-field=password", "secret/app/db"]), "one");
    assert_eq!(bao_json(&dev, &["kv", "list"], &["secret/app"]), serde_json::json!(["db"]));
    assert_eq!(bao_json(&dev, &["kv", "metadata", "get"], &["secret/app/db"])["data"]["current_version"], 2);
    bao_ok(&dev, &["kv", "delete", "secret/app/db"]);
    assert!(
        !bao(&dev, &dev.root, &["kv", "get", "secret/app/db"]).status.success(),
        "a deleted version is gone"
    );
    bao_ok(&dev, &["kv", "undelete", "-versions=2", "secret/app/db"]);
    assert_eq!(bao_ok(&dev, &["kv", "get", "-field=password", "secret/app/db"]), "two");
    bao_ok(&dev, &["kv", "destroy", "-versions=1", "secret/app/db"]);
    assert!(!bao(&dev, &dev.root, &["kv", "get", "-version=1", "secret/app/db"]).status.success());
    bao_ok(&dev, &["kv", "metadata", "put", "-max-versions=3", "secret/app/db"]);
    assert_eq!(bao_json(&dev, &["kv", "metadata", "get"], &["secret/app/db"])["data"]["max_versions"], 3);

    // Policies and tokens.
    let policy = dev._dir.path().join("app.hcl");
    std::fs::write(&policy, "path \"secret/data/app/*\" {\n  capabilities = [\"read\"]\n}\n").unwrap();
    bao_ok(&dev, &["policy", "write", "app-read", policy.to_str().unwrap()]);
    let token = bao_json(&dev, &["token", "create"], &["-policy=app-read", "-ttl=1h"]);
    let app_token = token["auth"]["client_token"].as_str().unwrap().to_owned();
    let looked = bao(&dev, &app_token, &["token", "lookup", "-format=json"]);
    let looked: Value = serde_json::from_slice(&looked.stdout).unwrap();
    assert_eq!(looked["data"]["policies"], serde_json::json!(["app-read"]));
    assert_eq!(
        (looked["data"]["id"].as_str(), &looked["data"]["type"]),
        (Some(app_token.as_str()), &serde_json::json!("service"))
    );
    assert!(
        bao(&dev, &app_token, &["kv", "get", "secret/app/db"]).status.success(),
        "the policy allows reading app/*"
    );
    // Capabilities, as `bao token capabilities` asks for them (sys/capabilities-self, and
    // sys/capabilities or sys/capabilities-accessor for another token); `arca` over gRPC too.
    let caps = |token: &str, args: &[&str]| {
        let mut full = vec!["token", "capabilities"];
        full.extend_from_slice(args);
        let out = bao(&dev, token, &full);
        assert!(out.status.success(), "bao {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(caps(&app_token, &["secret/data/app/db"]), "read");
    assert_eq!(caps(&app_token, &["secret/data/other"]), "deny");
    assert_eq!(caps(&dev.root, &["secret/data/other"]), "root");
    assert_eq!(caps(&dev.root, &[&app_token, "secret/data/app/x"]), "read");
    let app_accessor = token["auth"]["accessor"].as_str().unwrap();
    let body = serde_json::json!({"accessor": app_accessor, "paths": ["secret/data/app/x", "data"]});
    let (status, by_accessor) =
        http(&dev, "POST", "sys/capabilities-accessor", Some(&dev.root), Some(body.to_string().into_bytes()));
    assert_eq!(status, 200, "{by_accessor}");
    assert_eq!(by_accessor["data"], serde_json::json!({"secret/data/app/x": ["read"], "data": ["deny"]}));
    assert_eq!(by_accessor["secret/data/app/x"], serde_json::json!(["read"]), "at the top level too");
    assert!(!bao(&dev, &app_token, &["token", "capabilities", &dev.root, "x"]).status.success());
    let grpc = arca(
        &dev.server,
        Some(&app_token),
        &["--format", "json", "token", "capabilities", "secret/data/app/db", "secret/metadata/app/db"],
    );
    assert_eq!(grpc.code, 0, "{}", grpc.stderr);
    let grpc: Value = serde_json::from_str(&grpc.stdout).unwrap();
    assert_eq!(
        grpc["capabilities"],
        serde_json::json!({"secret/data/app/db": ["read"], "secret/metadata/app/db": ["deny"]})
    );
    let denied = bao(&dev, &app_token, &["kv", "put", "secret/app/db", "password=evil"]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );

    // AppRole through generic writes, as teams script it.
    bao_ok(&dev, &["auth", "enable", "approle"]);
    bao_ok(&dev, &["write", "auth/approle/role/web", "token_policies=app-read", "token_ttl=1h"]);
    let role_id = bao_ok(&dev, &["read", "-field=role_id", "auth/approle/role/web/role-id"]);
    let secret_id = bao_ok(&dev, &["write", "-f", "-field=secret_id", "auth/approle/role/web/secret-id"]);
    let login = bao_json(
        &dev,
        &["write"],
        &["auth/approle/login", &format!("role_id={role_id}"), &format!("secret_id={secret_id}")],
    );
    let machine = login["auth"]["client_token"].as_str().unwrap();
    let read = bao(&dev, machine, &["kv", "get", "-field=password", "secret/app/db"]);
    assert_eq!(String::from_utf8_lossy(&read.stdout), "two");

    // Mounts.
    bao_ok(&dev, &["secrets", "enable", "-path=team", "kv-v2"]);
    bao_ok(&dev, &["kv", "put", "team/x", "k=v"]);
    assert_eq!(bao_ok(&dev, &["kv", "get", "-field=k", "team/x"]), "v");
    assert!(bao_json(&dev, &["secrets", "list"], &[]).get("team/").is_some());
    bao_ok(&dev, &["secrets", "disable", "team"]);
    assert!(!bao(&dev, &dev.root, &["kv", "get", "team/x"]).status.success());

    // Mounts of several segments: bao finds the mount through sys/internal/ui/mounts.
    bao_ok(&dev, &["secrets", "enable", "-path=team/a/kv", "kv-v2"]);
    bao_ok(&dev, &["kv", "put", "team/a/kv/app/db", "k=deep"]);
    assert_eq!(bao_ok(&dev, &["kv", "get", "-field=k", "team/a/kv/app/db"]), "deep");
    assert_eq!(bao_json(&dev, &["kv", "list"], &["team/a/kv/app"]), serde_json::json!(["db"]));
    let meta = bao_json(&dev, &["kv", "metadata", "get"], &["team/a/kv/app/db"]);
    assert_eq!(meta["data"]["current_version"], 1);
    assert!(bao_json(&dev, &["secrets", "list"], &[]).get("team/a/kv/").is_some());
    // Mounts do not nest, and a mount name holds none of KV's path words.
    for (path, why) in [
        ("-path=team", "path is already in use at team/a/kv/"),
        ("-path=team/a/kv/more", "path is already in use at team/a/kv/"),
        ("-path=secret/inner", "path is already in use at secret/"),
        ("-path=team/data", "not a reserved name, nor data"),
    ] {
        let out = bao(&dev, &dev.root, &["secrets", "enable", path, "kv-v2"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "{path}: {stderr}");
    }
    // The arca CLI (gRPC) reads it when told the mount, by flag or environment.
    let read = arca(
        &dev.server,
        Some(&dev.root),
        &["--mounts", "team/a/kv", "kv", "get", "--field", "k", "team/a/kv/app/db"],
    );
    assert_eq!((read.code, read.stdout.trim()), (0, "deep"), "{}", read.stderr);
    let listed =
        arca(&dev.server, Some(&dev.root), &["--mounts", "x/y,team/a/kv", "kv", "list", "team/a/kv/app/"]);
    assert_eq!((listed.code, listed.stdout.trim()), (0, "db"), "{}", listed.stderr);
    let undeclared = arca(&dev.server, Some(&dev.root), &["kv", "get", "team/a/kv/app/db"]);
    assert!(undeclared.code != 0 && undeclared.stderr.contains("team"), "{}", undeclared.stderr);
    bao_ok(&dev, &["secrets", "disable", "team/a/kv"]);
    assert!(!bao(&dev, &dev.root, &["kv", "get", "team/a/kv/app/db"]).status.success());
}

/// Vault's KV v2 stores any JSON value, not only strings: written with `bao` from a JSON
/// file, patched over HTTP as a JSON merge patch, read and written over gRPC by `arca`.
#[test]
fn json_values_of_any_type_round_trip_through_bao_http_and_grpc() {
    let dev = dev();
    let db = dev.data.join("arca.db");
    let data = serde_json::json!({
        "user": "svc", "port": 5432, "ratio": 0.25, "tls": true, "none": null,
        "hosts": ["a.example", "b.example"], "pool": {"min": 1, "max": 8, "note": "x", "tags": ["t"]},
    });
    let file = dev._dir.path().join("data.json");
    std::fs::write(&file, data.to_string()).unwrap();
    bao_ok(&dev, &["kv", "put", "secret/cfg", &format!("@{}", file.display())]);
    let got = bao_json(&dev, &["kv", "get"], &["secret/cfg"]);
    assert_eq!(got["data"]["data"], data, "every value as written, of its own type");
    assert_eq!(bao_ok(&dev, &["kv", "get", "-field=port", "secret/cfg"]), "5432");

    // PATCH is a JSON merge patch (RFC 7396): objects merge, null removes, the rest replaces.
    let patch =
        r#"{"data": {"pool": {"max": 16, "note": null, "tags": ["u", 2]}, "tls": null, "port": "5433"}}"#;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let response = agent
        .run(
            ureq::http::Request::builder()
                .method("PATCH")
                .uri(format!("{}/v1/secret/data/cfg", dev.server.http))
                .header("X-Vault-Token", &dev.root)
                .header("Content-Type", "application/merge-patch+json")
                .body(patch.as_bytes().to_vec())
                .unwrap(),
        )
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let merged = serde_json::json!({
        "user": "svc", "port": "5433", "ratio": 0.25, "none": null,
        "hosts": ["a.example", "b.example"], "pool": {"min": 1, "max": 16, "tags": ["u", 2]},
    });
    let (status, body) = http(&dev, "GET", "secret/data/cfg", Some(&dev.root), None);
    assert_eq!((status, &body["data"]["data"]), (200, &merged));
    assert_eq!(body["data"]["metadata"]["version"], 2);

    // Subkeys: the structure without the values, for a token that may not read the data.
    let policy = dev._dir.path().join("keys.hcl");
    std::fs::write(&policy, "path \"secret/subkeys/*\" {\n  capabilities = [\"read\"]\n}\n").unwrap();
    bao_ok(&dev, &["policy", "write", "keys-only", policy.to_str().unwrap()]);
    let token = bao_json(&dev, &["token", "create"], &["-policy=keys-only"]);
    let keys_only = token["auth"]["client_token"].as_str().unwrap().to_owned();
    let (status, body) = http(&dev, "GET", "secret/subkeys/cfg", Some(&keys_only), None);
    assert_eq!(status, 200, "{body}");
    let structure = serde_json::json!({
        "user": null, "port": null, "ratio": null, "none": null, "hosts": null,
        "pool": {"min": null, "max": null, "tags": null},
    });
    assert_eq!(body["data"]["subkeys"], structure);
    assert_eq!(body["data"]["metadata"]["version"], 2);
    assert!(!body.to_string().contains("svc") && !body.to_string().contains("5433"), "no value: {body}");
    let (_, top) = http(&dev, "GET", "secret/subkeys/cfg?depth=1&version=1", Some(&keys_only), None);
    assert_eq!(top["data"]["subkeys"]["pool"], Value::Null, "depth 1: top-level keys only");
    assert_eq!(top["data"]["subkeys"]["tls"], Value::Null, "version 1 had tls");
    assert_eq!(top["data"]["metadata"]["version"], 1);
    assert_eq!(http(&dev, "GET", "secret/data/cfg", Some(&keys_only), None).0, 403);
    let last = audit_events(&db).into_iter().rev().nth(1).unwrap();
    assert_eq!(
        (last.operation, last.path.as_str()),
        (arca_audit::Operation::KvSubkeys, "secret/subkeys/cfg")
    );

    // gRPC, through the arca CLI: the same values; `key:=JSON` writes any of them.
    let cli = |args: &[&str]| {
        let mut full = vec!["--format", "json"];
        full.extend_from_slice(args);
        let run = arca(&dev.server, Some(&dev.root), &full);
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
        serde_json::from_str::<Value>(&run.stdout).unwrap()
    };
    assert_eq!(cli(&["kv", "get", "secret/cfg"])["data"], merged);
    assert_eq!(
        cli(&["kv", "get", "secret/cfg", "--field", "pool"]),
        serde_json::json!({"pool": merged["pool"]})
    );
    let human = arca(&dev.server, Some(&dev.root), &["kv", "get", "secret/cfg", "--field", "hosts"]);
    assert_eq!(
        human.stdout.trim(),
        r#"["a.example","b.example"]"#,
        "JSON text for a value that is not a string"
    );
    cli(&["kv", "put", "secret/cli", "name=x", "port:=5432", r#"tags:=["a",{"b":false}]"#, "quoted:=\"s\""]);
    let (_, body) = http(&dev, "GET", "secret/data/cli", Some(&dev.root), None);
    assert_eq!(
        body["data"]["data"],
        serde_json::json!({"name": "x", "port": 5432, "tags": ["a", {"b": false}], "quoted": "s"})
    );
    cli(&["kv", "patch", "secret/cli", "port:=null", r#"tags:={"c":1}"#]);
    let (_, body) = http(&dev, "GET", "secret/data/cli", Some(&dev.root), None);
    assert_eq!(body["data"]["data"], serde_json::json!({"name": "x", "tags": {"c": 1}, "quoted": "s"}));

    // Bad JSON is refused before anything is sent; a too-deep value by the node, audited.
    let before = audit_events(&db).len();
    let bad = arca(&dev.server, Some(&dev.root), &["kv", "put", "secret/cli", "port:=nope"]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("port: the value after := must be JSON"), "{}", bad.stderr);
    assert_eq!(audit_events(&db).len(), before, "nothing was sent");
    let deep = format!("k:={}1{}", "[".repeat(40), "]".repeat(40));
    let refused = arca(&dev.server, Some(&dev.root), &["kv", "put", "secret/cli", &deep]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("deeper than 32"), "{}", refused.stderr);
    let events = audit_events(&db);
    assert_eq!(events.len(), before + 1);
    assert_eq!(events[before].outcome, arca_audit::Outcome::Error { code: "invalid_argument".into() });
    assert_eq!(cli(&["kv", "get", "secret/cli"])["version"], 2, "the refused write changed nothing");
}

#[test]
fn hvac_reads_and_writes_kv_v2_and_logs_in_with_approle() {
    let dev = dev();
    bao_ok(&dev, &["write", "auth/approle/role/py", "token_policies=root"]);
    let script = dev._dir.path().join("client.py");
    std::fs::write(
        &script,
        r#"
import os, sys, hvac
c = hvac.Client(url=os.environ["BAO_ADDR"], token=os.environ["BAO_TOKEN"])
assert c.is_authenticated()
c.secrets.kv.v2.create_or_update_secret(path="py/db", secret={"password": "hv1"})
c.secrets.kv.v2.create_or_update_secret(path="py/db", secret={"password": "hv2"}, cas=1)
try:
    c.secrets.kv.v2.create_or_update_secret(path="py/db", secret={"password": "stale"}, cas=1)
    sys.exit("a stale cas was accepted")
except hvac.exceptions.InvalidRequest:
    pass
r = c.secrets.kv.v2.read_secret_version(path="py/db", raise_on_deleted_version=True)
assert r["data"]["data"] == {"password": "hv2"} and r["data"]["metadata"]["version"] == 2, r
assert c.secrets.kv.v2.read_secret_version(path="py/db", version=1, raise_on_deleted_version=True)["data"]["data"]["password"] == "hv1"
assert c.secrets.kv.v2.list_secrets(path="py")["data"]["keys"] == ["db"]
assert c.secrets.kv.v2.read_secret_metadata(path="py/db")["data"]["current_version"] == 2
rid = c.auth.approle.read_role_id("py")["data"]["role_id"]
sid = c.auth.approle.generate_secret_id("py")["data"]["secret_id"]
login = c.auth.approle.login(role_id=rid, secret_id=sid)
assert login["auth"]["policies"] == ["root"], login
assert c.secrets.kv.v2.read_secret_version(path="py/db", raise_on_deleted_version=True)["data"]["data"]["password"] == "hv2"
print("hvac ok")
"#,
    )
    .unwrap();
    let out = Command::new(tools().join("venv/bin/python"))
        .arg(&script)
        .env("BAO_ADDR", &dev.server.http)
        .env("BAO_TOKEN", &dev.root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hvac ok");
}

fn wait_for_file(path: &std::path::Path, contains: &str, deadline: Duration) {
    let started = Instant::now();
    while !std::fs::read_to_string(path).is_ok_and(|t| t.contains(contains)) {
        assert!(started.elapsed() < deadline, "{} never contained {contains:?}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bao_agent_renders_a_secret_and_re_renders_it_when_it_changes() {
    let dev = dev();
    bao_ok(&dev, &["kv", "put", "secret/app/db", "password=first"]);
    let dir = dev._dir.path();
    std::fs::write(dir.join("token"), &dev.root).unwrap();
    let rendered = dir.join("rendered.txt");
    let config = format!(
        r#"
vault {{ address = "{addr}" }}
auto_auth {{
  method "token_file" {{
    config = {{ token_file_path = "{token}" }}
  }}
}}
template_config {{ static_secret_render_interval = "1s" }}
template {{
  contents    = "{{{{ with secret \"secret/data/app/db\" }}}}{{{{ .Data.data.password }}}}{{{{ end }}}}"
  destination = "{dest}"
}}
"#,
        addr = dev.server.http,
        token = dir.join("token").display(),
        dest = rendered.display()
    );
    std::fs::write(dir.join("agent.hcl"), config).unwrap();
    let mut agent = Command::new(tools().join("bao"))
        .args(["agent", "-config"])
        .arg(dir.join("agent.hcl"))
        .env("HOME", dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for_file(&rendered, "first", Duration::from_secs(30));
    bao_ok(&dev, &["kv", "put", "secret/app/db", "password=second"]);
    wait_for_file(&rendered, "second", Duration::from_secs(30));
    let _ = agent.kill();
    let _ = agent.wait();
}

fn http(dev: &Dev, method: &str, path: &str, token: Option<&str>, body: Option<Vec<u8>>) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("{}/v1/{path}", dev.server.http);
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        request = request.header("X-Vault-Token", t);
    }
    let mut response = agent.run(request.body(body.unwrap_or_default()).unwrap()).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn vault_status_codes_and_error_bodies_and_one_audit_event_each() {
    let dev = dev();
    let db = dev.data.join("arca.db");
    let put = |token: Option<&str>, body: &str| {
        http(&dev, "POST", "secret/data/app/db", token, Some(body.as_bytes().to_vec()))
    };
    assert_eq!(put(Some(&dev.root), r#"{"data": {"password": "kept"}}"#).0, 200);
    let before = audit_events(&db).len();
    let cases: Vec<(u16, (u16, Value))> = vec![
        (403, put(Some("arca_wrong"), r#"{"data": {"password": "x"}}"#)),
        (403, put(None, r#"{"data": {"password": "x"}}"#)),
        (400, put(Some(&dev.root), r#"{"data": {"password": "#)),
        (
            400,
            put(
                Some(&dev.root),
                &format!(r#"{{"data": {{"password": {}5{}}}}}"#, "[".repeat(33), "]".repeat(33)),
            ),
        ),
        (400, put(Some(&dev.root), r#"{"data": "not an object"}"#)),
        (400, put(Some(&dev.root), r#"{"data": {"password": "x"}, "options": {"cas": 7}}"#)),
        (413, http(&dev, "POST", "secret/data/app/db", Some(&dev.root), Some(vec![b' '; 300 * 1024]))),
        (404, http(&dev, "GET", "secret/data/app/none", Some(&dev.root), None)),
        (404, http(&dev, "GET", "nothing/here", Some(&dev.root), None)),
        (405, http(&dev, "PATCH", "secret/delete/app/db", Some(&dev.root), None)),
        (400, http(&dev, "POST", "sys/mounts/x", Some(&dev.root), Some(br#"{"type": "pki"}"#.to_vec()))),
    ];
    for (expected, (status, body)) in &cases {
        assert_eq!(status, expected, "{body}");
        assert!(body["errors"].is_array(), "Vault's error shape: {body}");
    }
    assert_eq!(audit_events(&db).len(), before + cases.len(), "each request has exactly one audit event");
    // Outside /v1/ (and the metrics and log endpoints): a 404 in Vault's shape, audited too.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = agent
        .get(format!("{}/v2/secret/data/app/db", dev.server.http))
        .header("X-Vault-Token", &dev.root)
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert!(response.headers().get("x-arca-audit-position").is_some(), "the refusal's audit position");
    let request_id = response.headers().get("x-arca-request-id").unwrap().to_str().unwrap().to_owned();
    let body: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    assert!(body["errors"].is_array(), "Vault's error shape: {body}");
    let events = audit_events(&db);
    assert_eq!(events.len(), before + cases.len() + 1);
    let last = events.last().unwrap();
    assert_eq!(last.operation, arca_audit::Operation::Rejected);
    assert_eq!((last.path.as_str(), last.actor.entity.as_str()), ("/v2/secret/data/app/db", "root"));
    assert_eq!(last.outcome, arca_audit::Outcome::Error { code: "not_found".into() });
    assert_eq!(last.request_id, request_id, "the refusal names its event");
    // Nothing changed.
    let (status, body) = http(&dev, "GET", "secret/data/app/db", Some(&dev.root), None);
    assert_eq!((status, body["data"]["data"]["password"].as_str()), (200, Some("kept")));
    assert_eq!(body["data"]["metadata"]["version"], 1);
    // A missing capability is a 403 too.
    let created = http(
        &dev,
        "POST",
        "auth/token/create",
        Some(&dev.root),
        Some(br#"{"policies": ["none"], "ttl": "10m"}"#.to_vec()),
    );
    let weak = created.1["auth"]["client_token"].as_str().unwrap().to_owned();
    assert_eq!(http(&dev, "GET", "secret/data/app/db", Some(&weak), None).0, 403);
    // Health answers like Vault's.
    let (status, health) = http(&dev, "GET", "sys/health", None, None);
    assert_eq!(
        (status, health["initialized"].as_bool(), health["sealed"].as_bool()),
        (200, Some(true), Some(false))
    );
}

/// Response wrapping with the real `bao` CLI: a secret read and an AppRole secret id wrapped
/// (`-wrap-ttl`), unwrapped once by whoever holds the token, `sys/wrapping/wrap` and
/// `lookup`; each step audited.
#[test]
fn bao_wraps_and_unwraps_responses_once() {
    let dev = dev();
    let db = dev.data.join("arca.db");
    bao_ok(&dev, &["kv", "put", "secret/app/db", "password=wrapped-pw"]);
    let wrapped = bao_json(&dev, &["kv", "get"], &["-wrap-ttl=5m", "secret/app/db"]);
    let token = wrapped["wrap_info"]["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("arcaw_"), "{wrapped}");
    assert_eq!(wrapped["wrap_info"]["creation_path"], "secret/data/app/db");
    assert_eq!(wrapped["wrap_info"]["ttl"], 300);
    assert!(!wrapped.to_string().contains("wrapped-pw"), "the response holds no secret");
    // The wrap's event shares the read's request id.
    let events = audit_events(&db);
    let wrap_event = events.last().unwrap();
    assert_eq!(
        (wrap_event.operation, wrap_event.path.as_str()),
        (arca_audit::Operation::WrapCreate, "secret/data/app/db")
    );
    let read_event = &events[events.len() - 2];
    assert_eq!(
        (read_event.operation, &read_event.request_id),
        (arca_audit::Operation::KvRead, &wrap_event.request_id)
    );

    // Looked up without being used, then unwrapped with the token as the client token (no
    // other credential), once.
    let looked = bao_json(&dev, &["write"], &["sys/wrapping/lookup", &format!("token={token}")]);
    assert_eq!(looked["data"]["creation_path"], "secret/data/app/db");
    let out = bao(&dev, &token, &["unwrap", "-format=json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let unwrapped: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(unwrapped["data"]["data"]["password"], "wrapped-pw");
    let again = bao(&dev, &dev.root, &["unwrap", &token]);
    assert!(!again.status.success(), "single use");
    assert!(String::from_utf8_lossy(&again.stderr).contains("wrapping token is not valid"));

    // Secure introduction: an AppRole secret id delivered wrapped, unwrapped by the app.
    bao_ok(&dev, &["write", "auth/approle/role/web", "token_policies=default", "token_ttl=1h"]);
    let role_id = bao_ok(&dev, &["read", "-field=role_id", "auth/approle/role/web/role-id"]);
    let wrapped = bao_json(&dev, &["write"], &["-wrap-ttl=60s", "-f", "auth/approle/role/web/secret-id"]);
    let wrap_token = wrapped["wrap_info"]["token"].as_str().unwrap().to_owned();
    let out = bao(&dev, &wrap_token, &["unwrap", "-format=json"]);
    let secret_id: Value = serde_json::from_slice(&out.stdout).unwrap();
    let secret_id = secret_id["data"]["secret_id"].as_str().unwrap().to_owned();
    let login = bao_json(
        &dev,
        &["write"],
        &["auth/approle/login", &format!("role_id={role_id}"), &format!("secret_id={secret_id}")],
    );
    assert!(login["auth"]["client_token"].as_str().is_some_and(|t| t.starts_with("arca_")));

    // Wrapping what the caller sends.
    let wrapped = bao_json(&dev, &["write"], &["-wrap-ttl=1m", "sys/wrapping/wrap", "note=hello"]);
    let note_token = wrapped["wrap_info"]["token"].as_str().unwrap().to_owned();
    let note = bao_json(&dev, &["unwrap"], &[&note_token]);
    assert_eq!(note["data"]["note"], "hello");
    // Refused, audited: a bad wrap TTL, and sys/wrapping/wrap without one.
    let before = audit_events(&db).len();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let bad_ttl = agent
        .get(format!("{}/v1/secret/data/app/db", dev.server.http))
        .header("X-Vault-Token", &dev.root)
        .header("X-Vault-Wrap-TTL", "soon")
        .call()
        .unwrap();
    assert_eq!(bad_ttl.status().as_u16(), 400);
    let (status, _) =
        http(&dev, "POST", "sys/wrapping/wrap", Some(&dev.root), Some(br#"{"a": "b"}"#.to_vec()));
    assert_eq!(status, 400);
    // A TTL past 7 days is refused before the request runs: the write it would wrap is not made.
    let too_long = agent
        .post(format!("{}/v1/secret/data/app/never", dev.server.http))
        .header("X-Vault-Token", &dev.root)
        .header("X-Vault-Wrap-TTL", "8d")
        .send(r#"{"data": {"password": "never-written"}}"#)
        .unwrap();
    assert_eq!(too_long.status().as_u16(), 400);
    let (status, _) = http(&dev, "GET", "secret/data/app/never", Some(&dev.root), None);
    assert_eq!(status, 404, "the write did not run");
    let events = audit_events(&db);
    assert_eq!(events.len(), before + 4, "three refusals and the read");
    assert!(events[before..].iter().all(|e| e.operation != arca_audit::Operation::KvWrite));
}

/// `arca --wrap-ttl` wraps any call's answer over gRPC; `arca unwrap` returns it once — and
/// unwraps what `bao … -wrap-ttl` wrapped over HTTP too.
#[test]
fn arca_wraps_over_grpc_and_unwraps_what_either_api_wrapped() {
    let dev = dev();
    let db = dev.data.join("arca.db");
    let json = |token: Option<&str>, args: &[&str]| {
        let mut full = vec!["--format", "json"];
        full.extend_from_slice(args);
        let run = arca(&dev.server, token, &full);
        assert_eq!(run.code, 0, "arca {args:?}: {}", run.stderr);
        serde_json::from_str::<Value>(&run.stdout).unwrap()
    };
    json(Some(&dev.root), &["kv", "put", "secret/app/db", "password=grpc-wrapped-pw", "port:=5432"]);
    let wrapped = json(Some(&dev.root), &["--wrap-ttl", "5m", "kv", "get", "secret/app/db"]);
    assert!(!wrapped.to_string().contains("grpc-wrapped-pw"), "{wrapped}");
    let token = wrapped["wrap_info"]["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("arcaw_"), "{wrapped}");
    assert_eq!(wrapped["wrap_info"]["ttl"], 300);
    // The read and its wrap are audited under one request id.
    let events = audit_events(&db);
    let under: Vec<_> =
        events.iter().filter(|e| Some(e.request_id.as_str()) == wrapped["request_id"].as_str()).collect();
    assert_eq!(under.len(), 2, "the read and the wrap");
    // Looked up, then unwrapped with the token alone (no client token), once.
    let looked = json(None, &["unwrap", "--lookup", &token]);
    assert_eq!(looked["creation_path"], "/arca.v1.Arca/KvGet");
    let unwrapped = json(None, &["unwrap", &token]);
    assert_eq!(unwrapped["data"]["password"], "grpc-wrapped-pw");
    assert_eq!(unwrapped["data"]["port"], 5432);
    // Printed with the unwrap's own receipt: its event is the log's latest.
    let unwrap_event = audit_events(&db).pop().unwrap();
    assert_eq!(unwrap_event.operation, arca_audit::Operation::WrapUnwrap);
    assert_eq!(unwrapped["request_id"].as_str(), Some(unwrap_event.request_id.as_str()));
    assert!(unwrapped["audit_position"].is_string(), "{unwrapped}");
    let again = arca(&dev.server, None, &["unwrap", &token]);
    assert_ne!(again.code, 0, "single use");
    assert!(again.stderr.contains("wrapping token is not valid"), "{}", again.stderr);

    // What bao wrapped over HTTP, arca unwraps over gRPC (its JSON body); the token may
    // come in as ARCA_TOKEN, as `bao unwrap` takes it.
    let by_bao = bao_json(&dev, &["kv", "get"], &["-wrap-ttl=5m", "secret/app/db"]);
    let bao_token = by_bao["wrap_info"]["token"].as_str().unwrap().to_owned();
    let body = json(Some(&bao_token), &["unwrap"]);
    assert_eq!(body["data"]["data"]["password"], "grpc-wrapped-pw");

    // Secure introduction over gRPC: a secret id delivered wrapped, unwrapped, logged in with.
    json(Some(&dev.root), &["approle", "write", "web", "--policy", "default"]);
    let role_id =
        json(Some(&dev.root), &["approle", "role-id", "web"])["role_id"].as_str().unwrap().to_owned();
    let human = arca(&dev.server, Some(&dev.root), &["--wrap-ttl", "60s", "approle", "secret-id", "web"]);
    assert_eq!(human.code, 0, "{}", human.stderr);
    let line = human.stdout.lines().find(|l| l.starts_with("wrapping_token ")).unwrap();
    let wrap_token = line.split_whitespace().nth(1).unwrap().to_owned();
    let secret = json(None, &["unwrap", &wrap_token]);
    let secret_id = secret["secret_id"].as_str().unwrap().to_owned();
    let login = json(None, &["approle", "login", "--role-id", &role_id, "--secret-id", &secret_id]);
    assert!(login["token"].as_str().is_some_and(|t| t.starts_with("arca_")), "{login}");

    // What arca wraps over gRPC, a Vault client unwraps over HTTP in Vault's shape: a secret
    // id it logs in with, a KV read (its values typed), a token.
    let wrapped = json(Some(&dev.root), &["--wrap-ttl", "60s", "approle", "secret-id", "web"]);
    let by_bao = bao_json(&dev, &["unwrap"], &[wrapped["wrap_info"]["token"].as_str().unwrap()]);
    let secret_id = by_bao["data"]["secret_id"].as_str().unwrap().to_owned();
    let login = bao_json(
        &dev,
        &["write"],
        &["auth/approle/login", &format!("role_id={role_id}"), &format!("secret_id={secret_id}")],
    );
    assert!(login["auth"]["client_token"].as_str().is_some_and(|t| t.starts_with("arca_")), "{login}");
    let wrapped = json(Some(&dev.root), &["--wrap-ttl", "60s", "kv", "get", "secret/app/db"]);
    let by_bao = bao_json(&dev, &["unwrap"], &[wrapped["wrap_info"]["token"].as_str().unwrap()]);
    assert_eq!(by_bao["data"]["data"], serde_json::json!({"password": "grpc-wrapped-pw", "port": 5432}));
    assert_eq!(by_bao["data"]["metadata"]["version"], 1, "{by_bao}");
    let wrapped = json(Some(&dev.root), &["--wrap-ttl", "60s", "token", "create", "--policy", "default"]);
    let by_bao = bao_json(&dev, &["unwrap"], &[wrapped["wrap_info"]["token"].as_str().unwrap()]);
    let token = by_bao["auth"]["client_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("arca_"), "{by_bao}");
    assert!(by_bao["auth"]["policies"].as_array().unwrap().contains(&"default".into()), "{by_bao}");
    let looked_up = bao_json(&dev, &["token", "lookup"], &[&token]);
    assert_eq!(looked_up["data"]["accessor"], by_bao["auth"]["accessor"]);

    // Only a command that is one call can be wrapped; a bad TTL is refused before sending.
    let refused = arca(&dev.server, Some(&dev.root), &["--wrap-ttl", "5m", "run", "--", "true"]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("--wrap-ttl"), "{}", refused.stderr);
    let bad = arca(&dev.server, Some(&dev.root), &["--wrap-ttl", "soon", "kv", "get", "secret/app/db"]);
    assert_ne!(bad.code, 0);
}

/// A KV mount's settings (`<mount>/config`) as `bao` writes and reads them: the default
/// maximum of versions, check-and-set for every write, and a deletion time for new versions
/// (the mount's, or a secret's own from its metadata).
#[test]
fn kv_mount_config_sets_the_defaults_of_its_secrets() {
    let dev = dev();
    bao_ok(
        &dev,
        &["write", "secret/config", "max_versions=2", "cas_required=true", "delete_version_after=1h"],
    );
    let config = bao_json(&dev, &["read"], &["secret/config"]);
    assert_eq!(
        config["data"],
        serde_json::json!({"max_versions": 2, "cas_required": true, "delete_version_after": "1h0m0s"})
    );
    let refused = bao(&dev, &dev.root, &["kv", "put", "secret/app/db", "v=1"]);
    assert!(!refused.status.success(), "the mount requires check-and-set");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("check-and-set"));
    for (cas, v) in [("0", "1"), ("1", "2"), ("2", "3")] {
        bao_ok(&dev, &["kv", "put", &format!("-cas={cas}"), "secret/app/db", &format!("v={v}")]);
    }
    let meta = bao_json(&dev, &["kv", "metadata", "get"], &["secret/app/db"]);
    let versions = meta["data"]["versions"].as_object().unwrap();
    assert_eq!(versions.keys().collect::<Vec<_>>(), ["2", "3"], "the mount keeps two versions");
    let deletion = versions["3"]["deletion_time"].as_str().unwrap();
    assert!(!deletion.is_empty(), "version 3 is deleted an hour after it was written: {meta}");
    assert_eq!(bao_ok(&dev, &["kv", "get", "-field=v", "secret/app/db"]), "3", "not yet");
    // A secret's own setting wins, and shows in its metadata.
    bao_ok(&dev, &["kv", "metadata", "put", "-delete-version-after=30m", "secret/app/db"]);
    let meta = bao_json(&dev, &["kv", "metadata", "get"], &["secret/app/db"]);
    assert_eq!(meta["data"]["delete_version_after"], "30m0s");
    // Bad settings are refused and change nothing.
    let bad = bao(&dev, &dev.root, &["write", "secret/config", "max_versions=-1"]);
    assert!(!bad.status.success());
    let bad = bao(&dev, &dev.root, &["write", "secret/config", "delete_version_after=soon"]);
    assert!(!bad.status.success());
    assert_eq!(bao_json(&dev, &["read"], &["secret/config"])["data"]["max_versions"], 2);
}
