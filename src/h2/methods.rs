//! Per-method metrics of h2 mode: `portshare_method_calls_total{method,grpc_status}` and
//! `portshare_call_duration_seconds{method}`, for the gRPC method (`/pkg.Service/Method`)
//! of every call. Cardinality is bounded: the first [`METHOD_LIMIT`] distinct methods get
//! series of their own, every later one is counted as `method="other"`, so a client that
//! sends random paths cannot grow the exposition without bound.
//!
//! Per call this is one lookup in the calling data-path thread's own map (no lock another
//! thread takes) and one counter increment; the shared registry is consulted only the first
//! time a thread sees a method. Handles sit in fixed slots that are filled once and never
//! moved, so a call holds a plain reference to its method's, touching no reference count.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use metrics::{Counter, Histogram, counter, histogram};

use crate::metrics as m;

/// Distinct methods with series of their own; later ones are `method="other"`.
pub const METHOD_LIMIT: usize = 200;

/// The label of every method beyond [`METHOD_LIMIT`].
const OTHER: &str = "other";

/// Longest method name kept as a label; a longer path is `other` too (gRPC paths are short).
const MAX_METHOD_LEN: usize = 256;

/// One method's metric handles.
#[derive(Debug)]
pub struct Method {
    name: Box<str>,
    ok: Counter,
    duration: Histogram,
}

impl Method {
    fn new(name: &str) -> Self {
        Self {
            ok: counter!(m::METHOD_CALLS, "method" => name.to_owned(), "grpc_status" => "0"),
            duration: histogram!(m::CALL_DURATION_SECONDS, "method" => name.to_owned()),
            name: name.into(),
        }
    }

    /// The label value: the method's path, or `other`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts one finished call with its gRPC status and duration in seconds.
    pub fn record(&self, grpc_status: u32, seconds: f64) {
        if grpc_status == 0 {
            self.ok.increment(1);
        } else {
            counter!(m::METHOD_CALLS, "method" => self.name.to_string(), "grpc_status" => grpc_status.to_string())
                .increment(1);
        }
        self.duration.record(seconds);
    }
}

/// Where a path's handles are: a slot, or `other`.
type Place = Option<usize>;

/// One thread's paths; the last method looked up is compared first, since the calls of a
/// connection (and of a service) mostly repeat one method. It is kept as its slot, whose
/// handles hold the name, so switching between methods allocates nothing.
#[derive(Debug, Default)]
struct Cache {
    last: Option<usize>,
    seen: HashMap<Box<str>, Place>,
}

/// Every method seen, shared by the data-path threads, with each thread's own cache.
#[derive(Debug)]
pub struct Methods {
    /// The methods given a slot so far, by path.
    registry: Mutex<HashMap<Box<str>, usize>>,
    /// The handles, one slot per method, filled in order and never moved.
    slots: Box<[OnceLock<Method>]>,
    /// Each data-path thread's view of `registry`, plus the paths it saw counted as `other`.
    caches: Box<[Mutex<Cache>]>,
    other: Method,
}

impl Methods {
    /// Per-method metrics for `threads` data-path threads, `limit` methods at most.
    pub fn new(threads: usize, limit: usize) -> Self {
        Self {
            registry: Mutex::default(),
            slots: (0..limit).map(|_| OnceLock::new()).collect(),
            caches: (0..threads.max(1)).map(|_| Mutex::default()).collect(),
            other: Method::new(OTHER),
        }
    }

    /// The handles for the method at `path`, as seen from data-path thread `thread`.
    pub fn get(&self, thread: usize, path: &str) -> &Method {
        let cache = &self.caches[thread % self.caches.len()];
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(method) = cache.last.and_then(|i| self.method(i))
            && *method.name == *path
        {
            return method;
        }
        let place = match cache.seen.get(path) {
            Some(place) => *place,
            None => {
                let place = self.register(path);
                // Bounded like the registry: its methods, plus as many `other` paths.
                if cache.seen.len() < 2 * self.slots.len().max(1) {
                    cache.seen.insert(path.into(), place);
                }
                place
            }
        };
        cache.last = place;
        place.and_then(|i| self.method(i)).unwrap_or(&self.other)
    }

    fn method(&self, slot: usize) -> Option<&Method> {
        self.slots.get(slot).and_then(OnceLock::get)
    }

    fn register(&self, path: &str) -> Place {
        if path.len() > MAX_METHOD_LEN {
            return None;
        }
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = registry.get(path) {
            return Some(*i);
        }
        let i = registry.len();
        let slot = self.slots.get(i)?;
        // Filled under the registry's lock, before anyone can learn its index.
        let _ = slot.set(Method::new(path));
        registry.insert(path.into(), i);
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_beyond_the_limit_are_other() {
        let methods = Methods::new(2, 2);
        assert_eq!(methods.get(0, "/a.S/One").name(), "/a.S/One");
        assert_eq!(methods.get(1, "/a.S/Two").name(), "/a.S/Two");
        assert_eq!(methods.get(1, "/a.S/Three").name(), OTHER);
        // Known on every thread, whichever saw it first.
        assert_eq!(methods.get(1, "/a.S/One").name(), "/a.S/One");
        assert_eq!(methods.get(0, "/a.S/Two").name(), "/a.S/Two");
        assert_eq!(methods.get(0, "/a.S/Three").name(), OTHER);
        let long = format!("/{}", "x".repeat(MAX_METHOD_LEN));
        assert_eq!(Methods::new(1, 10).get(0, &long).name(), OTHER);
    }

    #[test]
    fn alternating_methods_each_get_their_own_handles() {
        let methods = Methods::new(1, 10);
        for _ in 0..3 {
            assert_eq!(methods.get(0, "/a.S/One").name(), "/a.S/One");
            assert_eq!(methods.get(0, "/a.S/Two").name(), "/a.S/Two");
            assert_eq!(methods.get(0, "/a.S/Two").name(), "/a.S/Two");
        }
    }

    #[test]
    fn the_same_method_is_the_same_handles() {
        let methods = Methods::new(1, 10);
        let a = methods.get(0, "/a.S/One");
        let b = methods.get(0, "/a.S/One");
        assert!(std::ptr::eq(a, b));
    }
}
