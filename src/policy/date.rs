//! HTTP dates as a recipient must read them (RFC 9110 §5.6.7): the
//! preferred IMF-fixdate and the two obsolete formats (RFC 850 and C's
//! asctime), month and zone names in any case, and a weekday that does not
//! match the date ignored (it is redundant). The `httpdate` crate rejects
//! all three leniencies; senders' dates come from httpdate.

use cachegate_store::UnixMillis;

/// Milliseconds since the Unix epoch of an HTTP date; `None` when it is
/// none of the three formats or names an impossible time. Dates before
/// 1970 read as 0 (long past, which is what they mean to a cache).
pub fn parse_http_date(s: &str) -> Option<UnixMillis> {
    let s = s.trim();
    // Drop the weekday: "Sun," "Sunday," (IMF-fixdate, RFC 850) or "Sun "
    // (asctime). Whatever it says is not checked.
    let (rest, asctime) = match s.split_once(',') {
        Some((day, rest)) if day.bytes().all(|b| b.is_ascii_alphabetic()) => (rest, false),
        Some(_) => return None,
        None => {
            let (day, rest) = s.split_once(' ')?;
            if !day.bytes().all(|b| b.is_ascii_alphabetic()) {
                return None;
            }
            (rest, true)
        }
    };
    let parts: Vec<&str> = rest.split_ascii_whitespace().collect();
    let (day, month, year, time) = if asctime {
        // "Nov  6 08:49:37 1994"
        let [month, day, time, year] = parts[..] else {
            return None;
        };
        (day, month, full_year(year, 4)?, time)
    } else {
        match parts[..] {
            // IMF-fixdate: "06 Nov 1994 08:49:37 GMT"
            [day, month, year, time, zone] if zone.eq_ignore_ascii_case("gmt") => {
                (day, month, full_year(year, 4)?, time)
            }
            // RFC 850: "06-Nov-94 08:49:37 GMT"
            [date, time, zone] if zone.eq_ignore_ascii_case("gmt") => {
                let mut d = date.split('-');
                let (day, month, year) = (d.next()?, d.next()?, d.next()?);
                if d.next().is_some() {
                    return None;
                }
                (day, month, full_year(year, 2)?, time)
            }
            _ => return None,
        }
    };
    let day: u64 = digits(day, 1, 2)?;
    let month = month_number(month)?;
    let mut hms = time.split(':');
    let (h, m, sec) = (hms.next()?, hms.next()?, hms.next()?);
    if hms.next().is_some() {
        return None;
    }
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
}
