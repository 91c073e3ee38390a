//! Parsing and formatting of sizes and durations, as typed on the command line and in workload
//! specs.
//!
//! Sizes always use binary units: `K`, `M`, `G` and `T` are 2^10, 2^20, 2^30 and 2^40 bytes, with or
//! without a trailing `B` or `iB`, in any case (`512M`, `512MB`, `512MiB`, `512m` are all 512 MiB).
//! A bare number (or a `B` suffix) is bytes. A fraction is allowed when the result is a whole number
//! of bytes (`1.5G`).
//!
//! Durations take `ns`, `us` (or `µs`), `ms`, `s`, `m` (minutes) and `h`; a bare number is seconds.
//! Fractions are allowed (`1.5s`) down to whole nanoseconds.

use std::time::Duration;
use thiserror::Error;

/// Why a size or a duration could not be parsed. Every message quotes the input.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UnitError {
    #[error("empty size (expected a number of bytes such as 4096, 64K, 512M or 2G)")]
    EmptySize,
    #[error("bad size \"{0}\": sizes cannot be negative")]
    NegativeSize(String),
    #[error("bad size \"{0}\": expected a number followed by an optional unit K, M, G or T")]
    BadSizeNumber(String),
    #[error(
        "bad size \"{input}\": unknown unit \"{unit}\" (expected K, M, G or T, optionally followed by B or iB)"
    )]
    BadSizeUnit { input: String, unit: String },
    #[error("bad size \"{0}\": not a whole number of bytes")]
    FractionalBytes(String),
    #[error("bad size \"{0}\": too large (at most 16 EiB - 1 byte)")]
    SizeOverflow(String),
    #[error("empty duration (expected a time such as 2s, 500ms, 100us or 1m)")]
    EmptyDuration,
    #[error("bad duration \"{0}\": durations cannot be negative")]
    NegativeDuration(String),
    #[error(
        "bad duration \"{0}\": expected a number followed by an optional unit ns, us, ms, s, m or h"
    )]
    BadDurationNumber(String),
    #[error(
        "bad duration \"{input}\": unknown unit \"{unit}\" (expected ns, us, ms, s, m or h; a bare number is seconds)"
    )]
    BadDurationUnit { input: String, unit: String },
    #[error("bad duration \"{0}\": finer than a nanosecond")]
    FractionalNanos(String),
    #[error("bad duration \"{0}\": too long")]
    DurationOverflow(String),
}

/// 1 KiB.
/// Guest and host page size (4 KiB). The guest's header (`guest/abi.h`) says the same, checked at
/// compile time in `contract::abi`.
pub const PAGE_SIZE: u64 = 4096;

pub const KIB: u64 = 1 << 10;
/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// 1 TiB.
pub const TIB: u64 = 1 << 40;

/// Bytes to MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Pages to MiB.
pub fn pages_mib(pages: u64) -> f64 {
    mib(pages * PAGE_SIZE)
}

/// Longest fraction accepted (digits after the point); more could not change a result that must
/// be whole bytes or nanoseconds, and bounding it keeps the arithmetic in `u128`.
const MAX_FRACTION_DIGITS: usize = 18;

/// A non-negative decimal number split at the point: `int` and `frac / 10^frac_digits`.
struct Decimal {
    int: u128,
    frac: u128,
    frac_digits: u32,
}

impl Decimal {
    /// `self * unit` exactly, or `None` when the result is not whole or overflows `u128`.
    fn times(&self, unit: u128) -> Result<u128, Inexact> {
        let whole = self.int.checked_mul(unit).ok_or(Inexact::Overflow)?;
        let scale = 10u128.pow(self.frac_digits);
        let frac_num = self.frac.checked_mul(unit).ok_or(Inexact::Overflow)?;
        if !frac_num.is_multiple_of(scale) {
            return Err(Inexact::Fraction);
        }
        whole.checked_add(frac_num / scale).ok_or(Inexact::Overflow)
    }
}

enum Inexact {
    Overflow,
    Fraction,
}

/// Splits `s` (already trimmed, non-empty) into a decimal number and the unit text after it.
/// `None` if it does not start with a well-formed number.
fn split_number(s: &str) -> Option<(Decimal, &str)> {
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, rest) = s.split_at(num_end);
    let (int_text, frac_text) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    if int_text.is_empty() && frac_text.is_none_or(str::is_empty) {
        return None;
    }
    let frac_text = frac_text.unwrap_or("");
    if frac_text.contains('.') || frac_text.len() > MAX_FRACTION_DIGITS {
        return None;
    }
    if num.ends_with('.') {
        return None;
    }
    let int = if int_text.is_empty() {
        0
    } else {
        // More digits than a u128 holds is overflow, reported by the caller as too large.
        int_text.parse::<u128>().unwrap_or(u128::MAX)
    };
    let frac = if frac_text.is_empty() {
        0
    } else {
        frac_text.parse::<u128>().ok()?
    };
    Some((
        Decimal {
            int,
            frac,
            frac_digits: frac_text.len() as u32,
        },
        rest.trim_start(),
    ))
}

/// Parses a size in bytes: `4096`, `64K`, `512M`, `2G`, `1T`, `512MiB`, `512MB`, `512m`, `1.5G`.
/// Units are always binary. Zero is accepted; rejecting it is the caller's business.
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(UnitError::EmptySize);
    }
    if s.starts_with('-') {
        return Err(UnitError::NegativeSize(s.to_string()));
    }
    let s_plus = s.strip_prefix('+').unwrap_or(s);
    let (num, unit) = split_number(s_plus).ok_or_else(|| UnitError::BadSizeNumber(s.into()))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => TIB,
        _ => {
            return Err(UnitError::BadSizeUnit {
                input: s.into(),
                unit: unit.into(),
            });
        }
    };
    if num.int == u128::MAX {
        return Err(UnitError::SizeOverflow(s.into()));
    }
    let bytes = num.times(mult.into()).map_err(|e| match e {
        Inexact::Overflow => UnitError::SizeOverflow(s.into()),
        Inexact::Fraction => UnitError::FractionalBytes(s.into()),
    })?;
    u64::try_from(bytes).map_err(|_| UnitError::SizeOverflow(s.into()))
}

/// Parses a duration: `2s`, `500ms`, `100us`, `1m`, `1.5s`, `250ns`, `1h`; a bare number is seconds.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(UnitError::EmptyDuration);
    }
    if s.starts_with('-') {
        return Err(UnitError::NegativeDuration(s.to_string()));
    }
    let s_plus = s.strip_prefix('+').unwrap_or(s);
    let (num, unit) = split_number(s_plus).ok_or_else(|| UnitError::BadDurationNumber(s.into()))?;
    let unit_ns: u64 = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => {
            return Err(UnitError::BadDurationUnit {
                input: s.into(),
                unit: unit.into(),
            });
        }
    };
    if num.int == u128::MAX {
        return Err(UnitError::DurationOverflow(s.into()));
    }
    let ns = num.times(unit_ns.into()).map_err(|e| match e {
        Inexact::Overflow => UnitError::DurationOverflow(s.into()),
        Inexact::Fraction => UnitError::FractionalNanos(s.into()),
    })?;
    let secs =
        u64::try_from(ns / 1_000_000_000).map_err(|_| UnitError::DurationOverflow(s.into()))?;
    Ok(Duration::new(secs, (ns % 1_000_000_000) as u32))
}

/// `bytes` in MiB with one decimal: `"256.0 MiB"`; a size that would print as `"0.0 MiB"`
/// (under 0.05 MiB, not zero) is given exactly, in KiB or bytes: `"4 KiB"`, `"100 bytes"`.
pub fn fmt_mib(bytes: u64) -> String {
    if bytes > 0 && bytes < MIB / 20 {
        return if bytes.is_multiple_of(KIB) {
            format!("{} KiB", bytes / KIB)
        } else {
            format!("{bytes} bytes")
        };
    }
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// `bytes` in the largest binary unit that keeps the number at least 1: `"512 B"`, `"4.0 KiB"`,
/// `"256.0 MiB"`, `"1.50 GiB"`, `"2.00 TiB"`.
pub fn fmt_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes < KIB {
        format!("{bytes} B")
    } else if bytes < MIB {
        format!("{:.1} KiB", b / KIB as f64)
    } else if bytes < GIB {
        format!("{:.1} MiB", b / MIB as f64)
    } else if bytes < TIB {
        format!("{:.2} GiB", b / GIB as f64)
    } else {
        format!("{:.2} TiB", b / TIB as f64)
    }
}

/// `bytes` exactly, in the largest unit that divides it, in the form [`parse_size`] reads back:
/// `"64M"`, `"1536K"`, `"2G"`, `"4095"`.
pub fn fmt_size_spec(bytes: u64) -> String {
    for (mult, suffix) in [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")] {
        if bytes != 0 && bytes.is_multiple_of(mult) {
            return format!("{}{suffix}", bytes / mult);
        }
    }
    bytes.to_string()
}

/// A duration exactly, in the form [`parse_duration`] reads back: `"2s"`, `"1.5s"`, `"500ms"`,
/// `"100us"`, `"250ns"`, `"0s"`.
pub fn fmt_duration_spec(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if ns >= 1_000_000_000 && ns.is_multiple_of(1_000_000) {
        let secs = d.as_secs();
        let ms = d.subsec_millis();
        if ms == 0 {
            return format!("{secs}s");
        }
        let frac = format!("{ms:03}");
        return format!("{secs}.{}s", frac.trim_end_matches('0'));
    }
    for (unit, suffix) in [(1_000_000u128, "ms"), (1_000, "us")] {
        if ns.is_multiple_of(unit) {
            return format!("{}{suffix}", ns / unit);
        }
    }
    format!("{ns}ns")
}

/// A wall-clock time as RFC 3339 in UTC with milliseconds, `2025-06-01T12:34:56.789Z` (the CSV
/// outputs' `timestamp`). Formatted here, from the days since 1970 (Hinnant's `civil_from_days`),
/// rather than with a date crate: UTC needs no time zone data. A time before 1970 (a clock set
/// wrong) prints as 1970-01-01T00:00:00.000Z.
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // civil_from_days, for days >= 0 (eras of 400 years from 0000-03-01).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 * KIB));
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("2G"), Ok(2 * GIB));
        assert_eq!(parse_size("1T"), Ok(TIB));
        assert_eq!(parse_size("512MiB"), Ok(512 * MIB));
        assert_eq!(parse_size("512MB"), Ok(512 * MIB));
        assert_eq!(parse_size("512m"), Ok(512 * MIB));
        assert_eq!(parse_size("512mib"), Ok(512 * MIB));
        assert_eq!(parse_size(" 8 k "), Ok(8 * KIB));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("1.5G"), Ok(3 * GIB / 2));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size("+4K"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 * TIB));
    }

    #[test]
    fn bad_sizes() {
        assert_eq!(parse_size(""), Err(UnitError::EmptySize));
        assert_eq!(parse_size("   "), Err(UnitError::EmptySize));
        assert_eq!(
            parse_size("-4K"),
            Err(UnitError::NegativeSize("-4K".into()))
        );
        assert_eq!(
            parse_size("12X"),
            Err(UnitError::BadSizeUnit {
                input: "12X".into(),
                unit: "X".into()
            })
        );
        assert_eq!(parse_size("M"), Err(UnitError::BadSizeNumber("M".into())));
        assert_eq!(
            parse_size("abc"),
            Err(UnitError::BadSizeNumber("abc".into()))
        );
        assert_eq!(
            parse_size("1.2.3K"),
            Err(UnitError::BadSizeNumber("1.2.3K".into()))
        );
        assert_eq!(
            parse_size("1.K"),
            Err(UnitError::BadSizeNumber("1.K".into()))
        );
        assert_eq!(parse_size("."), Err(UnitError::BadSizeNumber(".".into())));
        assert_eq!(
            parse_size("1.1"),
            Err(UnitError::FractionalBytes("1.1".into()))
        );
        assert_eq!(
            parse_size("16777216T"),
            Err(UnitError::SizeOverflow("16777216T".into()))
        );
        assert_eq!(
            parse_size("18446744073709551616"),
            Err(UnitError::SizeOverflow("18446744073709551616".into()))
        );
        let huge = "9".repeat(60);
        assert_eq!(
            parse_size(&huge),
            Err(UnitError::SizeOverflow(huge.clone()))
        );
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_size("4KK"),
            Err(UnitError::BadSizeUnit {
                input: "4KK".into(),
                unit: "KK".into()
            })
        );
        let msg = parse_size("12X").unwrap_err().to_string();
        assert!(
            msg.starts_with("bad size \"12X\": unknown unit \"X\""),
            "{msg}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("100µs"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration(" 2 s "), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations() {
        assert_eq!(parse_duration(""), Err(UnitError::EmptyDuration));
        assert_eq!(
            parse_duration("-1s"),
            Err(UnitError::NegativeDuration("-1s".into()))
        );
        assert_eq!(
            parse_duration("2x"),
            Err(UnitError::BadDurationUnit {
                input: "2x".into(),
                unit: "x".into()
            })
        );
        assert_eq!(
            parse_duration("2S"),
            Err(UnitError::BadDurationUnit {
                input: "2S".into(),
                unit: "S".into()
            })
        );
        assert_eq!(
            parse_duration("s"),
            Err(UnitError::BadDurationNumber("s".into()))
        );
        assert_eq!(
            parse_duration("1.5ns"),
            Err(UnitError::FractionalNanos("1.5ns".into()))
        );
        let huge = format!("{}h", u64::MAX);
        assert_eq!(
            parse_duration(&huge),
            Err(UnitError::DurationOverflow(huge.clone()))
        );
        let msg = parse_duration("2x").unwrap_err().to_string();
        assert!(msg.starts_with("bad duration \"2x\""), "{msg}");
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_mib(256 * MIB), "256.0 MiB");
        assert_eq!(fmt_mib(MIB / 2), "0.5 MiB");
        assert_eq!(fmt_mib(0), "0.0 MiB");
        assert_eq!(fmt_mib(4 * KIB), "4 KiB");
        assert_eq!(fmt_mib(51 * KIB), "51 KiB");
        assert_eq!(fmt_mib(52 * KIB), "0.1 MiB");
        assert_eq!(fmt_mib(100), "100 bytes");
        assert_eq!(fmt_mib(4097), "4097 bytes");
        assert_eq!(fmt_bytes(100), "100 B");
        assert_eq!(fmt_bytes(4 * KIB), "4.0 KiB");
        assert_eq!(fmt_bytes(512 * MIB), "512.0 MiB");
        assert_eq!(fmt_bytes(3 * GIB / 2), "1.50 GiB");
        assert_eq!(fmt_bytes(2 * TIB), "2.00 TiB");
    }

    #[test]
    fn spec_forms_round_trip() {
        for bytes in [
            0,
            1,
            4095,
            4096,
            64 * MIB,
            1536 * KIB,
            2 * GIB,
            3 * TIB,
            u64::MAX,
        ] {
            assert_eq!(parse_size(&fmt_size_spec(bytes)), Ok(bytes), "{bytes}");
        }
        assert_eq!(fmt_size_spec(64 * MIB), "64M");
        assert_eq!(fmt_size_spec(1536 * KIB), "1536K");
        for d in [
            Duration::ZERO,
            Duration::from_secs(3),
            Duration::from_millis(1500),
            Duration::from_millis(1250),
            Duration::from_millis(500),
            Duration::from_micros(100),
            Duration::from_nanos(7),
            Duration::new(5, 1),
            Duration::new(u64::MAX, 999_999_999),
        ] {
            assert_eq!(parse_duration(&fmt_duration_spec(d)), Ok(d), "{d:?}");
        }
        assert_eq!(fmt_duration_spec(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration_spec(Duration::from_millis(1250)), "1.25s");
        assert_eq!(fmt_duration_spec(Duration::from_secs(3)), "3s");
        assert_eq!(fmt_duration_spec(Duration::from_millis(500)), "500ms");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A number as the parsers read it: digits, an optional point and fraction.
        fn number() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<u64>().prop_map(|n| n.to_string()),
                (0u64..100_000, "[0-9]{1,20}").prop_map(|(i, f)| format!("{i}.{f}")),
                "[0-9]{0,40}(\\.[0-9]{0,25})?",
            ]
        }

        proptest! {
            #[test]
            fn parsers_never_panic(s in "\\PC{0,40}") {
                let _ = parse_size(&s);
                let _ = parse_duration(&s);
            }

            #[test]
            fn numbers_with_units_never_panic(
                n in number(),
                unit in "(|b|k|kib|M|MB|g|GiB|t|T|x|ns|us|µs|ms|s|m|min|h|sec)",
                pad in "[ +-]{0,2}",
            ) {
                let s = format!("{pad}{n}{unit}");
                let _ = parse_size(&s);
                let _ = parse_duration(&s);
            }

            #[test]
            fn whole_sizes_are_exact_or_rejected(n in any::<u64>(), k in 0usize..5) {
                let (mult, suffix) = [(1, ""), (KIB, "K"), (MIB, "M"), (GIB, "G"), (TIB, "T")][k];
                let text = format!("{n}{suffix}");
                match n.checked_mul(mult) {
                    Some(bytes) => prop_assert_eq!(parse_size(&text), Ok(bytes)),
                    None => prop_assert_eq!(parse_size(&text), Err(UnitError::SizeOverflow(text.clone()))),
                }
            }

            #[test]
            fn whole_durations_are_exact_or_rejected(n in any::<u64>(), k in 0usize..6) {
                let (unit_ns, suffix) = [
                    (1u128, "ns"), (1_000, "us"), (1_000_000, "ms"), (1_000_000_000, "s"),
                    (60_000_000_000, "m"), (3_600_000_000_000, "h"),
                ][k];
                let text = format!("{n}{suffix}");
                let ns = u128::from(n) * unit_ns;
                match u64::try_from(ns / 1_000_000_000) {
                    Ok(secs) => prop_assert_eq!(
                        parse_duration(&text),
                        Ok(Duration::new(secs, (ns % 1_000_000_000) as u32))
                    ),
                    Err(_) => prop_assert_eq!(
                        parse_duration(&text),
                        Err(UnitError::DurationOverflow(text.clone()))
                    ),
                }
            }

            #[test]
            fn size_spec_round_trips(bytes in prop_oneof![
                any::<u64>(),
                (any::<u32>(), 0u32..5).prop_map(|(n, k)| u64::from(n) << (10 * k)),
            ]) {
                let text = fmt_size_spec(bytes);
                prop_assert_eq!(parse_size(&text), Ok(bytes), "{}", text);
            }

            #[test]
            fn duration_spec_round_trips(
                secs in prop_oneof![any::<u64>(), 0u64..100_000],
                nanos in prop_oneof![0u32..1_000_000_000, (0u32..1000).prop_map(|m| m * 1_000_000)],
            ) {
                let d = Duration::new(secs, nanos);
                let text = fmt_duration_spec(d);
                prop_assert_eq!(parse_duration(&text), Ok(d), "{}", text);
            }
        }
    }

    #[test]
    fn rfc3339_utc_is_the_calendar_date_and_time() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = |secs: u64, ms: u64| {
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(1_735_689_600, 0), "2025-01-01T00:00:00.000Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
