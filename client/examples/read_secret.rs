//! Reads one secret with the SDK and prints its version and field names (values only for
//! the fields named with `--show`):
//!
//! ```text
//! ARCA_ADDR=http://127.0.0.1:8400 ARCA_TOKEN=… \
//!     cargo run -p arca-client --example read_secret -- secret/app/db --show user
//! ```
//!
//! `ARCA_ADDR` may list several nodes (`eu=https://a:8400,us=https://b:8400`): the read goes
//! to the first that answers. With `ARCA_ROLE_ID` and `ARCA_SECRET_ID` set it logs in with
//! AppRole instead of a token. The read is audited on the node under the caller's identity;
//! the receipt printed last says where.

use arca_client::{Auth, Client, Config, Error, Secret};

/// The example's whole job, callable from tests: connect with `config`, read `path`.
pub async fn read_secret(config: Config, path: &str) -> Result<Secret, Error> {
    let client = Client::connect(config).await?;
    client.read(path).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: read_secret <mount>/<path> [--show FIELD]...")?;
    let mut show = Vec::new();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--show", Some(field)) => show.push(field),
            _ => return Err(format!("unexpected argument {arg:?}").into()),
        }
    }
    let mut config = Config::from_env()?;
    if let (Ok(role_id), Ok(secret_id)) = (std::env::var("ARCA_ROLE_ID"), std::env::var("ARCA_SECRET_ID")) {
        config = config.auth(Auth::app_role(role_id, secret_id));
    }
    let secret = read_secret(config, &path).await?;
    println!("{} version {}", secret.path, secret.version);
    for (field, value) in &secret.data {
        if show.contains(field) {
            println!("  {field} = {}", value.expose());
        } else {
            println!("  {field}");
        }
    }
    println!(
        "audited by {} at position {}",
        secret.receipt.node,
        secret.receipt.audit_position.as_deref().unwrap_or("?")
    );
    Ok(())
}
