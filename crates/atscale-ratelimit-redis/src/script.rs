//! The two server-side scripts: GCRA over several buckets in one step, and
//! the refund of a reservation whose waiter left.
//!
//! Bucket state is one string per bucket: its theoretical arrival time
//! (TAT) in microseconds of Redis server time (`TIME`), the same state and
//! arithmetic as the in-memory GCRA of atscale-ratelimit (see its `gcra.rs`).
//! Every write sets `PX` to the time until the bucket is full again, so an
//! idle bucket's key vanishes on its own (a missing key reads as a full
//! bucket). Microseconds keep every value below 2⁵³, exact in Lua's doubles.

use std::sync::LazyLock;

use redis::Script;

/// KEYS: the buckets. ARGV[1]: the longest wait allowed in µs (-1: no
/// bound); then for each bucket, its increment (cost × interval) and its
/// capacity (burst × interval) in µs.
///
/// Reply when admitted: `{1, wait, now, old₁, new₁, old₂, new₂, …}` (each
/// bucket's TAT before and after); when the wait would exceed the bound,
/// nothing is written and the reply is `{0, wait, now, tat₁, tat₂, …}`.
const ACQUIRE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[1])
local n = #KEYS
local old = {}
local at = now
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat == nil then
    return redis.error_reply('atscale: key ' .. KEYS[i] .. ' does not hold a rate-limit bucket')
  end
  old[i] = tat
  local a = math.max(tat, now) + tonumber(ARGV[2 * i]) - tonumber(ARGV[2 * i + 1])
  if a > at then at = a end
end
local wait = at - now
if max_wait >= 0 and wait > max_wait then
  local reply = {0, wait, now}
  for i = 1, n do reply[3 + i] = old[i] end
  return reply
end
local reply = {1, wait, now}
for i = 1, n do
  local new = math.max(old[i], at) + tonumber(ARGV[2 * i])
  redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.floor((new - now) / 1000) + 1)
  reply[2 + 2 * i] = old[i]
  reply[3 + 2 * i] = new
end
return reply
";

/// KEYS: for each bucket, the bucket and its list of cancelled
/// reservations (a hash from a reservation's new TAT to its old one).
/// ARGV: for each bucket, the reservation's old and new TAT.
///
/// The rule of the in-memory store: where the bucket's TAT is still the
/// reservation's `new`, no one reserved after it; the TAT goes back to
/// `old`, and on through every cancelled reservation that ends there. Where
/// someone reserved after it, it is remembered in the list (if its slot is
/// still ahead), to be given back when it becomes the tail.
///
/// Reply: `{now, tat₁, tat₂, …}`, each bucket's TAT afterwards.
const REFUND_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local reply = {now}
for i = 1, #KEYS / 2 do
  local key, list = KEYS[2 * i - 1], KEYS[2 * i]
  local old, new = ARGV[2 * i - 1], ARGV[2 * i]
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat == tonumber(new) then
    local back = old
    while true do
      local before = redis.call('HGET', list, back)
      if not before then break end
      redis.call('HDEL', list, back)
      back = before
    end
    local value = tonumber(back)
    if value <= now then
      redis.call('DEL', key)
    else
      redis.call('SET', key, back, 'PX', math.floor((value - now) / 1000) + 1)
    end
    reply[1 + i] = value
  else
    if tonumber(new) > now then
      redis.call('HSET', list, new, old)
      local ttl = math.floor((tonumber(new) - now) / 1000) + 1
      if redis.call('PTTL', list) < ttl then redis.call('PEXPIRE', list, ttl) end
    end
    reply[1 + i] = tat or 0
  end
end
return reply
";

/// A script, with its source for nodes that do not know it yet
/// (`NOSCRIPT` on a cluster node: it is sent whole with `EVAL`).
pub(crate) struct Lua {
    pub(crate) code: &'static str,
    pub(crate) script: Script,
}

impl Lua {
    fn new(code: &'static str) -> Lua {
        Lua {
            code,
            script: Script::new(code),
        }
    }
}

pub(crate) static ACQUIRE: LazyLock<Lua> = LazyLock::new(|| Lua::new(ACQUIRE_LUA));
pub(crate) static REFUND: LazyLock<Lua> = LazyLock::new(|| Lua::new(REFUND_LUA));

/// The key of a bucket's list of cancelled reservations: the bucket's key
/// behind a fixed head, so that no bucket key (whose head is the store's
/// prefix, and whose tail a client may choose through a keyed limit) can
/// ever name it.
///
/// On a cluster the list must live in the bucket's slot: when the bucket's
/// key has a hash tag, the list's key has the same tag (its first `{..}`
/// is the bucket's, since the head has no braces).
pub(crate) fn cancelled_key(bucket: &str) -> String {
    format!("cancelled:{bucket}")
}
