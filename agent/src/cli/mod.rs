//! Subcommands that need more than one floor of the agent: `policy eval`
//! decides requests offline exactly as the L7 session does, so it sits above
//! both the policy and the L7 rooms.

pub mod policy;
