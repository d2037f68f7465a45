//! Per-source token bucket for knocks, so a flood of prefix packets cannot
//! starve the daemon of ring-buffer space or CPU.

use crate::maps::KnockBucket;

const NS_PER_SEC: u64 = 1_000_000_000;

/// A bucket holding `burst` tokens at `now`.
pub const fn full(burst: u32, now: u64) -> KnockBucket {
    KnockBucket {
        tokens: burst as u64 * NS_PER_SEC,
        last_ns: now,
    }
}

/// Takes one token from `bucket` at time `now`. Tokens are kept in
/// nano-tokens (one token = 10^9) so refills need no division per packet.
/// Returns the updated bucket and whether the knock may pass. A missing
/// bucket starts full.
pub fn take(bucket: Option<KnockBucket>, now: u64, rate_per_sec: u32, burst: u32) -> (KnockBucket, bool) {
    let cap = burst as u64 * NS_PER_SEC;
    let mut tokens = match bucket {
        None => cap,
        Some(b) => {
            let elapsed = now.saturating_sub(b.last_ns);
            let rate = rate_per_sec as u64;
            // Refilling for longer than it takes to fill the bucket cannot add
            // more than `cap`; checking first also keeps the product in range.
            let refill = if rate == 0 {
                0
            } else if elapsed >= cap / rate {
                cap
            } else {
                elapsed * rate
            };
            let sum = b.tokens + refill;
            if sum > cap { cap } else { sum }
        }
    };
    let allowed = tokens >= NS_PER_SEC;
    if allowed {
        tokens -= NS_PER_SEC;
    }
    (KnockBucket { tokens, last_ns: now }, allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let mut b = None;
        let mut passed = 0;
        for _ in 0..10 {
            let (nb, ok) = take(b, 1_000, 2, 3);
            b = Some(nb);
            passed += ok as u32;
        }
        assert_eq!(passed, 3, "a full bucket allows exactly `burst` knocks at once");
        let (nb, ok) = take(b, 1_000 + NS_PER_SEC / 2, 2, 3);
        assert!(ok, "half a second at 2/s refills one token");
        let (_, ok) = take(Some(nb), 1_000 + NS_PER_SEC / 2, 2, 3);
        assert!(!ok);
    }

    #[test]
    fn huge_gap_does_not_overflow() {
        let start = KnockBucket { tokens: 0, last_ns: 0 };
        let (b, ok) = take(Some(start), u64::MAX, u32::MAX, u32::MAX);
        assert!(ok);
        assert_eq!(b.tokens, u32::MAX as u64 * NS_PER_SEC - NS_PER_SEC);
    }

    #[test]
    fn zero_rate_never_refills() {
        let (b, _) = take(None, 0, 0, 1);
        let (_, ok) = take(Some(b), 10 * NS_PER_SEC, 0, 1);
        assert!(!ok);
    }
}
