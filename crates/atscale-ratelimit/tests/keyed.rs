//! Keyed limits: eviction only of fresh keys, and the memory bound.

use std::time::Duration;

use atscale_core::{BoxError, Kind};
use atscale_ratelimit::{Clock, KeyedLimiter, Limit, RateLimitLayer, key_fn};
use tower::{Layer, Service, service_fn};

#[tokio::test(start_paused = true)]
async fn a_flood_of_keys_stays_within_the_bound() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let table = KeyedLimiter::builder(Limit::per_second(1)?)
        .max_keys(100)
        .clock(clock)
        .build()?;
    let mut refused = 0;
    for key in 0..10_000u32 {
        match table.get(key) {
            Ok(bucket) => bucket.try_acquire(1)?, // every admitted key is busy now
            Err(_) => refused += 1,
        }
        assert!(table.len() <= 100);
    }
    assert_eq!(
        refused,
        10_000 - 100,
        "a full table of busy keys takes no new key"
    );

    // Once they have refilled they are as good as new and make room.
    tokio::time::advance(Duration::from_secs(1)).await;
    for key in 10_000..10_100u32 {
        table.get(key)?.try_acquire(1)?;
        assert!(table.len() <= 100);
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_bound_holds_across_shards() -> Result<(), BoxError> {
    let table = KeyedLimiter::builder(Limit::per_minute(1)?)
        .max_keys(4096)
        .clock(Clock::tokio())
        .build()?;
    let mut admitted = 0;
    for key in 0..20_000u64 {
        if let Ok(bucket) = table.get(key) {
            bucket.try_acquire(1)?;
            admitted += 1;
        }
    }
    assert_eq!(table.len(), admitted);
    assert!(admitted <= 4096, "{admitted}");
    assert!(admitted > 4096 * 9 / 10, "shards fill evenly: {admitted}");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn eviction_never_hands_a_busy_key_a_fresh_bucket() -> Result<(), BoxError> {
    let table = KeyedLimiter::builder(Limit::per_minute(2)?)
        .max_keys(10)
        .clock(Clock::tokio())
        .build()?;
    let busy = table.get("busy".to_owned())?;
    busy.try_acquire(2)?;
    drop(busy);
    // Fill the table with keys that were looked up but never used (fresh),
    // and one in the middle of a wait (held by its waiter).
    let waiting = table.get("waiting".to_owned())?;
    waiting.try_acquire(2)?;
    let waiter = tokio::spawn({
        let waiting = waiting.clone();
        async move { waiting.acquire(1).await }
    });
    drop(waiting);
    tokio::task::yield_now().await;
    for i in 0..8 {
        table.get(format!("idle-{i}"))?;
    }
    assert_eq!(table.len(), 10);
    // A new key sweeps the table: only the eight idle keys may go.
    for i in 0..8 {
        table.get(format!("new-{i}"))?.try_acquire(1)?;
    }
    assert_eq!(table.len(), 10);
    assert!(
        table.get("busy".to_owned())?.try_acquire(1).is_err(),
        "still limited"
    );
    // 30 s later the busy key has one unit back, and the waiter got in.
    tokio::time::advance(Duration::from_secs(30)).await;
    waiter.await??;
    assert!(table.get("busy".to_owned())?.try_acquire(1).is_ok());
    assert!(table.get("busy".to_owned())?.try_acquire(1).is_err());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn evict_idle_keeps_only_busy_keys() -> Result<(), BoxError> {
    let table = KeyedLimiter::builder(Limit::per_second(1)?)
        .clock(Clock::tokio())
        .build()?;
    for key in 0..50u8 {
        let b = table.get(key)?;
        if key % 5 == 0 {
            b.try_acquire(1)?;
        }
    }
    assert_eq!(table.evict_idle(), 40);
    assert_eq!(table.len(), 10);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(table.evict_idle(), 10);
    assert!(table.is_empty());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_full_table_is_overloaded_through_the_layer_and_quotas_apply() -> Result<(), BoxError> {
    let table = KeyedLimiter::builder(Limit::per_minute(1)?)
        .quota(|tenant: &String| {
            let n = if tenant == "paying" { 3 } else { 1 };
            Limit::per_minute(n).expect("valid")
        })
        .max_keys(2)
        .clock(Clock::tokio())
        .build()?;
    let tenant = key_fn(|r: &http::Request<()>| {
        r.headers()
            .get("tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let mut svc = RateLimitLayer::builder()
        .keyed(tenant, table)
        .reject()
        .build()?
        .layer(service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>(())
        }));
    let from = |t: &str| {
        http::Request::builder()
            .header("tenant", t)
            .body(())
            .unwrap()
    };
    for _ in 0..3 {
        svc.call(from("paying")).await?;
    }
    let err = svc.call(from("paying")).await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::RateLimited);
    svc.call(from("free")).await?;
    let err = svc.call(from("free")).await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::RateLimited);
    let err = svc.call(from("third")).await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::Overloaded);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_full_shard_is_swept_once_an_eighth_of_it_has_refilled() -> Result<(), BoxError> {
    let table = KeyedLimiter::builder(Limit::per_minute(1)?)
        .max_keys(16) // one shard; an eighth of it is two keys
        .clock(Clock::tokio())
        .build()?;
    // Sixteen busy keys, taken at 0 s, 1 s, … 15 s: fresh again at 60 s, 61 s, …
    for key in 0..16u32 {
        table.get(key)?.try_acquire(1)?;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // Full of busy keys: a new key is refused, and the table holds off new
    // keys until two of the old ones will have refilled (61 s).
    assert!(table.get(100).is_err());
    tokio::time::advance(Duration::from_secs(60 - 16)).await; // 60 s: key 0 is fresh
    assert!(table.get(100).is_err(), "held off until 61 s");
    tokio::time::advance(Duration::from_secs(1)).await; // 61 s: keys 0 and 1
    table.get(100)?.try_acquire(1)?;
    table.get(101)?.try_acquire(1)?;
    assert!(table.get(102).is_err(), "key 2 refills at 62 s");
    assert_eq!(table.len(), 16);
    // The keys that stayed kept their state: key 2 is still limited.
    assert!(table.get(2)?.try_acquire(1).is_err());
    Ok(())
}
