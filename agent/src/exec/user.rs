//! `--user USER|UID[:GID]`: the credentials a sandboxed program runs with.

use std::{
    ffi::{CString, OsString},
    path::PathBuf,
};

use anyhow::{bail, Context, Result};
use nix::unistd::{getgrouplist, setgroups, setresgid, setresuid, Gid, Uid, User};

/// Who CMD runs as.
#[derive(Debug, PartialEq, Eq)]
pub struct TargetUser {
    uid: Uid,
    gid: Gid,
    /// Supplementary groups (the primary one included, as `initgroups` sets them).
    groups: Vec<Gid>,
    /// From the passwd entry, when there is one: HOME, USER and LOGNAME.
    login: Option<(String, PathBuf)>,
}

impl TargetUser {
    /// `NAME` or `UID`, with the passwd entry's group and every group that
    /// lists the user; `:GID` replaces the primary group. A UID without a
    /// passwd entry needs `:GID`, which is then its only group.
    pub fn resolve(spec: &str) -> Result<Self> {
        let (user, gid) = match spec.split_once(':') {
            Some((user, gid)) => {
                let gid = gid.parse::<u32>().with_context(|| format!("--user {spec}: GID {gid:?} is not a number"))?;
                (user, Some(Gid::from_raw(gid)))
            }
            None => (spec, None),
        };
        let entry = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)).with_context(|| format!("look up uid {uid}"))?,
            Err(_) => Some(
                User::from_name(user)
                    .with_context(|| format!("look up user {user}"))?
                    .with_context(|| format!("unknown user {user}: no such name in the passwd database"))?,
            ),
        };
        let Some(entry) = entry else {
            let Some(gid) = gid else {
                bail!("uid {user} has no passwd entry: give its group as --user {user}:GID");
            };
            return Ok(Self { uid: Uid::from_raw(user.parse()?), gid, groups: vec![gid], login: None });
        };
        let gid = gid.unwrap_or(entry.gid);
        let name = CString::new(entry.name.clone()).context("a user name with a NUL byte")?;
        let groups = getgrouplist(&name, gid).with_context(|| format!("the groups of {}", entry.name))?;
        Ok(Self { uid: entry.uid, gid, groups, login: Some((entry.name, entry.dir)) })
    }

    /// HOME, USER and LOGNAME of the passwd entry, as `su` and `runuser`
    /// set them: the caller's HOME is usually root's, which the user cannot
    /// read (git, for one, fails on an unreadable ~/.gitconfig).
    pub fn login_variables(&self) -> Vec<(&'static str, OsString)> {
        match &self.login {
            None => Vec::new(),
            Some((name, home)) => vec![
                ("HOME", home.clone().into_os_string()),
                ("USER", OsString::from(name)),
                ("LOGNAME", OsString::from(name)),
            ],
        }
    }

    /// Groups, then group, then user: afterwards this process has no way back
    /// (a non-root uid in all three slots drops every capability).
    pub fn become_it(&self) -> Result<()> {
        setgroups(&self.groups).context("setgroups")?;
        setresgid(self.gid, self.gid, self.gid).with_context(|| format!("setresgid {}", self.gid))?;
        setresuid(self.uid, self.uid, self.uid).with_context(|| format!("setresuid {}", self.uid))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_uid_gid_pairs_resolve() {
        let root = TargetUser::resolve("root").unwrap();
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
        assert!(root.groups.contains(&Gid::from_raw(0)));
        assert_eq!(root.login.as_ref().map(|(name, _)| name.as_str()), Some("root"));
        assert_eq!(TargetUser::resolve("0").unwrap(), root);
        let regrouped = TargetUser::resolve("0:4343").unwrap();
        assert_eq!(regrouped.gid.as_raw(), 4343);
        assert!(regrouped.groups.contains(&Gid::from_raw(4343)), "{regrouped:?}");

        // No passwd entry: UID:GID only, and no login variables.
        let bare = TargetUser::resolve("4242:4343").unwrap();
        assert_eq!(
            (bare.uid.as_raw(), bare.gid.as_raw(), bare.groups.clone()),
            (4242, 4343, vec![Gid::from_raw(4343)])
        );
        assert!(bare.login_variables().is_empty());
    }

    #[test]
    fn unknown_users_are_errors() {
        let error = TargetUser::resolve("no-such-user-x").unwrap_err().to_string();
        assert_eq!(error, "unknown user no-such-user-x: no such name in the passwd database");
        let error = TargetUser::resolve("4242").unwrap_err().to_string();
        assert_eq!(error, "uid 4242 has no passwd entry: give its group as --user 4242:GID");
        let error = TargetUser::resolve("root:wheel").unwrap_err().to_string();
        assert!(error.contains("GID \"wheel\" is not a number"), "{error}");
    }
}
