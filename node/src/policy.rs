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

use std::collections::BTreeSet;
use std::fmt;

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
        loop {
            match p.next("`capabilities` or `}`")? {
                Token::Punct('}') => break,
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
                    return p.fail(format!("unsupported key {other}: only `capabilities` is supported"));
                }
            }
        }
        let Some(capabilities) = capabilities else {
            return p.fail("a path block needs `capabilities`".into());
        };
        rules.push(Rule { pattern, capabilities });
        if rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules);
        }
    }
    Ok(Policy { rules })
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

/// The effective capabilities on `path` for a token holding `policies`.
/// Empty means denied; a set containing `Deny` is reduced to empty.
pub fn capabilities<'a>(policies: impl IntoIterator<Item = &'a Policy>, path: &str) -> BTreeSet<Capability> {
    let matching: Vec<&Rule> =
        policies.into_iter().flat_map(|p| &p.rules).filter(|r| matches(&r.pattern, path)).collect();
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
    }
}
