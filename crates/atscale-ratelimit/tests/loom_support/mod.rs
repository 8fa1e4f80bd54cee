//! Shared by the loom models (`loom_*.rs`).

/// `loom::model`, counting the interleavings it explores: prints the count
/// and checks that there was more than one (the threads did race).
pub(crate) fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    loom::model(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    let runs = runs.load(Ordering::Relaxed);
    println!("{name}: {runs} interleavings");
    assert!(runs > 1, "{name}: nothing raced");
}
