//! `arca agent`: a sidecar that logs in (AppRole, or the token it is given), keeps its token
//! renewed, renders templates (`{{ secret "<mount>/<path>#<field>" }}`) to files atomically
//! (write, fsync, rename; mode 0600), re-renders when a secret's version changes, runs a
//! command after each render, and reports its state on a local health endpoint. It reads a
//! secret only when its version changed (a metadata read each interval is how it learns):
//! every read and metadata read is audited as the agent's identity.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use zeroize::Zeroizing;

use super::run::parse_binding;
use super::{Client, Failure, local, proto};

/// One template: where it comes from and where it is rendered.
struct Template {
    source: String,
    dest: PathBuf,
    /// `(mount, path, field)` of each `{{ secret "…" }}`, in order.
    refs: Vec<(String, String, String)>,
}

/// Splits a template into literal text and secret references.
fn parse_template(text: &str) -> Result<Vec<(String, String, String)>, Failure> {
    let mut refs = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let end = rest[start..].find("}}").ok_or_else(|| local("template: an unclosed {{"))? + start;
        let inner = rest[start + 2..end].trim();
        let arg = inner
            .strip_prefix("secret")
            .map(str::trim)
            .and_then(|a| a.strip_prefix('"'))
            .and_then(|a| a.strip_suffix('"'))
            .ok_or_else(|| {
                local(format!(
                    "template: expected {{{{ secret \"<mount>/<path>#<field>\" }}}}, got {{{{ {inner} }}}}"
                ))
            })?;
        let b = parse_binding(&format!("x={arg}"), "template")?;
        refs.push((b.mount, b.path, b.field));
        rest = &rest[end + 2..];
    }
    Ok(refs)
}

fn render(
    template: &Template,
    values: &BTreeMap<(String, String), BTreeMap<String, Zeroizing<String>>>,
) -> Result<Zeroizing<String>, Failure> {
    let mut out = Zeroizing::new(String::with_capacity(template.source.len()));
    let mut rest = template.source.as_str();
    let mut refs = template.refs.iter();
    while let Some(start) = rest.find("{{") {
        let end = rest[start..].find("}}").unwrap_or(0) + start;
        out.push_str(&rest[..start]);
        let (mount, path, field) = refs.next().ok_or_else(|| local("template changed while rendering"))?;
        let value = values
            .get(&(mount.clone(), path.clone()))
            .and_then(|d| d.get(field))
            .ok_or_else(|| Failure { code: 4, message: format!("{mount}/{path} has no field {field:?}") })?;
        out.push_str(value);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn write_atomic(dest: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut name = [0u8; 6];
    rand::fill(&mut name);
    let tmp = dir.join(format!(".arca-agent-{}", hex::encode(name)));
    {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dest)
}

/// What `/health` reports.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct State {
    renders: u64,
    last_render_unix_ms: u64,
    secrets: usize,
    errors: u64,
    last_error: Option<String>,
    token_expires_unix_ms: u64,
    token_renewals: u64,
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    c: &Client,
    templates: &[String],
    interval: Duration,
    exec: Option<&str>,
    health_addr: Option<std::net::SocketAddr>,
    once: bool,
) -> Result<(), Failure> {
    let mut parsed = Vec::new();
    for spec in templates {
        let (src, dest) = spec
            .split_once(':')
            .ok_or_else(|| local(format!("--template {spec}: expected SOURCE:DESTINATION")))?;
        let source = std::fs::read_to_string(src).map_err(|e| local(format!("{src}: {e}")))?;
        let refs = parse_template(&source)?;
        parsed.push(Template { source, dest: PathBuf::from(dest), refs });
    }
    // Logs in (AppRole or certificate) on this first call; a given token is looked up.
    let mut token = c.token_info().await?;
    let state = Arc::new(Mutex::new(State::default()));
    if let Some(addr) = health_addr {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|e| local(format!("{addr}: {e}")))?;
        eprintln!(
            "arca agent: health on http://{}/health",
            listener.local_addr().map_err(|e| local(e.to_string()))?
        );
        let s = state.clone();
        let app = axum::Router::new().route(
            "/health",
            axum::routing::get(move || {
                let s = s.lock().unwrap_or_else(|p| p.into_inner()).clone();
                async move { axum::Json(json!(s)) }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    let mut versions: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut values: BTreeMap<(String, String), BTreeMap<String, Zeroizing<String>>> = BTreeMap::new();
    let mut renewals = 0;
    loop {
        let round =
            agent_round(c, &parsed, &mut versions, &mut values, exec, &mut token, &mut renewals).await;
        {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.secrets = values.len();
            s.token_expires_unix_ms = token.expire_unix_ms;
            s.token_renewals = renewals;
            match &round {
                Ok(rendered) => {
                    if *rendered {
                        s.renders += 1;
                        s.last_render_unix_ms = arca_node::node::now_unix_ms();
                    }
                }
                Err(f) => {
                    s.errors += 1;
                    s.last_error = Some(f.message.clone());
                }
            }
        }
        if once {
            return round.map(|_| ());
        }
        if let Err(f) = round {
            eprintln!("arca agent: {}", f.message);
        }
        tokio::time::sleep(interval).await;
    }
}

/// One round: renew the token when half its TTL is gone, learn versions, re-read what
/// changed, re-render. Returns whether anything was rendered.
async fn agent_round(
    c: &Client,
    templates: &[Template],
    versions: &mut BTreeMap<(String, String), u64>,
    values: &mut BTreeMap<(String, String), BTreeMap<String, Zeroizing<String>>>,
    exec: Option<&str>,
    token: &mut proto::TokenInfo,
    renewals: &mut u64,
) -> Result<bool, Failure> {
    let now = arca_node::node::now_unix_ms();
    if token.renewable
        && token.expire_unix_ms != 0
        && token.expire_unix_ms.saturating_sub(now) < token.ttl_secs * 1000 / 2
    {
        // An expired token is replaced by a new login inside the client, then renewed.
        *token = c.renew_token(None).await?;
        *renewals += 1;
    }
    let mut changed = Vec::new();
    let wanted: std::collections::BTreeSet<(String, String)> =
        templates.iter().flat_map(|t| t.refs.iter().map(|(m, p, _)| (m.clone(), p.clone()))).collect();
    for (mount, path) in &wanted {
        let full = format!("{mount}/{path}");
        let meta = c.metadata(&full).await?;
        let key = (mount.clone(), path.clone());
        if versions.get(&key) != Some(&meta.current_version) {
            let secret = c.read_version(&full, meta.current_version).await?;
            values.insert(key.clone(), secret.data.into_iter().map(|(k, v)| (k, v.into_inner())).collect());
            versions.insert(key.clone(), meta.current_version);
            changed.push(key);
        }
    }
    let mut rendered = false;
    for t in templates {
        if !t.refs.iter().any(|(m, p, _)| changed.contains(&(m.clone(), p.clone()))) {
            continue;
        }
        let text = render(t, values)?;
        write_atomic(&t.dest, text.as_bytes())
            .map_err(|e| local(format!("cannot write {}: {e}", t.dest.display())))?;
        rendered = true;
    }
    if rendered && let Some(cmd) = exec {
        let status = tokio::process::Command::new("sh").args(["-c", cmd]).status().await;
        if !status.is_ok_and(|s| s.success()) {
            return Err(local(format!("--exec {cmd:?} failed")));
        }
    }
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_render() {
        let refs =
            parse_template("user={{ secret \"secret/app/db#user\" }} pw={{secret \"kv/x#p\"}}\n").unwrap();
        assert_eq!(
            refs,
            vec![("secret".into(), "app/db".into(), "user".into()), ("kv".into(), "x".into(), "p".into())]
        );
        let t = Template {
            source: "u={{ secret \"secret/app/db#user\" }}!".into(),
            dest: "x".into(),
            refs: parse_template("{{ secret \"secret/app/db#user\" }}").unwrap(),
        };
        let mut values = BTreeMap::new();
        values.insert(
            ("secret".into(), "app/db".into()),
            BTreeMap::from([("user".to_owned(), Zeroizing::new("app".to_owned()))]),
        );
        assert_eq!(render(&t, &values).unwrap().as_str(), "u=app!");
        for bad in ["{{ secret \"nofield\" }}", "{{ env \"X\" }}", "{{ secret \"a/b#c\""] {
            assert!(parse_template(bad).is_err(), "{bad}");
        }
    }
}
