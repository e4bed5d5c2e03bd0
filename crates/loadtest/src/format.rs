//! Number formatting for the terminal summary, the comparison and the SVG captions.

/// A count with thousands separators: `123,456`.
pub(crate) fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate with one decimal and thousands separators: `6,172.8`.
pub(crate) fn rate(r: f64) -> String {
    if !r.is_finite() || r < 0.0 {
        return "-".to_owned();
    }
    // Rates are far below 2^53; rounding to tenths is what is shown.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let tenths = (r * 10.0).round() as u64;
    format!("{}.{}", count(tenths / 10), tenths % 10)
}

/// A latency in milliseconds, with three significant digits and a fitting unit.
pub(crate) fn latency(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        "-".to_owned()
    } else if ms == 0.0 {
        "0".to_owned()
    } else if ms < 1.0 {
        format!("{:.0}µs", ms * 1000.0)
    } else if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 100.0 {
        format!("{ms:.1}ms")
    } else if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

/// A fraction as a percentage: `0.05%`, `100%`.
pub(crate) fn percent(fraction: f64) -> String {
    let p = fraction * 100.0;
    if !p.is_finite() {
        "-".to_owned()
    } else if p == 0.0 || p >= 10.0 {
        format!("{p:.1}%")
    } else if p >= 0.1 {
        format!("{p:.2}%")
    } else {
        format!("{p:.3}%")
    }
}

/// Seconds, compactly: `20s`, `1.5s`.
pub(crate) fn seconds(s: f64) -> String {
    if (s - s.round()).abs() < 1e-9 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

/// Bytes with a binary unit: `12.3 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    // Display only; precision loss above 2^53 bytes is irrelevant.
    #[allow(clippy::cast_precision_loss)]
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(rate(6172.84), "6,172.8");
        assert_eq!(latency(0.412), "412µs");
        assert_eq!(latency(0.0), "0");
        assert_eq!(latency(9.814), "9.81ms");
        assert_eq!(latency(20.11), "20.1ms");
        assert_eq!(latency(250.4), "250ms");
        assert_eq!(latency(1500.0), "1.50s");
        assert_eq!(percent(0.0005), "0.050%");
        assert_eq!(percent(0.0), "0.0%");
        assert_eq!(percent(0.5), "50.0%");
        assert_eq!(seconds(20.0), "20s");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
