//! Where a connection given back at a transaction boundary goes: the check-in ladder, as
//! decisions on plain values (the pool climbs it with its queues and channels).
//!
//! 1. Too old (`max_connection_lifetime`): closed.
//! 2. A borrower of the same key starving on another core since before this core's first
//!    waiter: moved there (serving this core first could starve the other as long as this
//!    one stays busy).
//! 3. A waiter of the same key on this core.
//! 4. A starving borrower of the same key on another core.
//! 5. Kept idle, unless the budget is wanted by a starving borrower of another key, the
//!    idle limit is reached, or `max_connections` shrank below what is open: then closed.

use std::time::Duration;

/// Rung 1: whether a connection `age` old is past `max_lifetime` (zero: no limit).
pub fn expired(age: Duration, max_lifetime: Duration) -> bool {
    !max_lifetime.is_zero() && age >= max_lifetime
}

/// Rung 2: whether the longest-waiting starving borrower elsewhere (`remote`, since
/// when) goes before this core's longest-waiting one (`local`).
pub fn remote_first(remote: Option<Duration>, local: Option<Duration>) -> bool {
    match (remote, local) {
        (Some(r), Some(l)) => r < l,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Rung 5: what happens to a connection nobody waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    Idle,
    Close(&'static str),
}

/// Rung 5, given whether a starving borrower of another key claimed the budget, the idle
/// connections of the group now, its `max_idle_connections`, and whether it is over
/// budget.
pub fn park(claimed_for_other: bool, idle: usize, max_idle: usize, over_budget: bool) -> Park {
    if claimed_for_other {
        Park::Close("the budget is wanted by a borrower of another key")
    } else if over_budget {
        Park::Close("max_connections shrank below what is open")
    } else if idle >= max_idle {
        Park::Close("max_idle_connections reached")
    } else {
        Park::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn lifetime_counts_only_when_set() {
        assert!(!expired(s(10_000), Duration::ZERO));
        assert!(!expired(s(59), s(60)));
        assert!(expired(s(60), s(60)));
    }

    #[test]
    fn the_longest_waiting_borrower_goes_first_whichever_core_it_is_on() {
        assert!(remote_first(Some(s(1)), Some(s(2))));
        assert!(!remote_first(Some(s(2)), Some(s(1))));
        assert!(
            !remote_first(Some(s(1)), Some(s(1))),
            "a tie stays on this core"
        );
        assert!(remote_first(Some(s(5)), None));
        assert!(!remote_first(None, Some(s(1))));
        assert!(!remote_first(None, None));
    }

    #[test]
    fn a_connection_nobody_waits_for_is_kept_within_the_limits() {
        assert_eq!(park(false, 3, 4, false), Park::Idle);
        assert!(matches!(park(false, 4, 4, false), Park::Close(_)));
        assert!(matches!(park(true, 0, 4, false), Park::Close(_)));
        assert!(matches!(park(false, 0, 4, true), Park::Close(_)));
    }
}
