//! Picking a backend: round-robin, least-connections and power-of-two-choices, as pure,
//! synchronous logic over a list of candidates, so it can be tested without a socket.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// How a backend is chosen among the usable ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// The fewest active connections; ties are broken by rotation, so sequential
    /// short connections on an idle set still visit every backend.
    LeastConn,
    /// Each backend in turn.
    RoundRobin,
    /// Two distinct random candidates, the less loaded of them (ties at random): nearly
    /// least-conn's spread without every picker herding onto the same "best" backend.
    P2c,
}

impl Balance {
    const ALL: [Balance; 3] = [Balance::LeastConn, Balance::RoundRobin, Balance::P2c];

    /// The spelling used in flags and config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastConn => "least-conn",
            Balance::RoundRobin => "round-robin",
            Balance::P2c => "p2c",
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A picker: the strategy plus the rotation cursor it needs.
#[derive(Debug)]
pub struct Balancer {
    /// The strategy, as its index in [`Balance::ALL`]: a reload may change it while picks
    /// run.
    kind: AtomicU8,
    /// Advances on every pick; round-robin's position and least-conn's tie-break start.
    cursor: AtomicUsize,
}

impl Balancer {
    /// A picker for `kind`, starting at a random position so that several portshare
    /// instances in front of the same workers do not all begin with the first one.
    pub fn new(kind: Balance) -> Self {
        Self {
            kind: AtomicU8::new(Self::encode(kind)),
            cursor: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    fn encode(kind: Balance) -> u8 {
        Balance::ALL.iter().position(|k| *k == kind).unwrap_or(0) as u8
    }

    /// The strategy now.
    pub fn kind(&self) -> Balance {
        Balance::ALL[usize::from(self.kind.load(Ordering::Relaxed)) % Balance::ALL.len()]
    }

    /// Switches the strategy (a reload); picks under way finish with the old one.
    pub fn set_kind(&self, kind: Balance) {
        self.kind.store(Self::encode(kind), Ordering::Relaxed);
    }

    /// A picker whose rotation starts at `cursor`, for tests that need a known order.
    #[cfg(test)]
    pub(crate) fn starting_at(kind: Balance, cursor: usize) -> Self {
        Self {
            kind: AtomicU8::new(Self::encode(kind)),
            cursor: AtomicUsize::new(cursor),
        }
    }

    /// Picks one of `candidates`, given each one's current `load`; returns its index, or
    /// `None` when there is nothing to pick from.
    pub fn pick<T>(&self, candidates: &[T], load: impl Fn(&T) -> usize) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed);
        match self.kind() {
            Balance::RoundRobin => Some(turn % n),
            Balance::LeastConn => {
                let start = turn % n;
                let mut best = start;
                let mut best_load = load(&candidates[start]);
                for step in 1..n {
                    let i = (start + step) % n;
                    let l = load(&candidates[i]);
                    if l < best_load {
                        best = i;
                        best_load = l;
                    }
                }
                Some(best)
            }
            Balance::P2c => {
                let Some((a, b)) =
                    two_distinct(n, || fastrand::usize(..n), |m| fastrand::usize(..m))
                else {
                    return Some(0);
                };
                let (la, lb) = (load(&candidates[a]), load(&candidates[b]));
                Some(match la.cmp(&lb) {
                    std::cmp::Ordering::Less => a,
                    std::cmp::Ordering::Greater => b,
                    std::cmp::Ordering::Equal if fastrand::bool() => a,
                    std::cmp::Ordering::Equal => b,
                })
            }
        }
    }
}

/// Two distinct indices below `n` (None when `n < 2`): the first uniform over `n`, the second
/// uniform over the remaining `n - 1`, so no retry loop is needed to avoid a repeat.
fn two_distinct(
    n: usize,
    first: impl FnOnce() -> usize,
    second_below: impl FnOnce(usize) -> usize,
) -> Option<(usize, usize)> {
    if n < 2 {
        return None;
    }
    let a = first() % n;
    let mut b = second_below(n - 1) % (n - 1);
    if b >= a {
        b += 1;
    }
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counts(b: &Balancer, loads: &[usize], picks: usize) -> Vec<usize> {
        let mut seen = vec![0; loads.len()];
        for _ in 0..picks {
            let i = b.pick(loads, |l| *l).unwrap_or(usize::MAX);
            seen[i] += 1;
        }
        seen
    }

    #[test]
    fn nothing_to_pick_from() {
        for kind in Balance::ALL {
            assert_eq!(Balancer::new(kind).pick(&[] as &[usize], |l| *l), None);
        }
    }

    #[test]
    fn a_single_backend_is_always_picked() {
        for kind in [Balance::LeastConn, Balance::RoundRobin, Balance::P2c] {
            let b = Balancer::new(kind);
            for _ in 0..10 {
                assert_eq!(b.pick(&[7usize], |l| *l), Some(0));
            }
        }
    }

    #[test]
    fn a_switched_strategy_takes_the_next_pick() {
        let b = Balancer::starting_at(Balance::RoundRobin, 0);
        assert_eq!(b.pick(&[5, 0, 9], |l| *l), Some(0));
        b.set_kind(Balance::LeastConn);
        assert_eq!(b.kind(), Balance::LeastConn);
        assert_eq!(b.pick(&[5, 0, 9], |l| *l), Some(1));
    }

    #[test]
    fn round_robin_visits_each_in_turn() {
        assert_eq!(
            counts(&Balancer::new(Balance::RoundRobin), &[5, 0, 9, 1], 400),
            vec![100; 4]
        );
    }

    #[test]
    fn least_conn_takes_the_least_loaded() {
        let b = Balancer::new(Balance::LeastConn);
        for _ in 0..20 {
            assert_eq!(b.pick(&[3usize, 1, 4, 2], |l| *l), Some(1));
        }
    }

    /// HAProxy and nginx send every sequential connection on an idle set to the first
    /// server; ties must rotate instead.
    #[test]
    fn least_conn_rotates_among_ties() {
        let seen = counts(&Balancer::new(Balance::LeastConn), &[0, 0, 0, 0], 400);
        assert_eq!(seen, vec![100; 4]);
        let seen = counts(&Balancer::new(Balance::LeastConn), &[2, 0, 5, 0], 400);
        assert_eq!(seen, vec![0, 200, 0, 200]);
    }

    #[test]
    fn p2c_spreads_over_equal_backends() {
        let seen = counts(&Balancer::new(Balance::P2c), &[0, 0, 0, 0], 4000);
        for c in seen {
            assert!((700..=1300).contains(&c), "uneven spread: {c}");
        }
    }

    #[test]
    fn p2c_never_picks_the_most_loaded_of_two() {
        let seen = counts(&Balancer::new(Balance::P2c), &[9, 1], 200);
        assert_eq!(seen, vec![0, 200]);
    }

    proptest! {
        #[test]
        fn two_distinct_are_distinct_and_in_range(n in 2usize..64, x in any::<usize>(), y in any::<usize>()) {
            let (a, b) = two_distinct(n, || x, |m| y % m).unwrap_or((0, 0));
            prop_assert!(a < n && b < n);
            prop_assert_ne!(a, b);
        }

        /// P2C compares two distinct candidates, so with two or more it never returns the one
        /// whose load is strictly above every other.
        #[test]
        fn p2c_never_picks_a_unique_maximum(loads in proptest::collection::vec(0usize..5, 2..8)) {
            let b = Balancer::new(Balance::P2c);
            let max = loads.iter().copied().max().unwrap_or(0);
            let unique_max = loads.iter().filter(|l| **l == max).count() == 1;
            for _ in 0..50 {
                let i = b.pick(&loads, |l| *l).unwrap_or(usize::MAX);
                prop_assert!(i < loads.len());
                prop_assert!(!(unique_max && loads[i] == max));
            }
        }

        #[test]
        fn least_conn_picks_a_minimum(loads in proptest::collection::vec(0usize..5, 1..8)) {
            let b = Balancer::new(Balance::LeastConn);
            let min = loads.iter().copied().min().unwrap_or(0);
            let i = b.pick(&loads, |l| *l).unwrap_or(usize::MAX);
            prop_assert_eq!(loads[i], min);
        }
    }
}
