//! Roles on the admin API for principals that authenticate with a token or an API key (the
//! admin token file stays as break-glass access with every right).
//!
//! A principal holds a role when its scopes or its groups name it: `haven:viewer`,
//! `haven:operator` or `haven:admin` (an IdP grants them as scopes or as group or role
//! claims; an API key gets them with `--scope` or `--group`). Each role includes the rights
//! of the ones below it:
//! - **viewer** reads: status, settings, the registry, secret names (never values), keys,
//!   rules, the audit log and its verification, backup status and verification;
//! - **operator** also runs the node: backup now, audit checkpoints, region promotion,
//!   demotion and takeover;
//! - **admin** also changes what the node serves and who may use it: the registry, settings,
//!   secrets, key rotation, API keys and authorization rules.

use crate::principal::Principal;

/// An admin API role, ordered by rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdminRole {
    /// Reads.
    Viewer,
    /// Reads and operates.
    Operator,
    /// Everything.
    Admin,
}

impl AdminRole {
    /// Every role, lowest first.
    pub const ALL: [AdminRole; 3] = [AdminRole::Viewer, AdminRole::Operator, AdminRole::Admin];

    /// The scope or group that grants the role.
    pub fn grant_name(self) -> &'static str {
        match self {
            AdminRole::Viewer => "haven:viewer",
            AdminRole::Operator => "haven:operator",
            AdminRole::Admin => "haven:admin",
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Viewer => "viewer",
            AdminRole::Operator => "operator",
            AdminRole::Admin => "admin",
        }
    }

    /// The highest role `p` holds, if any.
    pub fn of(p: &Principal) -> Option<AdminRole> {
        AdminRole::ALL.into_iter().rev().find(|r| {
            let n = r.grant_name();
            p.has_scope(n) || p.groups.iter().any(|g| g == n)
        })
    }

    /// The role an admin request needs: reads (GET, HEAD, and the verifications that are
    /// POSTed) need viewer; running the node needs operator; every other change needs admin.
    /// `path` is the request's path.
    pub fn required(method: &str, path: &str) -> AdminRole {
        if method == "GET" || method == "HEAD" {
            return AdminRole::Viewer;
        }
        match (method, path) {
            ("POST", "/admin/v1/audit/verify" | "/admin/v1/backup/verify") => AdminRole::Viewer,
            (
                "POST",
                "/admin/v1/backup/now"
                | "/admin/v1/audit/checkpoint"
                | "/admin/v1/regions/promote"
                | "/admin/v1/regions/demote"
                | "/admin/v1/regions/takeover"
                | "/admin/v1/drills",
            ) => AdminRole::Operator,
            _ => AdminRole::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::PrincipalKind;

    #[test]
    fn roles_come_from_scopes_or_groups_and_include_the_lower_ones() {
        let mut p = Principal::anonymous();
        p.kind = PrincipalKind::Token;
        assert_eq!(AdminRole::of(&p), None);
        p.groups = vec!["haven:operator".into()];
        assert_eq!(AdminRole::of(&p), Some(AdminRole::Operator));
        p.scopes = vec!["mcp:tools".into(), "haven:admin".into()];
        assert_eq!(AdminRole::of(&p), Some(AdminRole::Admin));
        assert!(AdminRole::Admin > AdminRole::Operator && AdminRole::Operator > AdminRole::Viewer);
        assert_eq!(
            AdminRole::required("GET", "/admin/v1/secrets"),
            AdminRole::Viewer
        );
        assert_eq!(
            AdminRole::required("POST", "/admin/v1/backup/now"),
            AdminRole::Operator
        );
        assert_eq!(
            AdminRole::required("PUT", "/admin/v1/config/catalog"),
            AdminRole::Admin
        );
        assert_eq!(
            AdminRole::required("POST", "/admin/v1/auth/rules"),
            AdminRole::Admin
        );
        assert_eq!(
            AdminRole::required("DELETE", "/admin/v1/auth/rules/x"),
            AdminRole::Admin
        );
    }
}
