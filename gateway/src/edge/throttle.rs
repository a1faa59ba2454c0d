//! Rate limits and temporary blocks at the edge.
//!
//! - Every call counts against its client address (before authentication, so floods of bad
//!   keys are throttled too) and, once authenticated, against its key's quota for its role and
//!   RPC class (GCRA, by `governor`).
//! - A key or address that keeps going over its limit (`violations` within `window`) is blocked
//!   for `block_for`; so is an address that keeps failing authentication (`auth_failures`
//!   within `window`), which stops key guessing early.
//!
//! Counters and blocks live in bounded caches with time-to-live (`moka`), so a flood from
//! many addresses cannot grow memory without bound.
//!
//! With a Redis URL, every gateway replica shares the limits, strikes and blocks: each decision
//! is one Lua script (GCRA on Redis's clock), atomic across replicas. If Redis cannot be reached,
//! each replica falls back to its own in-memory limits for a while, never to no limits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::policy::Class;
use super::store::Role;
use crate::error::Error;

/// Most subjects whose counters or blocks are remembered at once.
const MAX_TRACKED: u64 = 100_000;

/// Calls per second allowed per key for each role and class, and per client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rates {
    /// `(role, class)` → calls per second (bursts of the same size).
    pub per_key: HashMap<(Role, Class), NonZeroU32>,
    /// Calls per second from one client address, whatever the key.
    pub per_address: NonZeroU32,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero rate")
}

impl Default for Rates {
    fn default() -> Self {
        let mut per_key = HashMap::new();
        for (role, search, ingest, admin) in [
            (Role::Reader, 100, 1, 1),
            (Role::Writer, 100, 50, 1),
            (Role::Admin, 1000, 500, 50),
        ] {
            per_key.insert((role, Class::Search), nz(search));
            per_key.insert((role, Class::Ingest), nz(ingest));
            per_key.insert((role, Class::Admin), nz(admin));
        }
        Self {
            per_key,
            per_address: nz(2000),
        }
    }
}

impl Rates {
    /// Parses overrides of the defaults: `role.class=N` and `address=N`, comma-separated,
    /// e.g. `reader.search=20,writer.ingest=5,address=500` (calls per second).
    pub fn parse(text: &str) -> Result<Rates, String> {
        let mut rates = Rates::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: expected name=calls-per-second"))?;
            let value: u32 = value
                .trim()
                .parse()
                .map_err(|_| format!("{item:?}: the rate must be a whole number"))?;
            let value = NonZeroU32::new(value)
                .ok_or_else(|| format!("{item:?}: the rate must be at least 1"))?;
            let name = name.trim();
            if name == "address" {
                rates.per_address = value;
                continue;
            }
            let (role, class) = name
                .split_once('.')
                .ok_or_else(|| format!("{item:?}: expected role.class or address"))?;
            let role = Role::parse(role)
                .ok_or_else(|| format!("{item:?}: role must be reader, writer or admin"))?;
            let class = Class::ALL
                .into_iter()
                .find(|c| c.as_str() == class)
                .ok_or_else(|| format!("{item:?}: class must be search, ingest or admin"))?;
            rates.per_key.insert((role, class), value);
        }
        Ok(rates)
    }
}

/// How the edge limits and blocks.
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// Rates.
    pub rates: Rates,
    /// Limit violations within `window` that block a key or address.
    pub violations: u32,
    /// Authentication failures within `window` that block an address.
    pub auth_failures: u32,
    /// Window over which violations and failures are counted.
    pub window: Duration,
    /// How long a block lasts.
    pub block_for: Duration,
}

/// Who is limited or blocked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// An API key, by id.
    Key(String),
    /// A client address.
    Address(IpAddr),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Key(id) => write!(f, "API key {id}"),
            Subject::Address(ip) => write!(f, "address {ip}"),
        }
    }
}

/// What happened to a refused call, for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the limit.
    Limited,
    /// Over the limit once too often: now blocked.
    NewlyBlocked,
    /// Blocked already.
    Blocked,
}

/// Limits, strikes and blocks of one gateway process, shared through Redis when configured.
pub struct Throttle {
    config: ThrottleConfig,
    shared: Option<Shared>,
    per_key: HashMap<(Role, Class), DefaultKeyedRateLimiter<String>>,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
    strikes: moka::sync::Cache<Subject, Arc<AtomicU32>>,
    blocks: moka::sync::Cache<Subject, Instant>,
    clock: DefaultClock,
}

impl Throttle {
    /// Limits as `config` says, shared through `redis` if given.
    pub fn new(config: ThrottleConfig, redis: Option<smartdb_kit::redis::Redis>) -> Self {
        let per_key = config
            .rates
            .per_key
            .iter()
            .map(|(k, rate)| (*k, RateLimiter::keyed(Quota::per_second(*rate))))
            .collect();
        let per_address = RateLimiter::keyed(Quota::per_second(config.rates.per_address));
        let strikes = moka::sync::Cache::builder()
            .max_capacity(MAX_TRACKED)
            .time_to_live(config.window)
            .build();
        let blocks = moka::sync::Cache::builder()
            .max_capacity(MAX_TRACKED)
            .time_to_live(config.block_for)
            .build();
        Self {
            shared: redis.map(|redis| Shared {
                redis,
                script: smartdb_kit::redis::redis::Script::new(DECIDE),
                down_until: std::sync::Mutex::new(None),
            }),
            config,
            per_key,
            per_address,
            strikes,
            blocks,
            clock: DefaultClock::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// Time left on `subject`'s block, if it is blocked.
    pub fn blocked(&self, subject: &Subject) -> Option<Duration> {
        let until = self.blocks.get(subject)?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Refusal of a call from a blocked subject.
    pub fn block_error(subject: &Subject, left: Duration) -> Error {
        Error::Exhausted {
            message: format!(
                "{subject} is blocked for {}s after repeated violations or failed authentication",
                left.as_secs().max(1)
            ),
            retry_after: left,
        }
    }

    /// Counts a strike against `subject`; blocks it once there were `limit` within the window.
    /// True if this strike blocked it.
    fn strike(&self, subject: &Subject, limit: u32) -> bool {
        let count = self
            .strikes
            .get_with(subject.clone(), || Arc::new(AtomicU32::new(0)))
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if count >= limit.max(1) {
            self.strikes.invalidate(subject);
            self.blocks
                .insert(subject.clone(), Instant::now() + self.config.block_for);
            return true;
        }
        false
    }

    /// Admits one call from `ip` (before authentication).
    pub async fn check_address(&self, ip: IpAddr) -> Result<(), (Error, Refusal)> {
        let subject = Subject::Address(ip);
        let rate = self.config.rates.per_address;
        match self.decide(&subject, "address", Some(rate)).await {
            Some(decision) => self.shared_outcome(&subject, "calls from this address", decision),
            None => self.local_check_address(ip),
        }
    }

    fn local_check_address(&self, ip: IpAddr) -> Result<(), (Error, Refusal)> {
        let subject = Subject::Address(ip);
        if let Some(left) = self.blocked(&subject) {
            return Err((Self::block_error(&subject, left), Refusal::Blocked));
        }
        match self.per_address.check_key(&ip) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(self.over(&subject, "calls from this address", wait))
            }
        }
    }

    /// Admits one call of `class` by the key `key_id` with `role`.
    pub async fn check_key(
        &self,
        key_id: &str,
        role: Role,
        class: Class,
    ) -> Result<(), (Error, Refusal)> {
        let subject = Subject::Key(key_id.to_owned());
        let rate = self.config.rates.per_key.get(&(role, class)).copied();
        let limiter = format!("{}.{}", role.as_str(), class.as_str());
        match self.decide(&subject, &limiter, rate).await {
            Some(decision) => {
                let what = format!("{} calls for a {} key", class.as_str(), role.as_str());
                self.shared_outcome(&subject, &what, decision)
            }
            None => self.local_check_key(key_id, role, class),
        }
    }

    fn local_check_key(
        &self,
        key_id: &str,
        role: Role,
        class: Class,
    ) -> Result<(), (Error, Refusal)> {
        let subject = Subject::Key(key_id.to_owned());
        if let Some(left) = self.blocked(&subject) {
            return Err((Self::block_error(&subject, left), Refusal::Blocked));
        }
        let Some(limiter) = self.per_key.get(&(role, class)) else {
            return Ok(());
        };
        // The key's id as the limiter's key: ids are short and never secret.
        match limiter.check_key(&key_id.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let what = format!("{} calls for a {} key", class.as_str(), role.as_str());
                Err(self.over(&subject, &what, wait))
            }
        }
    }

    fn over(&self, subject: &Subject, what: &str, wait: Duration) -> (Error, Refusal) {
        if self.strike(subject, self.config.violations) {
            let left = self.config.block_for;
            return (Self::block_error(subject, left), Refusal::NewlyBlocked);
        }
        (Self::limit_error(what, wait), Refusal::Limited)
    }

    /// Refusal of a call over a limit, with the wait until it would pass.
    fn limit_error(what: &str, wait: Duration) -> Error {
        let wait = wait.max(Duration::from_millis(1));
        Error::Exhausted {
            message: format!(
                "rate limit of {what} exceeded; retry in {} ms",
                wait.as_millis()
            ),
            retry_after: wait,
        }
    }

    /// Records a failed authentication from `ip`; true if this blocked the address.
    pub async fn auth_failed(&self, ip: IpAddr) -> bool {
        let subject = Subject::Address(ip);
        match self.decide(&subject, "auth", None).await {
            Some(Decision::NewlyBlocked(_)) => true,
            Some(_) => false,
            None => self.strike(&subject, self.config.auth_failures),
        }
    }

    /// Asks Redis, if shared and reachable: with `rate`, a rate decision on `limiter`; without,
    /// a strike (a failed authentication). `None`: decide locally.
    async fn decide(
        &self,
        subject: &Subject,
        limiter: &str,
        rate: Option<NonZeroU32>,
    ) -> Option<Decision> {
        let shared = self.shared.as_ref()?;
        if shared.down() {
            return None;
        }
        let name = match subject {
            Subject::Key(id) => format!("key:{id}"),
            Subject::Address(ip) => format!("addr:{ip}"),
        };
        let (mode, interval_us, tau_us, strikes) = match rate {
            Some(rate) => {
                let interval = 1_000_000 / u64::from(rate.get());
                (
                    "check",
                    interval,
                    interval * (u64::from(rate.get()) - 1),
                    self.config.violations,
                )
            }
            None => ("strike", 0, 0, self.config.auth_failures),
        };
        let keys = [
            format!("{PREFIX}rate:{limiter}:{name}"),
            format!(
                "{PREFIX}strikes:{}:{name}",
                if rate.is_some() { "limit" } else { "auth" }
            ),
            format!("{PREFIX}block:{name}"),
        ];
        let args = [
            mode.to_owned(),
            interval_us.to_string(),
            tau_us.to_string(),
            strikes.max(1).to_string(),
            self.config.window.as_millis().max(1).to_string(),
            self.config.block_for.as_millis().max(1).to_string(),
        ];
        let script = shared.script.clone();
        let result = shared
            .redis
            .run(move |conn| {
                Box::pin(async move {
                    let mut invocation = script.prepare_invoke();
                    for key in &keys {
                        invocation.key(key);
                    }
                    for arg in &args {
                        invocation.arg(arg);
                    }
                    invocation.invoke_async::<(u8, u64)>(conn).await
                })
            })
            .await;
        match result {
            Ok((0, _)) => Some(Decision::Allowed),
            Ok((1, ms)) => Some(Decision::Limited(Duration::from_millis(ms))),
            Ok((2, ms)) => Some(Decision::NewlyBlocked(Duration::from_millis(ms))),
            Ok((_, ms)) => Some(Decision::Blocked(Duration::from_millis(ms))),
            Err(e) => {
                shared.redis.failed(&e);
                shared.mark_down();
                None
            }
        }
    }

    fn shared_outcome(
        &self,
        subject: &Subject,
        what: &str,
        decision: Decision,
    ) -> Result<(), (Error, Refusal)> {
        match decision {
            Decision::Allowed => Ok(()),
            Decision::Limited(wait) => Err((Self::limit_error(what, wait), Refusal::Limited)),
            Decision::NewlyBlocked(left) => {
                Err((Self::block_error(subject, left), Refusal::NewlyBlocked))
            }
            Decision::Blocked(left) => Err((Self::block_error(subject, left), Refusal::Blocked)),
        }
    }

    /// Forgets limiter state of idle subjects (call now and then).
    pub fn tidy(&self) {
        for limiter in self.per_key.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        self.per_address.retain_recent();
        self.per_address.shrink_to_fit();
    }
}

/// Prefix of every Redis key the gateway's limits use.
const PREFIX: &str = "smartdb:edge:";
/// How long a replica decides alone after Redis failed, before asking it again.
const REDIS_RETRY: Duration = Duration::from_secs(1);

/// One decision, atomically, for every replica. KEYS: rate state (GCRA "theoretical arrival
/// time", µs), strike counter, block flag. ARGV: mode (`check` or `strike`), emission interval
/// µs, burst tolerance µs, strikes that block, strike window ms, block ms. Returns
/// `{0, 0}` allowed, `{1, wait ms}` limited, `{2, block ms}` newly blocked, `{3, left ms}`
/// blocked.
const DECIDE: &str = r"
local left = redis.call('PTTL', KEYS[3])
if left > 0 then return {3, left} end
local function strike()
  local n = redis.call('INCR', KEYS[2])
  if n == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
  if n >= tonumber(ARGV[4]) then
    redis.call('DEL', KEYS[2])
    redis.call('SET', KEYS[3], '1', 'PX', ARGV[6])
    return true
  end
  return false
end
if ARGV[1] == 'strike' then
  if strike() then return {2, tonumber(ARGV[6])} end
  return {0, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - now > tau then
  if strike() then return {2, tonumber(ARGV[6])} end
  return {1, math.max(1, math.ceil((tat - tau - now) / 1000))}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return {0, 0}
";

/// What the shared script decided.
enum Decision {
    Allowed,
    Limited(Duration),
    NewlyBlocked(Duration),
    Blocked(Duration),
}

/// The Redis side of shared limits.
struct Shared {
    redis: smartdb_kit::redis::Redis,
    script: smartdb_kit::redis::redis::Script,
    down_until: std::sync::Mutex<Option<Instant>>,
}

impl Shared {
    fn down(&self) -> bool {
        let guard = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        guard.is_some_and(|until| Instant::now() < until)
    }

    fn mark_down(&self) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + REDIS_RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(
        rates: &str,
        violations: u32,
        auth_failures: u32,
        block_for: Duration,
    ) -> ThrottleConfig {
        ThrottleConfig {
            rates: Rates::parse(rates).unwrap(),
            violations,
            auth_failures,
            window: Duration::from_secs(60),
            block_for,
        }
    }

    fn throttle(rates: &str, violations: u32, auth_failures: u32, block_for: Duration) -> Throttle {
        Throttle::new(config(rates, violations, auth_failures, block_for), None)
    }

    fn redis(url: &str) -> smartdb_kit::redis::Redis {
        smartdb_kit::redis::Redis::new(
            url,
            Duration::from_millis(500),
            "gateway limits",
            "test_errors_total",
        )
        .unwrap()
    }

    #[test]
    fn rates_parse_with_defaults_and_name_bad_items() {
        let rates = Rates::parse("reader.search=7, address=9").unwrap();
        assert_eq!(rates.per_key[&(Role::Reader, Class::Search)].get(), 7);
        assert_eq!(rates.per_address.get(), 9);
        assert_eq!(
            rates.per_key[&(Role::Writer, Class::Ingest)],
            Rates::default().per_key[&(Role::Writer, Class::Ingest)]
        );
        assert_eq!(Rates::parse("").unwrap(), Rates::default());
        for bad in [
            "reader.search",
            "reader.search=0",
            "root.search=1",
            "reader.x=1",
            "x=1",
            "reader.search=-1",
        ] {
            let err = Rates::parse(bad).unwrap_err();
            assert!(err.contains(bad.split('=').next().unwrap()), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_key_over_its_rate_is_limited_with_a_retry_hint_then_blocked() {
        let t = throttle("reader.search=5", 3, 10, Duration::from_secs(30));
        for _ in 0..5 {
            t.check_key("k1", Role::Reader, Class::Search)
                .await
                .unwrap();
        }
        // Another key and another class have their own budgets.
        t.check_key("k2", Role::Reader, Class::Search)
            .await
            .unwrap();
        t.check_key("k1", Role::Reader, Class::Ingest)
            .await
            .unwrap();
        for _ in 0..2 {
            let (err, refusal) = t
                .check_key("k1", Role::Reader, Class::Search)
                .await
                .unwrap_err();
            assert_eq!(refusal, Refusal::Limited);
            let Error::Exhausted {
                retry_after,
                message,
            } = err
            else {
                panic!()
            };
            assert!(
                retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200),
                "{retry_after:?}"
            );
            assert!(
                message.contains("search calls for a reader key"),
                "{message}"
            );
        }
        let (err, refusal) = t
            .check_key("k1", Role::Reader, Class::Search)
            .await
            .unwrap_err();
        assert_eq!(refusal, Refusal::NewlyBlocked);
        let Error::Exhausted { retry_after, .. } = err else {
            panic!()
        };
        assert_eq!(retry_after, Duration::from_secs(30));
        // Blocked for every class now, while other keys are not.
        let (_, refusal) = t
            .check_key("k1", Role::Reader, Class::Ingest)
            .await
            .unwrap_err();
        assert_eq!(refusal, Refusal::Blocked);
        t.check_key("k2", Role::Reader, Class::Search)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn failed_authentication_blocks_the_address_until_the_block_ends() {
        let t = throttle("", 100, 3, Duration::from_millis(300));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(!t.auth_failed(ip).await);
        assert!(!t.auth_failed(ip).await);
        assert!(t.auth_failed(ip).await);
        let (_, refusal) = t.check_address(ip).await.unwrap_err();
        assert_eq!(refusal, Refusal::Blocked);
        t.check_address(other).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        t.check_address(ip).await.unwrap();
    }

    #[tokio::test]
    async fn addresses_are_limited() {
        let t = throttle("address=3", 100, 100, Duration::from_secs(1));
        let ip: IpAddr = "::1".parse().unwrap();
        for _ in 0..3 {
            t.check_address(ip).await.unwrap();
        }
        assert_eq!(t.check_address(ip).await.unwrap_err().1, Refusal::Limited);
        t.tidy();
    }

    /// Two throttles over the real Redis (two gateway replicas) share one budget per key, and
    /// a block set through one holds at the other.
    #[tokio::test]
    async fn replicas_share_limits_and_blocks_through_redis() {
        let url = "redis://127.0.0.1:6379/";
        let a = Throttle::new(
            config("reader.search=10", 5, 3, Duration::from_secs(30)),
            Some(redis(url)),
        );
        let b = Throttle::new(
            config("reader.search=10", 5, 3, Duration::from_secs(30)),
            Some(redis(url)),
        );
        let key = format!("test-{}", uuid::Uuid::new_v4().simple());
        let mut admitted = 0;
        let mut refusals = Vec::new();
        for i in 0..20 {
            let t = if i % 2 == 0 { &a } else { &b };
            match t.check_key(&key, Role::Reader, Class::Search).await {
                Ok(()) => admitted += 1,
                Err((_, refusal)) => refusals.push(refusal),
            }
        }
        // One burst of 10 for both (a replica alone would have admitted 10 of its 10 calls).
        assert!((10..=11).contains(&admitted), "{admitted} admitted");
        assert_eq!(refusals[..4], [Refusal::Limited; 4]);
        assert_eq!(refusals[4], Refusal::NewlyBlocked);
        assert!(
            refusals[5..].iter().all(|r| *r == Refusal::Blocked),
            "{refusals:?}"
        );
        assert!(a.shared.as_ref().unwrap().redis.errors() == 0);

        let ip: IpAddr = format!(
            "10.{}.{}.{}",
            rand::random::<u8>(),
            rand::random::<u8>(),
            rand::random::<u8>()
        )
        .parse()
        .unwrap();
        assert!(!a.auth_failed(ip).await);
        assert!(!b.auth_failed(ip).await);
        assert!(
            a.auth_failed(ip).await,
            "the third failure, wherever it happened, blocks"
        );
        let (err, refusal) = b.check_address(ip).await.unwrap_err();
        assert_eq!(refusal, Refusal::Blocked);
        let Error::Exhausted { retry_after, .. } = err else {
            panic!()
        };
        assert!(retry_after > Duration::from_secs(25), "{retry_after:?}");
    }

    /// With Redis unreachable, a replica limits on its own: never no limits.
    #[tokio::test]
    async fn without_redis_each_replica_still_limits() {
        let t = Throttle::new(
            config("reader.search=3", 100, 100, Duration::from_secs(1)),
            Some(redis("redis://127.0.0.1:1/")),
        );
        for _ in 0..3 {
            t.check_key("k", Role::Reader, Class::Search).await.unwrap();
        }
        let (_, refusal) = t
            .check_key("k", Role::Reader, Class::Search)
            .await
            .unwrap_err();
        assert_eq!(refusal, Refusal::Limited);
        assert!(t.shared.as_ref().unwrap().redis.errors() >= 1);
    }
}
