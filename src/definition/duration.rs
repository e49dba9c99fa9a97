//! Human-readable durations used in workflow definitions: `"500ms"`, `"30s"`,
//! `"10m"`, `"24h"`, `"2d"`, and combinations such as `"1h30m"`.

/// Largest duration accepted anywhere in a definition: 36500 days (about 100
/// years). Keeps every later computation (timestamps, Postgres intervals) far
/// away from overflow.
pub(crate) const MAX_DURATION_MS: u64 = 36_500 * DAY_MS;

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

const EXPECTED: &str = "expected one or more <integer><unit> parts with unit ms, s, m, h or d \
     (for example \"500ms\", \"30s\", \"10m\", \"1h30m\", \"2d\")";

/// Parses a duration such as `"1h30m"` into milliseconds.
///
/// The input is one or more `<integer><unit>` parts with no spaces or signs;
/// units are `ms`, `s`, `m`, `h` and `d`. Empty strings, bare numbers,
/// negative or fractional numbers, unknown units and totals above
/// [`MAX_DURATION_MS`] are rejected with a message saying what is expected.
pub(crate) fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let invalid = || format!("invalid duration {s:?}: {EXPECTED}");
    if s.is_empty() {
        return Err(format!("empty duration: {EXPECTED}"));
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total: u64 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(invalid());
        }
        let too_long = || {
            format!(
                "duration {s:?} is too long: at most {} is allowed",
                format_duration_ms(MAX_DURATION_MS)
            )
        };
        // Digits only, so the only possible parse error is overflow.
        let n: u64 = s[start..i].parse().map_err(|_| too_long())?;
        let unit_ms = if bytes[i..].starts_with(b"ms") {
            i += 2;
            1
        } else {
            let unit = match bytes.get(i) {
                Some(b's') => SECOND_MS,
                Some(b'm') => MINUTE_MS,
                Some(b'h') => HOUR_MS,
                Some(b'd') => DAY_MS,
                _ => return Err(invalid()),
            };
            i += 1;
            unit
        };
        total = n
            .checked_mul(unit_ms)
            .and_then(|part| total.checked_add(part))
            .filter(|t| *t <= MAX_DURATION_MS)
            .ok_or_else(too_long)?;
    }
    Ok(total)
}

/// Formats milliseconds the way [`parse_duration_ms`] reads them, largest
/// unit first and zero parts left out: `90000` → `"1m30s"`, `0` → `"0s"`.
pub(crate) fn format_duration_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    let mut rest = ms;
    let mut out = String::new();
    for (unit_ms, unit) in [
        (DAY_MS, "d"),
        (HOUR_MS, "h"),
        (MINUTE_MS, "m"),
        (SECOND_MS, "s"),
        (1, "ms"),
    ] {
        let n = rest / unit_ms;
        if n > 0 {
            out.push_str(&n.to_string());
            out.push_str(unit);
            rest %= unit_ms;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_units() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("1s"), Ok(1_000));
        assert_eq!(parse_duration_ms("10m"), Ok(600_000));
        assert_eq!(parse_duration_ms("24h"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
    }

    #[test]
    fn parses_combinations() {
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("1s500ms"), Ok(1_500));
        assert_eq!(parse_duration_ms("1d2h3m4s5ms"), Ok(93_784_005));
        assert_eq!(parse_duration_ms("1m1ms"), Ok(60_001));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "", "10", "-1s", "+1s", "1.5s", "1x", "s", "ms", "1 s", " 1s", "1s ", "1S", "1sec",
            "1h30", "h1", "1ms2", "１s",
        ] {
            let err = parse_duration_ms(bad).unwrap_err();
            assert!(
                err.contains("ms, s, m, h or d"),
                "{bad:?} gave an unhelpful message: {err}"
            );
        }
    }

    #[test]
    fn rejects_overflow() {
        assert!(parse_duration_ms("99999999999999999999999s")
            .unwrap_err()
            .contains("too long"));
        assert!(parse_duration_ms("18446744073709551615d")
            .unwrap_err()
            .contains("too long"));
        assert!(parse_duration_ms("36501d")
            .unwrap_err()
            .contains("too long"));
        assert_eq!(parse_duration_ms("36500d"), Ok(MAX_DURATION_MS));
        assert!(parse_duration_ms("36500d1ms").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_duration_ms(90_000), "1m30s");
        assert_eq!(format_duration_ms(0), "0s");
        assert_eq!(format_duration_ms(500), "500ms");
        assert_eq!(format_duration_ms(1_500), "1s500ms");
        assert_eq!(format_duration_ms(86_400_000), "1d");
        assert_eq!(format_duration_ms(5_400_000), "1h30m");
    }

    #[test]
    fn format_round_trips() {
        for ms in [
            1,
            999,
            1_000,
            61_001,
            3_600_000,
            93_784_005,
            MAX_DURATION_MS,
        ] {
            assert_eq!(parse_duration_ms(&format_duration_ms(ms)), Ok(ms));
        }
    }
}
