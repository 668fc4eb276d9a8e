//! The set of all backends: membership (added and removed as workers are replaced),
//! the candidates a call or connection may go to, the pick (with a cap and the bounded
//! wait), passive ejection, and the snapshots `/backends` and `/metrics` read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::queue::Capacity;
use super::{
    ActiveGuard, Backend, BackendSpec, BackendStatus, CheckResult, ConnectFailure, EjectionConfig,
    Health, Thresholds, Tried, Unplaced, lock,
};
use crate::backoff;
use crate::balance::Balancer;

/// All backends, shared by the data path, the admin endpoint and (later) the supervisor.
#[derive(Debug)]
pub struct BackendSet {
    /// The current list; replaced whole when membership changes, so readers take a cheap
    /// snapshot and never hold a lock while they connect.
    backends: RwLock<Arc<[Arc<Backend>]>>,
    /// Counts membership changes; the health checks follow it.
    members: watch::Sender<u64>,
    /// The next backend's id.
    next_id: AtomicU64,
    /// Serialises ejection decisions, so two failures at once cannot eject the last two.
    eject_lock: Mutex<()>,
    /// How long ejections last, and the streaks that flip a backend (a connect refused on
    /// the data path counts as a failed check); a reload may change both.
    tuning: Mutex<(EjectionConfig, Thresholds)>,
    /// Wakes waiters when a backend can take more.
    capacity: Arc<Capacity>,
}

impl BackendSet {
    /// A set with no backends, for tests that only need something to hand over.
    #[cfg(test)]
    pub(crate) fn empty() -> Arc<Self> {
        let second = Duration::from_secs(1);
        Arc::new(Self::new(
            Vec::new(),
            EjectionConfig {
                base_time: second,
                max_time: second,
            },
            Thresholds {
                healthy: 1,
                unhealthy: 1,
            },
        ))
    }

    /// A set holding `specs`, all in rotation.
    pub fn new(
        specs: impl IntoIterator<Item = BackendSpec>,
        ejection: EjectionConfig,
        thresholds: Thresholds,
    ) -> Self {
        let now = Instant::now();
        let capacity = Arc::new(Capacity::default());
        let list: Vec<Arc<Backend>> = specs
            .into_iter()
            .enumerate()
            .map(|(id, s)| Arc::new(Backend::new(id as u64, s, now, Arc::clone(&capacity))))
            .collect();
        Self {
            next_id: AtomicU64::new(list.len() as u64),
            members: watch::Sender::new(0),
            backends: RwLock::new(list.into()),
            eject_lock: Mutex::new(()),
            tuning: Mutex::new((ejection, thresholds)),
            capacity,
        }
    }

    /// The backends as they are now.
    pub fn snapshot(&self) -> Arc<[Arc<Backend>]> {
        Arc::clone(&self.backends.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn thresholds(&self) -> Thresholds {
        lock(&self.tuning).1
    }

    /// New ejection lengths and check thresholds (a reload); streaks under way keep their
    /// counts.
    pub fn retune(&self, ejection: EjectionConfig, thresholds: Thresholds) {
        *lock(&self.tuning) = (ejection, thresholds);
    }

    /// Adds a configured backend while running (a reload): out of rotation (`unhealthy`,
    /// never checked) until its first check passes, listed last.
    pub fn join(&self, spec: BackendSpec) -> Arc<Backend> {
        let backend = self.fresh(spec);
        {
            let mut s = lock(&backend.state);
            s.health.set(Health::Unhealthy, Instant::now());
            s.health.first_result_decides = true;
        }
        self.insert(Arc::clone(&backend), None);
        backend
    }

    /// Adds a backend for `spec`, listed right after `beside` when given (a worker's
    /// replacement next to the process it replaces), else last. It starts as a new one
    /// does: `unknown`, or `stopped` for a spawned worker until it starts.
    pub fn add(&self, spec: BackendSpec, beside: Option<&Backend>) -> Arc<Backend> {
        let backend = self.fresh(spec);
        self.insert(Arc::clone(&backend), beside);
        backend
    }

    /// A backend for `spec` with the next id, not yet in the set.
    fn fresh(&self, spec: BackendSpec) -> Arc<Backend> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(Backend::new(
            id,
            spec,
            Instant::now(),
            Arc::clone(&self.capacity),
        ))
    }

    fn insert(&self, backend: Arc<Backend>, beside: Option<&Backend>) {
        {
            let mut list = self
                .backends
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let mut next: Vec<Arc<Backend>> = list.iter().cloned().collect();
            let at = beside
                .and_then(|b| next.iter().position(|n| n.id == b.id))
                .map_or(next.len(), |i| i + 1);
            next.insert(at, backend);
            *list = next.into();
        }
        self.members.send_modify(|n| *n += 1);
    }

    /// Takes `backend` out of the set for good: no call can pick it any more, and its
    /// checker and pooled connection go.
    pub fn remove(&self, backend: &Backend) {
        {
            let mut list = self
                .backends
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let next: Vec<Arc<Backend>> = list
                .iter()
                .filter(|b| b.id != backend.id)
                .cloned()
                .collect();
            *list = next.into();
        }
        backend.retired.cancel();
        // Its gauges stay in the exposition (the address may come back as a worker's spare
        // port); they must not go on saying it is up.
        backend.metrics.up.set(0.0);
        backend.metrics.active.set(0.0);
        self.members.send_modify(|n| *n += 1);
    }

    /// Changes whenever a backend is added or removed.
    pub fn membership(&self) -> watch::Receiver<u64> {
        self.members.subscribe()
    }

    /// The backends a new connection may go to, leaving out `tried` and those with `cap`
    /// calls in flight: the healthy ones in rotation, or, when passive ejection has left
    /// none of those, every healthy one not yet tried: if all look bad, keep trying them
    /// rather than refuse the client outright. Backends that checks or the supervisor took
    /// out (starting, unhealthy, not serving, draining, stopped) are never offered.
    pub fn candidates(&self, now: Instant, tried: &Tried, cap: Option<usize>) -> Vec<Arc<Backend>> {
        let snapshot = self.snapshot();
        eligible(&snapshot, now, tried, cap)
            .into_iter()
            .cloned()
            .collect()
    }

    /// Picks a backend for one call or connection and counts it there: `None` when none
    /// can take it now (none in rotation, all tried, all at `cap`).
    pub fn pick(
        &self,
        balancer: &Balancer,
        tried: &Tried,
        cap: Option<usize>,
    ) -> Option<ActiveGuard> {
        // With a cap, another pick may take the last place between the look and the count;
        // then look again, a few times at most (the wait below catches the rest).
        for _ in 0..4 {
            // Borrowed from one snapshot: no reference count of a backend is touched (those
            // cache lines are shared by every thread) unless it is picked.
            let snapshot = self.snapshot();
            let candidates = eligible(&snapshot, Instant::now(), tried, cap);
            let i = balancer.pick(&candidates, |b| b.active())?;
            if let Some(guard) = candidates[i].try_track(cap) {
                // Looked at again once counted: a backend taken out meanwhile (drained for
                // a restart) waits only for what it counts, so this one must go elsewhere.
                if candidates[i].health().takes_traffic() {
                    return Some(guard);
                }
            }
        }
        None
    }

    /// [`BackendSet::pick`], waiting until `until` when no backend can take it now.
    pub async fn pick_or_wait(
        &self,
        balancer: &Balancer,
        tried: &Tried,
        cap: Option<usize>,
        until: Instant,
    ) -> Result<ActiveGuard, Unplaced> {
        if let Some(guard) = self.pick(balancer, tried, cap) {
            return Ok(guard);
        }
        // Boxed: the slow path's state would otherwise widen every connection's task.
        Box::pin(
            self.capacity
                .wait_for(until, || self.pick(balancer, tried, cap)),
        )
        .await
        .map_err(|waited| Unplaced {
            waited,
            why: self.why_unplaced(tried, cap),
        })
    }

    /// Calls or connections waiting for a backend now.
    pub fn waiting(&self) -> usize {
        self.capacity.waiting()
    }

    /// Why no backend can take a call now, for the message its client gets.
    fn why_unplaced(&self, tried: &Tried, cap: Option<usize>) -> String {
        let now = Instant::now();
        let snapshot = self.snapshot();
        let in_rotation: Vec<&Arc<Backend>> =
            snapshot.iter().filter(|b| b.is_usable(now)).collect();
        if in_rotation.is_empty() {
            return "no backend is ready".to_owned();
        }
        if let Some(cap) = cap
            && in_rotation.iter().all(|b| b.active() >= cap)
        {
            return format!("every ready backend has {cap} calls in flight (its cap)");
        }
        let tried = tried.len();
        format!("every ready backend was tried ({tried} attempts) and failed")
    }

    /// How many backends are in rotation at `now`.
    pub fn usable(&self, now: Instant) -> usize {
        self.snapshot().iter().filter(|b| b.is_usable(now)).count()
    }

    /// How many backends have passed a health check and are in rotation at `now`: what
    /// `/readyz` asks for.
    pub fn ready(&self, now: Instant) -> usize {
        self.snapshot()
            .iter()
            .filter(|b| b.health() == Health::Healthy && !b.is_ejected(now))
            .count()
    }

    /// Applies one health-check result to `backend`, logging a flip once.
    pub fn record_check(&self, backend: &Backend, result: &CheckResult, now: Instant) {
        let before = lock(&backend.state)
            .health
            .observe(result, &self.thresholds(), now);
        backend.changed(before, Some(result));
    }

    /// Records a successful connect: the backend's ejection streak starts over.
    pub fn connect_succeeded(&self, backend: &Backend) {
        backend.metrics.connections.increment(1);
        lock(&backend.state).passive.streak = 0;
    }

    /// Records a failed connect and ejects the backend, unless that would leave no backend
    /// in rotation. Returns the ejection's length when it was ejected.
    pub fn connect_failed(
        &self,
        backend: &Backend,
        failure: ConnectFailure,
        error: &str,
        now: Instant,
    ) -> Option<Duration> {
        match failure {
            ConnectFailure::Refused => {
                backend.metrics.refused.increment(1);
                // Nothing listens there: as good as a failed check, and worth checking
                // again at once, so a dead backend leaves rotation within a second or two.
                self.record_check(
                    backend,
                    &CheckResult::Fail(format!("data path: {error}")),
                    now,
                );
                backend.recheck.notify_one();
            }
            ConnectFailure::Timeout => backend.metrics.timeout.increment(1),
            ConnectFailure::Other => backend.metrics.other_error.increment(1),
        }
        let _decision = lock(&self.eject_lock);
        let others_in_rotation = self
            .snapshot()
            .iter()
            .filter(|b| b.addr() != backend.addr() && b.is_usable(now))
            .count();
        let mut s = lock(&backend.state);
        let p = &mut s.passive;
        p.connect_failures += 1;
        p.last_error = Some(error.to_owned());
        if others_in_rotation == 0 || p.ejected_until.is_some_and(|t| t > now) {
            return None;
        }
        let (ejection, _) = *lock(&self.tuning);
        let length = backoff::exponential(ejection.base_time, ejection.max_time, p.streak);
        p.streak = p.streak.saturating_add(1);
        p.ejections += 1;
        p.ejected_until = Some(now + length);
        backend.metrics.ejections.increment(1);
        Some(length)
    }

    /// Status of every backend, for `/backends`.
    pub fn statuses(&self, now: Instant) -> Vec<BackendStatus> {
        self.snapshot().iter().map(|b| b.status(now)).collect()
    }

    /// Sets the gauges that are cheaper to read at scrape time than to keep current.
    pub fn publish_gauges(&self, now: Instant) {
        for b in self.snapshot().iter() {
            b.metrics.active.set(b.active() as f64);
            b.metrics.up.set(if b.is_usable(now) { 1.0 } else { 0.0 });
        }
    }
}

/// [`BackendSet::candidates`] among `backends`, borrowed.
fn eligible<'a>(
    backends: &'a [Arc<Backend>],
    now: Instant,
    tried: &Tried,
    cap: Option<usize>,
) -> Vec<&'a Arc<Backend>> {
    // This runs for every connection (l4) or call (h2): one pass, one lock per backend.
    let mut usable = Vec::with_capacity(backends.len());
    let mut ejected = Vec::new();
    for b in backends {
        if cap.is_some_and(|cap| b.active() >= cap) {
            continue;
        }
        let (takes_traffic, is_ejected) = {
            let s = lock(&b.state);
            if !tried.is_empty() && tried.has(b.id(), s.health.generation) {
                continue;
            }
            (
                s.health.health.takes_traffic(),
                s.passive.ejected_until.is_some_and(|t| t > now),
            )
        };
        match (takes_traffic, is_ejected) {
            (true, false) => usable.push(b),
            (true, true) => ejected.push(b),
            _ => {}
        }
    }
    if usable.is_empty() { ejected } else { usable }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendAddr;
    use std::net::SocketAddr;

    const SEC: Duration = Duration::from_secs(1);

    fn set(n: u16) -> BackendSet {
        let specs = (0..n).map(|i| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 20000 + i));
            BackendSpec {
                name: addr.to_string(),
                addr: addr.into(),
                worker: None,
            }
        });
        BackendSet::new(
            specs,
            EjectionConfig {
                base_time: SEC,
                max_time: 4 * SEC,
            },
            Thresholds {
                healthy: 2,
                unhealthy: 3,
            },
        )
    }

    /// A connect that timed out: ejects, but says nothing certain about health.
    fn fail(set: &BackendSet, i: usize, now: Instant) -> Option<Duration> {
        let b = Arc::clone(&set.snapshot()[i]);
        set.connect_failed(&b, ConnectFailure::Timeout, "timed out", now)
    }

    fn tried(set: &BackendSet, which: &[usize]) -> Tried {
        let mut t = Tried::new();
        for i in which {
            t.add(&set.snapshot()[*i]);
        }
        t
    }

    #[test]
    fn ejection_grows_on_repeat_is_capped_and_resets_on_success() {
        let s = set(2);
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        for _ in 0..4 {
            lengths.push(fail(&s, 0, now));
            now += 5 * SEC;
        }
        assert_eq!(
            lengths,
            [Some(SEC), Some(2 * SEC), Some(4 * SEC), Some(4 * SEC)]
        );
        let b = Arc::clone(&s.snapshot()[0]);
        s.connect_succeeded(&b);
        assert_eq!(fail(&s, 0, now), Some(SEC));
        assert_eq!(b.status(now).ejections, 5);
        assert_eq!(b.status(now).connect_failures, 5);
    }

    #[test]
    fn an_ejected_backend_leaves_rotation_until_its_time_is_up() {
        let s = set(3);
        let now = Instant::now();
        fail(&s, 1, now);
        let names: Vec<BackendAddr> = s
            .candidates(now, &Tried::new(), None)
            .iter()
            .map(|b| b.addr().clone())
            .collect();
        assert_eq!(names.len(), 2);
        assert!(!names.contains(s.snapshot()[1].addr()));
        assert_eq!(s.usable(now + 2 * SEC), 3);
        assert_eq!(s.snapshot()[1].status(now).state, "ejected");
    }

    #[test]
    fn the_last_backend_in_rotation_is_never_ejected() {
        let s = set(2);
        let now = Instant::now();
        assert!(fail(&s, 0, now).is_some());
        assert_eq!(fail(&s, 1, now), None);
        assert_eq!(s.usable(now), 1);
    }

    #[test]
    fn when_every_candidate_looks_bad_the_untried_ones_are_still_offered() {
        let s = set(2);
        let now = Instant::now();
        fail(&s, 0, now);
        let c = s.candidates(now, &tried(&s, &[1]), None);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].addr(), s.snapshot()[0].addr());
        assert!(s.candidates(now, &tried(&s, &[0, 1]), None).is_empty());
    }

    #[test]
    fn a_refused_connect_counts_as_a_failed_check() {
        let s = set(2);
        let now = Instant::now();
        let b = Arc::clone(&s.snapshot()[0]);
        s.record_check(&b, &CheckResult::Pass, now);
        for _ in 0..2 {
            s.connect_failed(&b, ConnectFailure::Refused, "refused", now);
            assert_eq!(b.health(), Health::Healthy);
            assert!(b.check_pace().1, "a failure streak is under way");
        }
        s.connect_failed(&b, ConnectFailure::Refused, "refused", now);
        assert_eq!(b.health(), Health::Unhealthy);
        assert_eq!(s.ready(now), 0);
    }

    #[test]
    fn a_backend_tried_in_one_incarnation_is_offered_in_the_next() {
        let s = set(1);
        let now = Instant::now();
        let b = Arc::clone(&s.snapshot()[0]);
        let t = tried(&s, &[0]);
        assert!(s.candidates(now, &t, None).is_empty());
        // It fails, leaves rotation, and comes back: a new incarnation.
        for _ in 0..3 {
            s.record_check(&b, &CheckResult::Fail("down".into()), now);
        }
        assert!(s.candidates(now, &Tried::new(), None).is_empty());
        for _ in 0..2 {
            s.record_check(&b, &CheckResult::Pass, now);
        }
        assert_eq!(s.candidates(now, &t, None).len(), 1);
    }

    #[test]
    fn a_backend_at_its_cap_takes_no_more() {
        let s = set(2);
        let balancer = Balancer::new(crate::balance::Balance::LeastConn);
        let none = Tried::new();
        let a = s.pick(&balancer, &none, Some(1));
        let b = s.pick(&balancer, &none, Some(1));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("two backends with a cap of 1 take two calls");
        };
        assert_ne!(a.backend().addr(), b.backend().addr());
        assert!(s.pick(&balancer, &none, Some(1)).is_none());
        assert_eq!(
            s.why_unplaced(&none, Some(1)),
            "every ready backend has 1 calls in flight (its cap)"
        );
        drop(a);
        assert!(s.pick(&balancer, &none, Some(1)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_for_a_backend_to_enter_rotation() {
        let s = Arc::new(set(1));
        let b = Arc::clone(&s.snapshot()[0]);
        b.set_health(Health::Starting, Instant::now());
        let waiter = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let balancer = Balancer::new(crate::balance::Balance::P2c);
                let until = Instant::now() + 10 * SEC;
                s.pick_or_wait(&balancer, &Tried::new(), None, until)
                    .await
                    .map(|g| g.backend().addr().clone())
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(s.waiting(), 1);
        s.record_check(&b, &CheckResult::Pass, Instant::now());
        assert_eq!(waiter.await.ok(), Some(Ok(b.addr().clone())));
        assert_eq!(s.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_says_why() {
        let s = set(1);
        let b = Arc::clone(&s.snapshot()[0]);
        b.set_health(Health::Starting, Instant::now());
        let balancer = Balancer::new(crate::balance::Balance::P2c);
        let until = Instant::now() + 2 * SEC;
        let r = s.pick_or_wait(&balancer, &Tried::new(), None, until).await;
        let Err(unplaced) = r else {
            panic!("nothing can take it");
        };
        assert_eq!(unplaced.waited, 2 * SEC);
        assert_eq!(unplaced.why, "no backend is ready");
    }

    #[test]
    fn active_guard_counts_while_alive() {
        let s = set(1);
        let b = Arc::clone(&s.snapshot()[0]);
        let g1 = b.track();
        let g2 = b.track();
        assert_eq!(b.active(), 2);
        drop(g1);
        assert_eq!(g2.backend().active(), 1);
        drop(g2);
        assert_eq!(b.active(), 0);
    }
}
