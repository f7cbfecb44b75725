//! Byte counts written for people, in error messages and logs.

/// `bytes` in B, kB, MB or GB (decimal), with enough digits that two limits near each other
/// still read differently: 950 B, 51.20 kB, 4.19 MB, 79.33 GB, 123.4 GB.
pub fn readable(bytes: u64) -> String {
    const UNITS: [(f64, &str); 3] = [(1e9, "GB"), (1e6, "MB"), (1e3, "kB")];
    let value = bytes as f64;
    for (scale, unit) in UNITS {
        if value >= scale {
            let scaled = value / scale;
            let decimals = if scaled >= 100.0 { 1 } else { 2 };
            return format!("{scaled:.decimals$} {unit}");
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_the_unit_that_fits() {
        assert_eq!(readable(950), "950 B");
        assert_eq!(readable(51_200), "51.20 kB");
        assert_eq!(readable(4_194_304), "4.19 MB");
        assert_eq!(readable(79_331_000_000), "79.33 GB");
        assert_eq!(readable(u64::MAX), "18446744073.7 GB");
    }
}
