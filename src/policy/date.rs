//! HTTP dates as RFC 9110 §5.6.7 defines them: the preferred IMF-fixdate
//! and the two obsolete formats (RFC 850 and C's asctime), each exactly
//! as its grammar spells it — one space where the grammar has `SP`, two
//! digits where it has `2DIGIT`, a weekday name of the right length.
//! Anything else is not a date: an `Expires` that is not one means
//! "already expired" (RFC 9111 §5.3). Two leniencies a cache may have:
//! month, weekday and zone names in any case (RFC 9111 §4.2: "a cache
//! recipient SHOULD match the field value case-insensitively"), and a
//! weekday that does not match the date is ignored (it is redundant).
//! The `httpdate` crate rejects both; senders' dates come from httpdate.

use cachegate_store::UnixMillis;

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const DAY_NAMES_LONG: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

fn is_one_of(s: &str, names: &[&str]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(s))
}

/// Milliseconds since the Unix epoch of an HTTP date; `None` when it is
/// none of the three formats or names an impossible time. Dates before
/// 1970 read as 0 (long past, which is what they mean to a cache).
pub fn parse_http_date(s: &str) -> Option<UnixMillis> {
    let s = s.trim_matches([' ', '\t']);
    let (day, month, year, time) = match s.split_once(',') {
        Some((weekday, rest)) => {
            // `SP` exactly: no second space, no tab.
            let rest = rest.strip_prefix(' ')?;
            match rest.split(' ').collect::<Vec<_>>()[..] {
                // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
                [day, month, year, time, zone]
                    if is_one_of(weekday, &DAY_NAMES) && zone.eq_ignore_ascii_case("gmt") =>
                {
                    (digits(day, 2, 2)?, month, full_year(year, 4)?, time)
                }
                // RFC 850: "Sunday, 06-Nov-94 08:49:37 GMT"
                [date, time, zone]
                    if is_one_of(weekday, &DAY_NAMES_LONG) && zone.eq_ignore_ascii_case("gmt") =>
                {
                    let [day, month, year] = date.split('-').collect::<Vec<_>>()[..] else {
                        return None;
                    };
                    (digits(day, 2, 2)?, month, full_year(year, 2)?, time)
                }
                _ => return None,
            }
        }
        None => {
            // asctime: "Sun Nov  6 08:49:37 1994", fixed width: the day is
            // two digits or a space and one digit.
            let (weekday, rest) = s.split_once(' ')?;
            let b = rest.as_bytes();
            if !is_one_of(weekday, &DAY_NAMES)
                || b.len() != 20
                || b[3] != b' '
                || b[6] != b' '
                || b[15] != b' '
            {
                return None;
            }
            let day = rest.get(4..6)?;
            let day = day.strip_prefix(' ').unwrap_or(day);
            (
                digits(day, 1, 2)?,
                rest.get(..3)?,
                full_year(rest.get(16..)?, 4)?,
                rest.get(7..15)?,
            )
        }
    };
    let month = month_number(month)?;
    let [h, m, sec] = time.split(':').collect::<Vec<_>>()[..] else {
        return None;
    };
    let (h, m, sec): (u64, u64, u64) = (digits(h, 2, 2)?, digits(m, 2, 2)?, digits(sec, 2, 2)?);
    // 60 is a leap second; it reads as the next second.
    if day == 0 || day > days_in_month(year, month) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + h as i64 * 3600 + m as i64 * 60 + sec as i64;
    Some(u64::try_from(secs).unwrap_or(0).saturating_mul(1000))
}

/// A year of `len` digits; RFC 850's two-digit years are read as the
/// nearest century that is not more than 50 years ahead (RFC 9110 §5.6.7),
/// taking "now" as the 2020s: 00-69 are 20xx, 70-99 are 19xx.
fn full_year(s: &str, len: usize) -> Option<i64> {
    let y: i64 = digits(s, len, len)?;
    Some(match len {
        2 if y < 70 => 2000 + y,
        2 => 1900 + y,
        _ => y,
    })
}

fn digits<T: std::str::FromStr>(s: &str, min: usize, max: usize) -> Option<T> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn month_number(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    MONTHS
        .iter()
        .position(|m| m.eq_ignore_ascii_case(s))
        .map(|i| i as u64 + 1)
}

fn days_in_month(year: i64, month: u64) -> u64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u64, day: u64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV_6_1994: UnixMillis = 784_111_777_000;

    #[test]
    fn the_three_formats() {
        for s in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_http_date(s), Some(NOV_6_1994), "{s}");
        }
    }

    #[test]
    fn lenient_where_the_rfc_asks_it() {
        for s in [
            "sun, 06 nov 1994 08:49:37 gmt",
            "SUN, 06 NOV 1994 08:49:37 GMT",
            // The weekday is wrong (it was a Sunday): ignored.
            "Mon, 06 Nov 1994 08:49:37 GMT",
            "Fri Nov  6 08:49:37 1994",
            "  Sun, 06 Nov 1994 08:49:37 GMT ",
        ] {
            assert_eq!(parse_http_date(s), Some(NOV_6_1994), "{s}");
        }
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
            Some(1_835_438_400_000)
        );
        assert_eq!(parse_http_date("Sat, 01 Jan 1960 00:00:00 GMT"), Some(0));
    }

    #[test]
    fn rejects_what_is_not_a_date() {
        for s in [
            "",
            "0",
            "-1",
            "tomorrow",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Sun, 29 Feb 2027 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:49:37 GMT",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
            "1994-11-06T08:49:37Z",
            "Sun, +6 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(s), None, "{s:?}");
        }
    }

    /// RFC 9110 §5.6.7: `SP` is one space, `2DIGIT` two digits, and the
    /// weekday of each format has its own length. What breaks the grammar
    /// is not a date (and an `Expires` that is not one has expired, RFC
    /// 9111 §5.3).
    #[test]
    fn the_grammar_is_followed_exactly() {
        for s in [
            "Sun, 06  Nov 1994 08:49:37 GMT",
            "Sun,  06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov  1994 08:49:37 GMT",
            "Sun, 06 Nov 1994  08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37  GMT",
            "Sun,06 Nov 1994 08:49:37 GMT",
            "Sun, 06\tNov 1994 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 8:49:37 GMT",
            "Sunday, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06-Nov-94 08:49:37 GMT",
            "Sunday,  06-Nov-94 08:49:37 GMT",
            "Sunday, 6-Nov-94 08:49:37 GMT",
            "Sun Nov 6 08:49:37 1994",
            "Sun Nov   6 08:49:37 1994",
            "Sun  Nov  6 08:49:37 1994",
            "Sun Nov  6 08:49:37  1994",
            "Sunday Nov  6 08:49:37 1994",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(s), None, "{s:?}");
        }
        assert_eq!(
            parse_http_date("Sun Nov 16 08:49:37 1994"),
            Some(NOV_6_1994 + 10 * 86_400_000)
        );
    }
}
