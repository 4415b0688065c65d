//! Subcommands that need more than one floor of the agent: `policy eval`
//! decides requests offline exactly as the L7 session does, so it sits above
//! both the policy and the L7 rooms;
//! `policy suggest` (`policy/suggest.rs`) writes rules from the daemon's
//! recent denials and checks them the same way.

pub mod policy;
