//! Policies: which paths a token may touch, and how.
//!
//! The language is the path/capabilities subset of Vault's HCL policies, so existing policies
//! carry over:
//!
//! ```hcl
//! # comments with # or //
//! path "secret/data/app/*" {
//!   capabilities = ["read", "list"]
//! }
//! path "secret/data/app/admin" {
//!   capabilities = ["deny"]
//! }
//! ```
//!
//! A pattern matches a path exactly, or with `*` as its last character matches every path
//! that starts with what precedes it, and `+` matches exactly one path segment.
//!
//! Evaluation is **deny by default**: a path no rule matches allows nothing. Among the rules
//! of all the token's policies that match, the **most specific pattern wins** (Vault's order:
//! later first wildcard, then no trailing `*`, then fewer `+`, then longer, then
//! lexicographically greater); the capabilities of every rule with that pattern are united,
//! and **`deny` among them always wins**. The `root` policy allows everything.
//!
//! **Conditions** (arca's extension; Vault clients never see them): a rule may carry a
//! `conditions` block, and then applies only when every condition holds for the request —
//! otherwise it is as if the rule were absent:
//!
//! ```hcl
//! path "secret/data/prod/*" {
//!   capabilities = ["read"]
//!   conditions {
//!     source_cidrs = ["10.0.0.0/8", "127.0.0.2/32"] # the client address (after trusted proxies)
//!     hours_utc    = "08-18"                        # from 08:00 to before 18:00 UTC ("22-06" wraps)
//!     days_utc     = ["mon", "tue", "wed", "thu", "fri"]
//!     metadata     = ["env=prod"]                   # on the token (from its AppRole or creator)
//!     require_mtls = true                           # a verified client certificate on the connection
//!   }
//! }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

/// Longest policy text accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Most rules in one policy.
pub const MAX_RULES: usize = 1024;
/// Longest policy name.
pub const MAX_NAME_BYTES: usize = 128;

/// What a rule allows on its paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    Create,
    Read,
    Update,
    Patch,
    Delete,
    List,
    Sudo,
    Deny,
}

impl Capability {
    pub const ALL: [Capability; 8] = [
        Capability::Create,
        Capability::Read,
        Capability::Update,
        Capability::Patch,
        Capability::Delete,
        Capability::List,
        Capability::Sudo,
        Capability::Deny,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Capability::Create => "create",
            Capability::Read => "read",
            Capability::Update => "update",
            Capability::Patch => "patch",
            Capability::Delete => "delete",
            Capability::List => "list",
            Capability::Sudo => "sudo",
            Capability::Deny => "deny",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Capability::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// One `path` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub capabilities: BTreeSet<Capability>,
    pub conditions: Option<Conditions>,
}

/// An address range: `10.0.0.0/8`, `::1/128`, or a bare address (a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("\"{}\" is not an address range (e.g. 10.0.0.0/8)", truncate(text));
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// Whether `ip` is in any of `cidrs` (an empty list binds nothing: always true).
pub fn in_any(cidrs: &[Cidr], ip: Option<IpAddr>) -> bool {
    cidrs.is_empty() || ip.is_some_and(|ip| cidrs.iter().any(|c| c.contains(ip)))
}

/// A rule's `conditions` block: all must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Conditions {
    pub source_cidrs: Vec<Cidr>,
    /// `[from, to)` in whole UTC hours; `from > to` wraps midnight.
    pub hours_utc: Option<(u8, u8)>,
    /// Days (0 = Monday … 6 = Sunday), UTC.
    pub days_utc: Option<BTreeSet<u8>>,
    pub metadata: Vec<(String, String)>,
    pub require_mtls: bool,
}

/// What conditions are checked against: the request as the node saw it.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The client address (after the trusted-proxy rules), when known.
    pub source: Option<IpAddr>,
    pub now_unix_ms: u64,
    /// Whether the connection presented a verified client certificate.
    pub mtls: bool,
    /// The token's metadata.
    pub metadata: &'a BTreeMap<String, String>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Conditions {
    /// The first condition that does not hold, by name; `None` when all hold.
    pub fn failed(&self, ctx: &Context<'_>) -> Option<&'static str> {
        if !self.source_cidrs.is_empty() && !in_any(&self.source_cidrs, ctx.source) {
            return Some("source_cidrs");
        }
        let secs = ctx.now_unix_ms / 1000;
        if let Some((from, to)) = self.hours_utc {
            let hour = ((secs / 3600) % 24) as u8;
            let inside = if from <= to { (from..to).contains(&hour) } else { hour >= from || hour < to };
            if !inside {
                return Some("hours_utc");
            }
        }
        if let Some(days) = &self.days_utc {
            // 1970-01-01 was a Thursday (3 with Monday = 0).
            let day = ((secs / 86_400 + 3) % 7) as u8;
            if !days.contains(&day) {
                return Some("days_utc");
            }
        }
        if self.metadata.iter().any(|(k, v)| ctx.metadata.get(k) != Some(v)) {
            return Some("metadata");
        }
        if self.require_mtls && !ctx.mtls {
            return Some("require_mtls");
        }
        None
    }
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

/// Why a policy did not parse. Names the line; never echoes more than a token of input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge,
    #[error("policy has more than {MAX_RULES} rules")]
    TooManyRules,
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("invalid policy name: use 1 to 128 characters from a-z, 0-9, '-', '_', '.'")]
    BadName,
}

/// Checks a policy name.
pub fn validate_name(name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name != "."
        && name != "..";
    if ok { Ok(()) } else { Err(PolicyError::BadName) }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Str(String),
    Punct(char),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Ident(s) => write!(f, "`{}`", truncate(s)),
            Token::Str(s) => write!(f, "\"{}\"", truncate(s)),
            Token::Punct(c) => write!(f, "`{c}`"),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

fn lex(text: &str) -> Result<Vec<(usize, Token)>, PolicyError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let err = |line, message: &str| PolicyError::Syntax { line, message: message.to_owned() };
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '{' | '}' | '[' | ']' | '=' | ',' => tokens.push((line, Token::Punct(c))),
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None | Some('\n') => return Err(err(line, "unterminated string")),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('"') => s.push('"'),
                            Some('\\') => s.push('\\'),
                            _ => return Err(err(line, "unsupported escape in string")),
                        },
                        Some(c) if c.is_control() => return Err(err(line, "control character in string")),
                        Some(c) => s.push(c),
                    }
                }
                tokens.push((line, Token::Str(s)));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut s = String::from(c);
                while chars.peek().is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-') {
                    s.extend(chars.next());
                }
                tokens.push((line, Token::Ident(s)));
            }
            _ => return Err(err(line, "unexpected character")),
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
}

impl Parser {
    fn line(&self) -> usize {
        self.tokens.get(self.at).or(self.tokens.last()).map_or(1, |(l, _)| *l)
    }

    fn fail<T>(&self, message: String) -> Result<T, PolicyError> {
        Err(PolicyError::Syntax { line: self.line(), message })
    }

    fn next(&mut self, what: &str) -> Result<Token, PolicyError> {
        match self.tokens.get(self.at) {
            Some((_, token)) => {
                self.at += 1;
                Ok(token.clone())
            }
            None => self.fail(format!("expected {what}, found the end of the policy")),
        }
    }

    fn expect_punct(&mut self, c: char) -> Result<(), PolicyError> {
        match self.next(&format!("`{c}`"))? {
            Token::Punct(p) if p == c => Ok(()),
            other => {
                self.at -= 1;
                self.fail(format!("expected `{c}`, found {other}"))
            }
        }
    }

    fn string(&mut self, what: &str) -> Result<String, PolicyError> {
        match self.next(what)? {
            Token::Str(s) => Ok(s),
            other => {
                self.at -= 1;
                self.fail(format!("expected {what}, found {other}"))
            }
        }
    }
}

/// Parses a policy strictly: unknown blocks, keys and capabilities are errors.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge);
    }
    let mut p = Parser { tokens: lex(text)?, at: 0 };
    let mut rules = Vec::new();
    while p.at < p.tokens.len() {
        match p.next("`path`")? {
            Token::Ident(kw) if kw == "path" => {}
            other => {
                p.at -= 1;
                return p.fail(format!("expected `path`, found {other}"));
            }
        }
        let pattern = p.string("a path pattern in quotes")?;
        validate_pattern(&pattern).or_else(|message| p.fail(message.to_owned()))?;
        p.expect_punct('{')?;
        let mut capabilities = None;
        let mut conditions = None;
        loop {
            match p.next("`capabilities`, `conditions` or `}`")? {
                Token::Punct('}') => break,
                Token::Ident(key) if key == "conditions" => {
                    if conditions.is_some() {
                        return p.fail("`conditions` given twice".into());
                    }
                    conditions = Some(parse_conditions(&mut p)?);
                }
                Token::Ident(key) if key == "capabilities" => {
                    if capabilities.is_some() {
                        return p.fail("`capabilities` given twice".into());
                    }
                    p.expect_punct('=')?;
                    p.expect_punct('[')?;
                    let mut set = BTreeSet::new();
                    loop {
                        if matches!(p.tokens.get(p.at), Some((_, Token::Punct(']')))) {
                            p.at += 1;
                            break;
                        }
                        let name = p.string("a capability in quotes")?;
                        let Some(cap) = Capability::parse(&name) else {
                            p.at -= 1;
                            return p.fail(format!(
                                "unknown capability \"{}\"; expected one of create, read, update, patch, delete, list, sudo, deny",
                                truncate(&name)
                            ));
                        };
                        set.insert(cap);
                        match p.next("`,` or `]`")? {
                            Token::Punct(',') => {}
                            Token::Punct(']') => break,
                            other => {
                                p.at -= 1;
                                return p.fail(format!("expected `,` or `]`, found {other}"));
                            }
                        }
                    }
                    capabilities = Some(set);
                }
                other => {
                    p.at -= 1;
                    return p.fail(format!(
                        "unsupported key {other}: only `capabilities` and `conditions` are supported"
                    ));
                }
            }
        }
        let Some(capabilities) = capabilities else {
            return p.fail("a path block needs `capabilities`".into());
        };
        rules.push(Rule { pattern, capabilities, conditions });
        if rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules);
        }
    }
    Ok(Policy { rules })
}

impl Parser {
    /// `[ "a", "b", ]`
    fn string_list(&mut self, what: &str) -> Result<Vec<String>, PolicyError> {
        self.expect_punct('[')?;
        let mut out = Vec::new();
        loop {
            if matches!(self.tokens.get(self.at), Some((_, Token::Punct(']')))) {
                self.at += 1;
                return Ok(out);
            }
            out.push(self.string(what)?);
            match self.next("`,` or `]`")? {
                Token::Punct(',') => {}
                Token::Punct(']') => return Ok(out),
                other => {
                    self.at -= 1;
                    return self.fail(format!("expected `,` or `]`, found {other}"));
                }
            }
        }
    }
}

/// `conditions { key = value ... }`; unknown keys, repeated keys and empty lists are errors.
fn parse_conditions(p: &mut Parser) -> Result<Conditions, PolicyError> {
    p.expect_punct('{')?;
    let mut c = Conditions::default();
    let mut seen = BTreeSet::new();
    loop {
        let key = match p.next("a condition or `}`")? {
            Token::Punct('}') => break,
            Token::Ident(key) => key,
            other => {
                p.at -= 1;
                return p.fail(format!("expected a condition, found {other}"));
            }
        };
        if !seen.insert(key.clone()) {
            return p.fail(format!("condition `{}` given twice", truncate(&key)));
        }
        p.expect_punct('=')?;
        match key.as_str() {
            "source_cidrs" => {
                for text in p.string_list("an address range in quotes")? {
                    c.source_cidrs.push(Cidr::parse(&text).or_else(|m| p.fail(m))?);
                }
                if c.source_cidrs.is_empty() {
                    return p.fail("`source_cidrs` is empty: it would match nothing".into());
                }
            }
            "hours_utc" => {
                let text = p.string("hours in quotes, e.g. \"08-18\"")?;
                let hours = text
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.parse::<u8>().ok()?, b.parse::<u8>().ok()?)));
                match hours {
                    Some((from, to)) if from < 24 && to <= 24 && from != to => c.hours_utc = Some((from, to)),
                    _ => {
                        return p.fail(format!(
                            "hours_utc \"{}\": expected \"HH-HH\" with two different hours 0-24",
                            truncate(&text)
                        ));
                    }
                }
            }
            "days_utc" => {
                let mut days = BTreeSet::new();
                for day in p.string_list("a day in quotes")? {
                    let Some(n) = DAYS.iter().position(|d| *d == day) else {
                        return p.fail(format!(
                            "unknown day \"{}\"; expected mon, tue, wed, thu, fri, sat, sun",
                            truncate(&day)
                        ));
                    };
                    days.insert(n as u8);
                }
                if days.is_empty() {
                    return p.fail("`days_utc` is empty: it would match nothing".into());
                }
                c.days_utc = Some(days);
            }
            "metadata" => {
                for pair in p.string_list("key=value in quotes")? {
                    match pair.split_once('=') {
                        Some((k, v)) if !k.is_empty() => c.metadata.push((k.to_owned(), v.to_owned())),
                        _ => return p.fail(format!("metadata \"{}\": expected key=value", truncate(&pair))),
                    }
                }
            }
            "require_mtls" => match p.next("true or false")? {
                Token::Ident(b) if b == "true" => c.require_mtls = true,
                Token::Ident(b) if b == "false" => c.require_mtls = false,
                other => {
                    p.at -= 1;
                    return p.fail(format!("expected true or false, found {other}"));
                }
            },
            other => {
                return p.fail(format!(
                    "unknown condition `{}`; expected source_cidrs, hours_utc, days_utc, metadata or require_mtls",
                    truncate(other)
                ));
            }
        }
    }
    Ok(c)
}

fn validate_pattern(pattern: &str) -> Result<(), &'static str> {
    if pattern.is_empty() {
        return Err("empty path pattern");
    }
    if pattern.starts_with('/') {
        return Err("path patterns do not start with `/`");
    }
    if pattern.len() > 1024 {
        return Err("path pattern longer than 1024 bytes");
    }
    if let Some(pos) = pattern.find('*')
        && pos != pattern.len() - 1
    {
        return Err("`*` may only end a path pattern");
    }
    for segment in pattern.split('/') {
        if segment.contains('+') && segment != "+" {
            return Err("`+` must be a whole path segment");
        }
    }
    Ok(())
}

/// Whether `pattern` matches `path`.
pub fn matches(pattern: &str, path: &str) -> bool {
    let (body, prefix) = match pattern.strip_suffix('*') {
        Some(body) => (body, true),
        None => (pattern, false),
    };
    if !body.contains('+') {
        return if prefix { path.starts_with(body) } else { path == body };
    }
    // Segment-wise: each `+` consumes one segment; the rest must be literal.
    let mut rest = path;
    let segments: Vec<&str> = body.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i == segments.len() - 1;
        if *segment == "+" {
            let end = rest.find('/').unwrap_or(rest.len());
            if end == 0 {
                return false;
            }
            rest = &rest[end..];
        } else if last && prefix {
            if !rest.starts_with(segment) {
                return false;
            }
            return true;
        } else {
            if !rest.starts_with(segment) {
                return false;
            }
            rest = &rest[segment.len()..];
        }
        if !last {
            match rest.strip_prefix('/') {
                Some(r) => rest = r,
                None => return false,
            }
        }
    }
    prefix || rest.is_empty()
}

/// Vault's priority order: a greater key is more specific.
fn specificity(pattern: &str) -> (usize, bool, std::cmp::Reverse<usize>, usize, &str) {
    let first_wildcard = pattern.find(['*', '+']).unwrap_or(usize::MAX);
    let plus = pattern.split('/').filter(|s| *s == "+").count();
    (first_wildcard, !pattern.ends_with('*'), std::cmp::Reverse(plus), pattern.len(), pattern)
}

/// The outcome of evaluating policies with conditions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub capabilities: BTreeSet<Capability>,
    /// A rule matched the path but did not apply because this condition failed:
    /// `"<policy>: <condition>"` (the first such rule, most specific first).
    pub failed_condition: Option<String>,
}

/// The effective capabilities on `path` for named policies in the request's context: rules
/// whose conditions fail are left out (and the first such failure is reported).
pub fn decide<'a>(
    policies: impl IntoIterator<Item = (&'a str, &'a Policy)>,
    path: &str,
    ctx: &Context<'_>,
) -> Decision {
    let mut failed: Option<(Spec<'a>, String)> = None;
    let mut applying: Vec<&'a Rule> = Vec::new();
    for (name, policy) in policies {
        for rule in policy.rules.iter().filter(|r| matches(&r.pattern, path)) {
            match rule.conditions.as_ref().and_then(|c| c.failed(ctx)) {
                None => applying.push(rule),
                Some(condition) => {
                    let spec = specificity(&rule.pattern);
                    if failed.as_ref().is_none_or(|(s, _)| spec > *s) {
                        failed = Some((spec, format!("{name}: {condition}")));
                    }
                }
            }
        }
    }
    Decision { capabilities: unite(applying), failed_condition: failed.map(|(_, c)| c) }
}

type Spec<'a> = (usize, bool, std::cmp::Reverse<usize>, usize, &'a str);

/// The effective capabilities on `path` for a token holding `policies`, without a request
/// context: rules with conditions do not apply (deny by default). Empty means denied; a set
/// containing `Deny` is reduced to empty.
pub fn capabilities<'a>(policies: impl IntoIterator<Item = &'a Policy>, path: &str) -> BTreeSet<Capability> {
    unite(
        policies
            .into_iter()
            .flat_map(|p| &p.rules)
            .filter(|r| r.conditions.is_none() && matches(&r.pattern, path))
            .collect(),
    )
}

fn unite(matching: Vec<&Rule>) -> BTreeSet<Capability> {
    let Some(best) = matching.iter().map(|r| specificity(&r.pattern)).max() else {
        return BTreeSet::new();
    };
    let caps: BTreeSet<Capability> = matching
        .iter()
        .filter(|r| specificity(&r.pattern) == best)
        .flat_map(|r| r.capabilities.iter().copied())
        .collect();
    if caps.contains(&Capability::Deny) { BTreeSet::new() } else { caps }
}

/// Whether `policies` allow `capability` on `path`.
pub fn allows<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    path: &str,
    capability: Capability,
) -> bool {
    capabilities(policies, path).contains(&capability)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(text: &str) -> Policy {
        parse(text).unwrap()
    }

    #[test]
    fn parses_vault_syntax() {
        let p = policy(
            r#"
            # app team
            path "secret/data/app/*" {
              capabilities = ["read", "list",]
            }
            // admins only
            path "secret/data/app/admin" { capabilities = ["deny"] }
            "#,
        );
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[0].capabilities, [Capability::Read, Capability::List].into());
    }

    #[test]
    fn syntax_errors_name_the_line() {
        for (text, line) in [
            ("path \"a\" {\n capabilities = [\"reed\"]\n}", 2),
            ("path \"a\" {\n policy = \"read\"\n}", 2),
            ("path \"a\" {\n}", 2),
            ("path \"a*b\" { capabilities = [] }", 1),
            ("path \"a\" { capabilities = [\"read\"]", 1),
            ("\n\npath a { }", 3),
            ("path \"a\" { capabilities = [\"read\"] } }", 1),
        ] {
            match parse(text) {
                Err(PolicyError::Syntax { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert_eq!(parse(&" ".repeat(MAX_POLICY_BYTES + 1)), Err(PolicyError::TooLarge));
    }

    #[test]
    fn deny_by_default_and_most_specific_wins() {
        let p = policy(
            r#"
            path "secret/data/*" { capabilities = ["read"] }
            path "secret/data/app/*" { capabilities = ["read", "create", "update"] }
            path "secret/data/app/admin" { capabilities = ["deny"] }
            path "secret/data/+/public" { capabilities = ["list"] }
            "#,
        );
        let ps = [&p];
        assert!(allows(ps, "secret/data/other", Capability::Read));
        assert!(!allows(ps, "secret/data/other", Capability::Update));
        assert!(allows(ps, "secret/data/app/db", Capability::Update));
        assert!(!allows(ps, "secret/data/app/admin", Capability::Read));
        assert!(!allows(ps, "secret/metadata/app/db", Capability::Read));
        assert!(!allows(ps, "sys/policies/acl/x", Capability::Read));
        // `secret/data/+/public` (first wildcard at 12) loses to `secret/data/app/*` (at 16).
        assert!(!allows(ps, "secret/data/app/public", Capability::List));
        assert!(allows(ps, "secret/data/web/public", Capability::List));
    }

    #[test]
    fn deny_wins_among_equally_specific_rules_across_policies() {
        let a = policy(r#"path "secret/data/x" { capabilities = ["read"] }"#);
        let b = policy(r#"path "secret/data/x" { capabilities = ["deny"] }"#);
        let c = policy(r#"path "secret/data/x" { capabilities = ["update"] }"#);
        assert!(!allows([&a, &b], "secret/data/x", Capability::Read));
        assert_eq!(capabilities([&a, &c], "secret/data/x"), [Capability::Read, Capability::Update].into());
    }

    #[test]
    fn plus_matches_exactly_one_segment() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/x/c"));
        assert!(!matches("a/+/c", "a//c"));
        assert!(matches("a/+/c*", "a/b/cde"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("+/b*", "x/b/c"));
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-c]{1,3}"
    }

    fn path() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment(), 1..5).prop_map(|s| s.join("/"))
    }

    proptest! {
        #[test]
        fn no_rules_allow_nothing(p in path(), cap in proptest::sample::select(Capability::ALL.to_vec())) {
            prop_assert!(!allows([&Policy::default()], &p, cap));
        }

        #[test]
        fn an_exact_rule_decides_its_path(p in path(), other in path()) {
            let exact = policy(&format!("path \"{p}\" {{ capabilities = [\"read\"] }}\npath \"{other}*\" {{ capabilities = [\"deny\"] }}"));
            // The exact rule is the most specific unless the glob is the same string.
            prop_assert!(allows([&exact], &p, Capability::Read) || other == p);
        }

        #[test]
        fn a_prefix_glob_matches_exactly_the_paths_it_prefixes(prefix in "[a-c/]{0,6}", p in path()) {
            prop_assert_eq!(matches(&format!("{prefix}*"), &p), p.starts_with(&prefix));
        }

        #[test]
        fn an_equally_specific_deny_always_wins(p in path(), caps in proptest::collection::btree_set(proptest::sample::select(Capability::ALL.to_vec()), 0..4)) {
            let names: Vec<String> = caps.iter().map(|c| format!("\"{}\"", c.name())).collect();
            let allow = policy(&format!("path \"{p}\" {{ capabilities = [{}] }}", names.join(",")));
            let deny = policy(&format!("path \"{p}\" {{ capabilities = [\"deny\"] }}"));
            prop_assert!(capabilities([&allow, &deny], &p).is_empty());
        }

        #[test]
        fn parse_never_panics(text in ".{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn conditions_never_panic(body in "[a-z_=\\[\\]\",0-9./: -]{0,80}") {
            let _ = parse(&format!("path \"a\" {{ capabilities = [\"read\"] conditions {{ {body} }} }}"));
        }

        #[test]
        fn cidrs_contain_what_their_prefix_says(a in any::<u32>(), b in any::<u32>(), prefix in 0u8..=32) {
            let net = Cidr::parse(&format!("{}/{prefix}", std::net::Ipv4Addr::from(a))).unwrap();
            let same = prefix == 0 || (a >> (32 - u32::from(prefix))) == (b >> (32 - u32::from(prefix)));
            prop_assert_eq!(net.contains(std::net::Ipv4Addr::from(b).into()), same);
        }
    }

    const HOUR_MS: u64 = 3_600_000;
    /// 2026-11-26 (a Thursday) 00:00 UTC.
    const THURSDAY: u64 = 1_795_651_200_000;

    fn ctx<'a>(
        source: &str,
        now_unix_ms: u64,
        mtls: bool,
        metadata: &'a BTreeMap<String, String>,
    ) -> Context<'a> {
        Context { source: source.parse().ok(), now_unix_ms, mtls, metadata }
    }

    #[test]
    fn conditions_parse_strictly() {
        let p = policy(
            r#"path "secret/data/prod/*" {
                 capabilities = ["read"]
                 conditions {
                   source_cidrs = ["10.0.0.0/8", "127.0.0.2"]
                   hours_utc = "22-06"
                   days_utc = ["mon", "sun"]
                   metadata = ["env=prod"]
                   require_mtls = true
                 }
               }"#,
        );
        let c = p.rules[0].conditions.as_ref().unwrap();
        assert_eq!(c.source_cidrs.len(), 2);
        assert_eq!((c.hours_utc, c.require_mtls), (Some((22, 6)), true));
        assert_eq!(c.days_utc, Some([0, 6].into()));
        assert_eq!(c.metadata, vec![("env".to_owned(), "prod".to_owned())]);
        for bad in [
            "source_cidrs = []",
            "source_cidrs = [\"10.0.0.0/33\"]",
            "source_cidrs = [\"nonsense\"]",
            "hours_utc = \"8\"",
            "hours_utc = \"25-3\"",
            "hours_utc = \"5-5\"",
            "days_utc = [\"someday\"]",
            "metadata = [\"novalue\"]",
            "require_mtls = yes",
            "weather = \"sunny\"",
            "require_mtls = true require_mtls = false",
        ] {
            let text = format!("path \"a\" {{ capabilities = [\"read\"] conditions {{ {bad} }} }}");
            assert!(matches!(parse(&text), Err(PolicyError::Syntax { .. })), "{bad}");
        }
    }

    #[test]
    fn a_rule_applies_only_when_every_condition_holds() {
        let p = policy(
            r#"path "secret/data/prod/*" {
                 capabilities = ["read"]
                 conditions {
                   source_cidrs = ["127.0.0.2/32"]
                   hours_utc = "08-18"
                   days_utc = ["mon", "tue", "wed", "thu", "fri"]
                   metadata = ["env=prod"]
                 }
               }
               path "secret/data/*" { capabilities = ["list"] }"#,
        );
        let prod: BTreeMap<String, String> = [("env".to_owned(), "prod".to_owned())].into();
        let dev: BTreeMap<String, String> = [("env".to_owned(), "dev".to_owned())].into();
        let decide = |c: &Context<'_>| decide([("prod-read", &p)], "secret/data/prod/db", c);
        let ok = decide(&ctx("127.0.0.2", THURSDAY + 9 * HOUR_MS, false, &prod));
        assert_eq!(ok.capabilities, [Capability::Read].into());
        assert_eq!(ok.failed_condition, None);
        for (c, failed) in [
            (ctx("127.0.0.1", THURSDAY + 9 * HOUR_MS, false, &prod), "source_cidrs"),
            (ctx("127.0.0.2", THURSDAY + 18 * HOUR_MS, false, &prod), "hours_utc"),
            (ctx("127.0.0.2", THURSDAY + 2 * 24 * HOUR_MS + 9 * HOUR_MS, false, &prod), "days_utc"),
            (ctx("127.0.0.2", THURSDAY + 9 * HOUR_MS, false, &dev), "metadata"),
        ] {
            let d = decide(&c);
            // The conditioned rule drops out; the less specific rule still applies.
            assert_eq!(d.capabilities, [Capability::List].into(), "{failed}");
            assert_eq!(d.failed_condition.as_deref(), Some(format!("prod-read: {failed}").as_str()));
        }
        // Without a context, conditioned rules never apply.
        assert_eq!(capabilities([&p], "secret/data/prod/db"), [Capability::List].into());
    }

    #[test]
    fn hours_wrap_midnight_and_mtls_is_required_when_asked() {
        let p = policy(
            r#"path "a" { capabilities = ["read"] conditions { hours_utc = "22-06" require_mtls = true } }"#,
        );
        let none = BTreeMap::new();
        let at =
            |h: u64, mtls: bool| decide([("p", &p)], "a", &ctx("::1", THURSDAY + h * HOUR_MS, mtls, &none));
        assert!(at(23, true).capabilities.contains(&Capability::Read));
        assert!(at(5, true).capabilities.contains(&Capability::Read));
        assert_eq!(at(6, true).failed_condition.as_deref(), Some("p: hours_utc"));
        assert_eq!(at(23, false).failed_condition.as_deref(), Some("p: require_mtls"));
        // A conditioned deny only denies when its conditions hold.
        let q = policy(
            r#"path "a" { capabilities = ["read"] }
               path "a" { capabilities = ["deny"] conditions { source_cidrs = ["10.0.0.0/8"] } }"#,
        );
        let from = |ip: &str| decide([("q", &q)], "a", &ctx(ip, THURSDAY, false, &none)).capabilities;
        assert!(from("10.1.2.3").is_empty());
        assert_eq!(from("192.168.0.1"), [Capability::Read].into());
        assert!(Cidr::parse("10.0.0.0/8").unwrap().contains("::ffff:10.9.9.9".parse().unwrap()));
    }
}
