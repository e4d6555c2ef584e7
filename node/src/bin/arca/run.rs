//! `arca run`: fetch secrets (each fetch audited), start a command with them in its
//! environment or in files, pass signals through, return its exit code. Secret values never
//! appear in arca's own output; `--mask` also hides them in the command's output.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use zeroize::Zeroizing;

use super::{Client, Failure, local, split_mount};

/// `NAME=<mount>/<path>#<field>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Binding {
    pub(crate) name: String,
    pub(crate) mount: String,
    pub(crate) path: String,
    pub(crate) field: String,
}

pub(crate) fn parse_binding(spec: &str, what: &str) -> Result<Binding, Failure> {
    let (name, source) = spec
        .split_once('=')
        .ok_or_else(|| local(format!("{what} {spec:?}: expected NAME=<mount>/<path>#<field>")))?;
    let (path, field) = source
        .rsplit_once('#')
        .ok_or_else(|| local(format!("{what} {name}: name the field: <mount>/<path>#<field>")))?;
    if name.is_empty() || field.is_empty() || name.len() > 255 {
        return Err(local(format!("{what} {spec:?}: empty name or field")));
    }
    let (mount, path) = split_mount(path)?;
    Ok(Binding { name: name.to_owned(), mount, path, field: field.to_owned() })
}

/// A private directory for secret files: tmpfs-backed (`/dev/shm`) when available, mode
/// 0700, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> std::io::Result<PrivateDir> {
        let base = [Path::new("/dev/shm"), &std::env::temp_dir()]
            .into_iter()
            .find(|p| p.is_dir())
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let mut name = [0u8; 8];
        rand::fill(&mut name);
        let dir = base.join(format!("arca-run-{}", hex::encode(name)));
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(PrivateDir(dir))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Files written for the command, removed when it exits (also on error).
struct Written(Vec<PathBuf>);

impl Drop for Written {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn write_secret_file(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(value.as_bytes())?;
    f.sync_all()
}

/// Copies `from` to `to` line by line, replacing every secret value with `*****`.
async fn masked(
    from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    secrets: Vec<Zeroizing<String>>,
) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut line = Zeroizing::new(line);
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            if line.contains(s.as_str()) {
                *line = line.replace(s.as_str(), "*****");
            }
        }
        if to.write_all(line.as_bytes()).await.is_err() || to.write_all(b"\n").await.is_err() {
            break;
        }
        let _ = to.flush().await;
    }
}

/// Runs `command` with the bound secrets; returns its exit code (128 + signal when killed).
pub(crate) async fn run(
    c: &Client,
    env: &[String],
    files: &[String],
    mask: bool,
    command: &[String],
) -> Result<u8, Failure> {
    let (program, args) = command.split_first().ok_or_else(|| local("give the command to run after --"))?;
    let envs: Vec<Binding> = env.iter().map(|s| parse_binding(s, "--env")).collect::<Result<_, _>>()?;
    let file_bindings: Vec<Binding> =
        files.iter().map(|s| parse_binding(s, "--file")).collect::<Result<_, _>>()?;
    // One audited read per secret (not per field).
    let mut fetched: BTreeMap<(String, String), BTreeMap<String, Zeroizing<String>>> = BTreeMap::new();
    for b in envs.iter().chain(&file_bindings) {
        let key = (b.mount.clone(), b.path.clone());
        if fetched.contains_key(&key) {
            continue;
        }
        let secret = c.read(&format!("{}/{}", b.mount, b.path)).await?;
        let data = secret.data.into_iter().map(|(k, v)| (k, v.into_inner())).collect();
        fetched.insert(key, data);
    }
    let value = |b: &Binding| -> Result<Zeroizing<String>, Failure> {
        fetched.get(&(b.mount.clone(), b.path.clone())).and_then(|d| d.get(&b.field)).cloned().ok_or_else(
            || Failure { code: 4, message: format!("{}/{} has no field {:?}", b.mount, b.path, b.field) },
        )
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::inherit());
    let mut secrets = Vec::new();
    for b in &envs {
        let v = value(b)?;
        cmd.env(&b.name, v.as_str());
        secrets.push(v);
    }
    let private = if file_bindings.iter().any(|b| !b.name.starts_with('/')) {
        let dir =
            PrivateDir::create().map_err(|e| local(format!("cannot create a private directory: {e}")))?;
        cmd.env("ARCA_SECRETS_DIR", &dir.0);
        Some(dir)
    } else {
        None
    };
    let mut written = Written(Vec::new());
    for b in &file_bindings {
        let path = if b.name.starts_with('/') {
            PathBuf::from(&b.name)
        } else {
            if b.name.contains('/') || b.name == ".." {
                return Err(local(format!("--file {}: a bare file name, or an absolute path", b.name)));
            }
            private.as_ref().map(|d| d.0.join(&b.name)).ok_or_else(|| local("no private directory"))?
        };
        let v = value(b)?;
        write_secret_file(&path, &v).map_err(|e| local(format!("cannot write {}: {e}", path.display())))?;
        written.0.push(path);
        secrets.push(v);
    }
    if mask {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    } else {
        cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    }
    let mut child = cmd.spawn().map_err(|e| local(format!("cannot start {program}: {e}")))?;
    let pumps = if mask {
        let out = child.stdout.take().map(|o| tokio::spawn(masked(o, tokio::io::stdout(), secrets.clone())));
        let err = child.stderr.take().map(|e| tokio::spawn(masked(e, tokio::io::stderr(), secrets.clone())));
        vec![out, err].into_iter().flatten().collect()
    } else {
        Vec::new()
    };
    drop(secrets);
    // Signals for arca go to the command.
    use tokio::signal::unix::{SignalKind, signal};
    let pid = child.id();
    let mut term = signal(SignalKind::terminate()).map_err(|e| local(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| local(e.to_string()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| local(e.to_string()))?;
    let status = loop {
        let sig = tokio::select! {
            status = child.wait() => break status.map_err(|e| local(e.to_string()))?,
            _ = term.recv() => "-TERM",
            _ = int.recv() => "-INT",
            _ = hup.recv() => "-HUP",
        };
        if let Some(pid) = pid {
            let _ = std::process::Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    };
    for p in pumps {
        let _ = p.await;
    }
    drop(written);
    drop(private);
    use std::os::unix::process::ExitStatusExt as _;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        _ => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_parse_strictly() {
        assert_eq!(
            parse_binding("DB=secret/app/db#password", "--env").ok(),
            Some(Binding {
                name: "DB".into(),
                mount: "secret".into(),
                path: "app/db".into(),
                field: "password".into()
            })
        );
        for bad in ["DB", "DB=secret/app", "=secret/a#f", "DB=secret/a#", "DB=nomount#f"] {
            assert!(parse_binding(bad, "--env").is_err(), "{bad}");
        }
    }
}
