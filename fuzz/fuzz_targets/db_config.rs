//! A database connection as `DbConfigWrite` takes it (`database::check_connection`): a
//! flags byte, then its name, URL, CA certificates and client certificate with key, split by
//! zero bytes. Never a panic, and a refusal names the field, never the URL's password or the
//! key: with flag 1 the URL is `postgres://u:<canary>@` and the input, and the key ends in a
//! line holding another canary (outside its PEM block, where a parser skips it); neither
//! canary may be in a refusal. A connection taken is shown by `url_summary` (`db read-config`):
//! never with the canary, and never with a password tokio-postgres would read back out of it.
//! (`grpc_api` leaves `DbConfigWrite` out: `DbCreds` would then
//! connect to the host named in the input.)
#![no_main]

use arca_node::database::{DbTls, check_connection, url_summary};
use libfuzzer_sys::fuzz_target;
use zeroize::Zeroizing;

const PASSWORD: &str = "pw-canary-Zq8Xw3-never-shown";
const KEY: &str = "key-canary-Jr5Tb9-never-shown";

fuzz_target!(|data: &[u8]| {
    let [flags, rest @ ..] = data else { return };
    let canaries = flags & 1 != 0;
    let mut fields = rest.split(|&b| b == 0).map(String::from_utf8_lossy);
    let name = fields.next().unwrap_or_default();
    let mut url = fields.next().unwrap_or_default().into_owned();
    let input = url.clone();
    let field = |f: Option<std::borrow::Cow<'_, str>>| f.filter(|s| !s.is_empty()).map(|s| s.into_owned());
    let ca_pem = field(fields.next());
    let client_cert_pem = field(fields.next());
    let mut client_key_pem = field(fields.next());
    if canaries {
        url = format!("postgres://u:{PASSWORD}@{url}");
        client_key_pem = client_key_pem.map(|k| format!("{k}\n{KEY}\n"));
    }
    let tls = DbTls { ca_pem, client_cert_pem, client_key_pem: client_key_pem.map(Zeroizing::new) };
    match check_connection(&name, &url, &tls) {
        Err(e) => {
            let message = e.to_string();
            assert!(!message.contains(PASSWORD), "the URL's password in a refusal: {message}");
            assert!(!message.contains(KEY), "the key in a refusal: {message}");
        }
        Ok(()) => {
            let shown = url_summary(&url);
            // (The input may hold the canary's text in another part, a database name.)
            if canaries && !input.contains(PASSWORD) {
                assert!(!shown.contains(PASSWORD), "the URL's password shown: {shown}");
            }
            let driver_form = shown.replace("sslmode=verify-full", "sslmode=require").replace("sslmode=verify-ca", "sslmode=require");
            if let Ok(parsed) = driver_form.parse::<tokio_postgres::Config>() {
                assert!(parsed.get_password().is_none(), "a password in the shown URL: {shown}");
            }
        }
    }
});
