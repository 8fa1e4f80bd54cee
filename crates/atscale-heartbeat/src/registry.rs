//! The in-flight registry behind a [`Monitor`](crate::Monitor): every request
//! in flight with its start, last progress and units, and the request
//! counters, without a lock on the request path.
//!
//! - **Ids and counters**: a request's id is the value of one shared counter
//!   after its increment (so ids count the requests started, in the order
//!   they started); finishing adds one to the counter of its outcome. Each is
//!   one atomic read-modify-write, and the only ones a request makes here.
//! - **Slots**: each thread that starts requests claims slots in its own
//!   shard with plain loads and stores (no other thread claims there); a
//!   request's slot is released by whichever thread finishes it, with one
//!   store. Threads beyond [`EXCLUSIVE`] (or a thread being torn down) share
//!   one more shard, claimed with compare-and-swap.
//! - **Readers** ([`Registry::each`], [`Registry::counts`]) never block the
//!   request path: a slot read is kept only if its id is the same before and
//!   after (ids are never reused), and a [`Counts`] is kept only when two
//!   passes over the counters agree, so it is the exact state at one instant.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::monitor::Counts;
use crate::pulse::Outcome;

/// Threads with a shard of their own; more share the last shard.
pub(crate) const EXCLUSIVE: usize = 64;
/// Slots in a shard's first chunk; chunk `k` has `BASE << k`.
const BASE: usize = 8;
/// Chunks per shard: `BASE * (2^CHUNKS - 1)` slots at most (about 5 * 10^8).
const CHUNKS: usize = 26;

/// A slot's id word: free.
const FREE: u64 = 0;
/// A slot's id word: claimed, its request's id not written yet.
const RESERVED: u64 = u64::MAX;
/// Set in a slot's id word while a [`Progress`](crate::Progress) handle
/// writes to it, so the slot is not released (and reused) under the write.
const BUSY: u64 = 1 << 62;

/// Where a request's entry lives: shard in the high half, slot in the low.
pub(crate) type Key = u64;

#[derive(Default)]
struct Slot {
    /// [`FREE`], [`RESERVED`], or the request's id (with [`BUSY`] while a
    /// progress handle writes).
    id: AtomicU64,
    started: AtomicU64,
    last: AtomicU64,
    units: AtomicU64,
}

struct Shard {
    /// Only the thread with this shard's index claims slots in it.
    exclusive: bool,
    /// Chunk 0, in place: one request at a time never looks further.
    first: [Slot; BASE],
    /// Chunks 1 and up (entry 0 unused).
    chunks: [OnceLock<Box<[Slot]>>; CHUNKS],
    /// Chunks made so far.
    len: AtomicUsize,
    /// The next slot to try (round robin).
    hint: AtomicUsize,
    /// Busy slots passed since the scan last wrapped around: more than half
    /// of the shard, and the next wrap adds a chunk (so a claim looks at two
    /// slots on average, whatever stays in flight).
    busy: AtomicUsize,
}

/// One request in flight, as read by [`Registry::each`].
pub(crate) struct Entry {
    pub(crate) id: u64,
    pub(crate) started: u64,
    pub(crate) last: u64,
    pub(crate) units: u64,
}

pub(crate) struct Registry {
    /// The last id given: requests started.
    next_id: AtomicU64,
    ok: AtomicU64,
    error: AtomicU64,
    cancelled: AtomicU64,
    stalled: AtomicU64,
    refused: AtomicU64,
    failures_in_a_row: AtomicU32,
    shards: [OnceLock<Box<Shard>>; EXCLUSIVE + 1],
}

const fn capacity(chunks: usize) -> usize {
    BASE * ((1 << chunks) - 1)
}

/// The chunk of slot `i`, and its place in the chunk.
const fn locate(i: usize) -> (usize, usize) {
    let k = (usize::BITS - 1 - (i / BASE + 1).leading_zeros()) as usize;
    (k, i - capacity(k))
}

impl Shard {
    fn new(exclusive: bool) -> Self {
        Shard {
            exclusive,
            first: Default::default(),
            chunks: std::array::from_fn(|_| OnceLock::new()),
            len: AtomicUsize::new(1),
            hint: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    #[inline]
    fn slot(&self, i: usize) -> &Slot {
        if i < BASE {
            return &self.first[i];
        }
        let (k, at) = locate(i);
        &self.chunks[k].get().expect("a claimed slot's chunk exists")[at]
    }

    /// Adds a chunk; returns the new capacity.
    #[cold]
    fn grow(&self) -> usize {
        let k = self.len.load(Ordering::Acquire);
        assert!(k < CHUNKS, "too many requests in flight on one thread");
        self.chunks[k].get_or_init(|| (0..BASE << k).map(|_| Slot::default()).collect());
        self.len.fetch_max(k + 1, Ordering::AcqRel);
        capacity(k + 1)
    }

    #[inline]
    fn reserve(&self, slot: &Slot) -> bool {
        if self.exclusive {
            // Only this thread claims here: a free slot stays free until it does.
            if slot.id.load(Ordering::Acquire) != FREE {
                return false;
            }
            slot.id.store(RESERVED, Ordering::Relaxed);
            true
        } else {
            slot.id
                .compare_exchange(FREE, RESERVED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        }
    }

    /// Claims a free slot (marked [`RESERVED`]); returns it and its index.
    #[inline]
    fn claim(&self) -> (&Slot, usize) {
        let mut cap = capacity(self.len.load(Ordering::Acquire));
        let mut i = self.hint.load(Ordering::Relaxed);
        let seen = self.busy.load(Ordering::Relaxed);
        let mut busy = seen;
        let mut scanned = 0;
        loop {
            if i >= cap || scanned > 2 * cap {
                i = 0;
                if busy * 2 > cap || scanned > 2 * cap {
                    i = cap;
                    cap = self.grow();
                }
                busy = 0;
            }
            let slot = self.slot(i);
            if self.reserve(slot) {
                self.hint.store(i + 1, Ordering::Relaxed);
                if busy != seen {
                    self.busy.store(busy, Ordering::Relaxed);
                }
                return (slot, i);
            }
            busy += 1;
            scanned += 1;
            i += 1;
        }
    }

    fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.first.iter().chain(
            self.chunks[1..]
                .iter()
                .filter_map(OnceLock::get)
                .flat_map(|chunk| chunk.iter()),
        )
    }
}

/// A small number per live thread, reused after the thread ends: the index
/// of its own shard in every registry.
mod thread_index {
    use super::*;

    static FREED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    static NEXT: AtomicUsize = AtomicUsize::new(0);

    struct Index(usize);

    impl Drop for Index {
        fn drop(&mut self) {
            FREED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self.0);
        }
    }

    thread_local! {
        static INDEX: Index = {
            let freed = FREED.lock().unwrap_or_else(PoisonError::into_inner).pop();
            Index(freed.unwrap_or_else(|| NEXT.fetch_add(1, Ordering::Relaxed)))
        };
    }

    /// This thread's index, unless the thread is being torn down.
    #[inline]
    pub(super) fn current() -> Option<usize> {
        INDEX.try_with(|i| i.0).ok()
    }
}

impl Registry {
    pub(crate) fn new() -> Self {
        Registry {
            next_id: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            error: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            failures_in_a_row: AtomicU32::new(0),
            shards: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    #[inline]
    fn shard(&self, index: usize) -> &Shard {
        self.shards[index].get_or_init(|| Box::new(Shard::new(index < EXCLUSIVE)))
    }

    #[inline]
    fn slot(&self, key: Key) -> &Slot {
        let shard = self.shards[(key >> 32) as usize]
            .get()
            .expect("a claimed slot's shard exists");
        shard.slot(key as u32 as usize)
    }

    /// Registers a request started at `now`: its slot and its id.
    #[inline]
    pub(crate) fn start(&self, now: u64) -> (Key, u64) {
        let index = thread_index::current()
            .filter(|&i| i < EXCLUSIVE)
            .unwrap_or(EXCLUSIVE);
        let (slot, i) = self.shard(index).claim();
        // Reserved before the id is taken: a reader that sees the count of
        // started requests finds the slot (see `each`).
        let id = self.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        // A reader that read the slot's previous id and then these fields
        // sees the reservation when it reads the id again.
        fence(Ordering::Release);
        slot.started.store(now, Ordering::Relaxed);
        slot.last.store(now, Ordering::Relaxed);
        slot.units.store(0, Ordering::Relaxed);
        slot.id.store(id, Ordering::Release);
        (((index as u64) << 32) | i as u64, id)
    }

    /// Records progress of request `id`; `owner` is the holder of its ticket
    /// (which cannot finish it meanwhile). Returns the units so far, or
    /// `None` if the request has ended.
    #[inline]
    pub(crate) fn progress(
        &self,
        key: Key,
        id: u64,
        now: u64,
        unit: bool,
        owner: bool,
    ) -> Option<u64> {
        let slot = self.slot(key);
        if owner {
            slot.last.store(now, Ordering::Relaxed);
            return Some(if unit {
                slot.units.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                slot.units.load(Ordering::Relaxed)
            });
        }
        // A handle may outlive the request: hold the slot while writing.
        loop {
            match slot
                .id
                .compare_exchange_weak(id, id | BUSY, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(current) if current == id | BUSY || current == id => std::hint::spin_loop(),
                Err(_) => return None,
            }
        }
        slot.last.fetch_max(now, Ordering::Relaxed);
        let units = slot.units.fetch_add(u64::from(unit), Ordering::Relaxed) + u64::from(unit);
        slot.id.store(id, Ordering::Release);
        Some(units)
    }

    /// The last progress of request `id`, if it is in flight.
    pub(crate) fn last(&self, key: Key, id: u64) -> Option<u64> {
        let slot = self.slot(key);
        let last = slot.last.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        (slot.id.load(Ordering::Relaxed) & !BUSY == id).then_some(last)
    }

    /// Ends request `id` with `outcome`; `guarded` when progress handles
    /// may write to its slot (the stall watchdog is on).
    #[inline]
    pub(crate) fn finish(&self, key: Key, id: u64, outcome: Outcome, guarded: bool) {
        let slot = self.slot(key);
        if guarded {
            while slot
                .id
                .compare_exchange_weak(id, FREE, Ordering::Release, Ordering::Relaxed)
                .is_err()
            {
                std::hint::spin_loop();
            }
        } else {
            slot.id.store(FREE, Ordering::Release);
        }
        let counter = match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Error => &self.error,
            Outcome::Cancelled => &self.cancelled,
            Outcome::Stalled => &self.stalled,
            Outcome::Refused => &self.refused,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        if outcome.is_failure() {
            let _ =
                self.failures_in_a_row
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_add(1))
                    });
        } else if outcome == Outcome::Ok && self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Relaxed);
        }
    }

    /// Requests that failed since the last success.
    pub(crate) fn failures_in_a_row(&self) -> u32 {
        self.failures_in_a_row.load(Ordering::Relaxed)
    }

    /// One pass over the counters: the finished ones first, so that every
    /// finish counted has its start counted.
    fn read(&self) -> [u64; 6] {
        let ok = self.ok.load(Ordering::SeqCst);
        let error = self.error.load(Ordering::SeqCst);
        let cancelled = self.cancelled.load(Ordering::SeqCst);
        let stalled = self.stalled.load(Ordering::SeqCst);
        let refused = self.refused.load(Ordering::SeqCst);
        let started = self.next_id.load(Ordering::SeqCst);
        [started, ok, error, cancelled, stalled, refused]
    }

    /// The counters at one instant: two passes that agree (each counter
    /// unchanged from its first read to its second, so all of them held
    /// these values together between the passes).
    pub(crate) fn counts(&self) -> Counts {
        let mut a = self.read();
        for _ in 0..64 {
            let b = self.read();
            if a == b {
                break;
            }
            a = b;
        }
        let [started, ok, error, cancelled, stalled, refused] = a;
        Counts::new(started, [ok, error, cancelled, stalled, refused])
    }

    /// Requests in flight, from one pass over the counters (exact unless a
    /// request starts or finishes during the read; never below zero).
    #[inline]
    #[cfg_attr(not(any(test, feature = "metrics")), allow(dead_code))]
    pub(crate) fn in_flight_now(&self) -> u64 {
        let [started, finished @ ..] = self.read();
        started - finished.iter().sum::<u64>()
    }

    /// Calls `f` with each request in flight. A slot being claimed is
    /// waited for if `wait` (so a request counted as started before the
    /// call is seen), else skipped (it has just started).
    pub(crate) fn each(&self, wait: bool, mut f: impl FnMut(Entry)) {
        for shard in self.shards.iter().filter_map(OnceLock::get) {
            for slot in shard.slots() {
                let mut spins = 0u32;
                let entry = loop {
                    let id = slot.id.load(Ordering::Acquire);
                    if id == FREE || (id == RESERVED && !wait) {
                        break None;
                    }
                    if id == RESERVED {
                        spins += 1;
                        if spins < 64 {
                            std::hint::spin_loop();
                        } else {
                            std::thread::yield_now();
                        }
                        continue;
                    }
                    let entry = Entry {
                        id: id & !BUSY,
                        started: slot.started.load(Ordering::Relaxed),
                        last: slot.last.load(Ordering::Relaxed),
                        units: slot.units.load(Ordering::Relaxed),
                    };
                    fence(Ordering::Acquire);
                    // Still the same request: the fields are its own.
                    break (slot.id.load(Ordering::Relaxed) & !BUSY == entry.id).then_some(entry);
                };
                if let Some(entry) = entry {
                    f(entry);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn slots_are_located_across_chunks() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(7), (0, 7));
        assert_eq!(locate(8), (1, 0));
        assert_eq!(locate(23), (1, 15));
        assert_eq!(locate(24), (2, 0));
        assert_eq!(locate(capacity(5) - 1), (4, (BASE << 4) - 1));
    }

    fn ids(registry: &Registry) -> Vec<u64> {
        let mut ids = Vec::new();
        registry.each(true, |e| ids.push(e.id));
        ids.sort_unstable();
        ids
    }

    #[test]
    fn many_in_flight_on_one_thread_each_get_a_slot_and_free_slots_are_reused() {
        let registry = Registry::new();
        let keys: Vec<(Key, u64)> = (0..1000).map(|n| registry.start(n)).collect();
        let distinct: HashSet<Key> = keys.iter().map(|k| k.0).collect();
        assert_eq!(distinct.len(), 1000);
        assert_eq!(ids(&registry), (1..=1000).collect::<Vec<_>>());
        for &(key, id) in keys.iter().step_by(2) {
            registry.finish(key, id, Outcome::Ok, false);
        }
        assert_eq!(registry.counts().in_flight(), 500);
        assert_eq!(registry.in_flight_now(), 500);
        let before = capacity(
            registry
                .shard(thread_index::current().unwrap())
                .len
                .load(Ordering::Relaxed),
        );
        // Starting and finishing one at a time reuses the freed slots.
        for n in 0..10_000 {
            let (key, id) = registry.start(n);
            registry.finish(key, id, Outcome::Ok, false);
        }
        let after = capacity(
            registry
                .shard(thread_index::current().unwrap())
                .len
                .load(Ordering::Relaxed),
        );
        assert_eq!(before, after);
        assert_eq!(ids(&registry).len(), 500);
        let counts = registry.counts();
        assert_eq!((counts.started(), counts.ok()), (11_000, 10_500));
    }

    #[test]
    fn a_late_progress_report_does_not_touch_the_slot_of_the_next_request() {
        let registry = Registry::new();
        let (key, id) = registry.start(5);
        assert_eq!(registry.progress(key, id, 7, true, false), Some(1));
        assert_eq!(registry.last(key, id), Some(7));
        registry.finish(key, id, Outcome::Ok, true);
        // The round robin comes back to the freed slot within a chunk.
        let next_id = (0..BASE)
            .find_map(|_| {
                let (next, next_id) = registry.start(9);
                if next == key {
                    return Some(next_id);
                }
                registry.finish(next, next_id, Outcome::Ok, true);
                None
            })
            .expect("the slot is reused");
        assert_eq!(registry.progress(key, id, 11, true, false), None);
        assert_eq!(registry.last(key, id), None);
        let mut seen = Vec::new();
        registry.each(true, |e| seen.push((e.id, e.started, e.last, e.units)));
        assert_eq!(seen, [(next_id, 9, 9, 0)]);
    }

    #[test]
    fn threads_starting_and_finishing_everywhere_keep_exact_counts() {
        let registry = Arc::new(Registry::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let registry = registry.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for n in 0..20_000u64 {
                        held.push(registry.start(n));
                        if n % 3 != 0 {
                            let (key, id) = held.swap_remove((n as usize * 7 + t) % held.len());
                            registry.finish(key, id, Outcome::Ok, false);
                        }
                        let counts = registry.counts();
                        assert!(counts.started() >= counts.finished());
                    }
                    held
                })
            })
            .collect();
        let mut held: Vec<(Key, u64)> = Vec::new();
        for t in threads {
            held.extend(t.join().unwrap());
        }
        let mut listed = ids(&registry);
        let mut expected: Vec<u64> = held.iter().map(|h| h.1).collect();
        expected.sort_unstable();
        assert_eq!(listed, expected);
        // Finished on another thread than the one that started them.
        let finisher = std::thread::spawn({
            let registry = registry.clone();
            move || {
                for (key, id) in held {
                    registry.finish(key, id, Outcome::Error, false);
                }
            }
        });
        finisher.join().unwrap();
        listed = ids(&registry);
        assert!(listed.is_empty());
        let counts = registry.counts();
        assert_eq!(counts.started(), 80_000);
        assert_eq!(counts.in_flight(), 0);
        assert_eq!(counts.ok() + counts.error(), 80_000);
        assert_eq!(registry.failures_in_a_row() as u64, counts.error());
    }

    #[test]
    fn the_shared_shard_claims_with_compare_and_swap() {
        let registry = Arc::new(Registry::new());
        let shard = registry.shard(EXCLUSIVE);
        assert!(!shard.exclusive);
        let claimed: Vec<Vec<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..500).map(|_| shard.claim().1).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all: HashSet<usize> = claimed.iter().flatten().copied().collect();
        assert_eq!(all.len(), 2000, "no slot claimed twice");
    }
}
