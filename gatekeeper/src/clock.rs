//! The two clocks Gatekeeper keeps time by.
//!
//! - CLOCK_MONOTONIC_COARSE nanoseconds ([`now_ns`]), the clock the XDP
//!   program reads with `bpf_ktime_get_coarse_ns`, so expiries written from
//!   userspace mean the same thing in the kernel. It advances once per
//!   kernel tick; expiries and rate limits need no finer time, and the
//!   program reads it in a fraction of what the precise clock costs.
//! - CLOCK_MONOTONIC nanoseconds ([`precise_ns`]), which the XDP program
//!   stamps the events it hands the daemon with (`bpf_ktime_get_ns`), to
//!   time a knock from the wire to its open gate.
//! - Unix seconds ([`unix_now`]), for what outlives a boot: knock
//!   timestamps, enrollment expiries, the audit log.
//!
//! The two monotonic clocks are the gate's, so only the gateway build
//! (Linux) has them; a device needs Unix seconds alone.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds on CLOCK_MONOTONIC_COARSE.
#[cfg(feature = "gateway")]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC_COARSE exists on
    // every Linux since 2.6.32.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Nanoseconds on CLOCK_MONOTONIC.
#[cfg(feature = "gateway")]
pub fn precise_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, for reports several hosts compare.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `1970-01-01T00:00:00Z` for unix seconds (proleptic Gregorian, UTC).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date, after Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix seconds at 00:00 UTC of a date (proleptic Gregorian); `None` for
/// a date that does not exist or comes before 1970.
pub fn unix_day(year: u32, month: u32, day: u32) -> Option<u64> {
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if year < 1970 || day == 0 || day > days_in_month {
        return None;
    }
    // Civil date to days, after Howard Hinnant's algorithm.
    let (y, m, d) = (
        i64::from(year) - i64::from(month <= 2),
        i64::from(month),
        i64::from(day),
    );
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days).ok().map(|d| d * 86_400)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }

    #[test]
    fn dates_to_unix_days() {
        assert_eq!(super::unix_day(1970, 1, 1), Some(0));
        assert_eq!(super::unix_day(2026, 1, 1), Some(1_767_225_600));
        assert_eq!(super::unix_day(2000, 2, 29), Some(951_782_400));
        assert_eq!(super::unix_day(2001, 2, 29), None);
        assert_eq!(super::unix_day(2026, 13, 1), None);
    }
}
