//! A region's role and epoch, and a standby's position in its primary's feed.

use serde::{Deserialize, Serialize};

/// What a region does with writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts writes and ships its feed.
    Primary,
    /// Applies its primary's feed; serves reads; refuses writes.
    Standby,
    /// A primary that learned of a higher epoch: refuses writes until demoted.
    Fenced,
}

/// This region's view of the cluster. Region-local: never replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    pub role: Role,
    /// Raised by every promotion; a node that sees a higher one stops writing.
    pub epoch: u64,
    /// The region that accepts writes, as far as this region knows.
    pub primary: String,
    /// When the role last changed (ms since the epoch).
    pub since_unix_ms: u64,
    /// Set by a promotion: the primary this region replaced, and the last change of its
    /// feed applied here (hex versionstamp) — what that region's divergence starts after.
    #[serde(default)]
    pub previous_primary: Option<String>,
    #[serde(default)]
    pub previous_applied: Option<String>,
}

impl RegionState {
    pub fn new(role: Role, epoch: u64, primary: &str, now_unix_ms: u64) -> RegionState {
        RegionState {
            role,
            epoch,
            primary: primary.to_owned(),
            since_unix_ms: now_unix_ms,
            previous_primary: None,
            previous_applied: None,
        }
    }

    pub fn writable(&self) -> bool {
        self.role == Role::Primary
    }
}

/// A standby's position in `source`'s change feed and audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Hex of the last applied change record's versionstamp (none: from the start).
    pub stamp: Option<String>,
    /// Next audit leaf index of `source`'s log to receive.
    pub audit_next: u64,
    /// Hex versionstamp of the last received audit entry in `source`'s event queue.
    #[serde(default)]
    pub audit_stamp: Option<String>,
    /// While seeding: the last key copied (hex); the copy resumes after it.
    #[serde(default)]
    pub snapshot_after: Option<String>,
    /// The epoch of the primary this was applied from.
    pub epoch: u64,
    /// When the last batch was applied here (this region's clock).
    pub applied_unix_ms: u64,
    /// The primary's commit time of the last applied change (its clock).
    pub source_time_unix_ms: u64,
    /// Set once a snapshot has been copied (the feed alone is not the whole state).
    pub seeded: bool,
}

impl Cursor {
    pub fn stamp_bytes(&self) -> Option<Vec<u8>> {
        self.stamp.as_deref().and_then(|s| hex::decode(s).ok())
    }
}
