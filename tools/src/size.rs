//! Sizes as operators write them: `1073741824`, `256M`, `10G`, `1.5T` is refused (binary
//! suffixes only, whole numbers), `4KiB`, `4Ki`, `4KB` and `4k` are accepted (all 4096).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size '{0}' is empty")]
    Empty(String),
    #[error("size '{0}' is not a whole number with an optional binary suffix: K, M, G or T (also written KiB, Ki or KB: all mean 1024), e.g. 256M")]
    Malformed(String),
    #[error("size '{0}' is too large")]
    TooLarge(String),
    #[error("size must be greater than zero")]
    Zero,
}

pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::Empty(text.into()));
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::Malformed(text.into()));
    }
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KI" | "KIB" => 10,
        "M" | "MB" | "MI" | "MIB" => 20,
        "G" | "GB" | "GI" | "GIB" => 30,
        "T" | "TB" | "TI" | "TIB" => 40,
        _ => return Err(SizeError::Malformed(text.into())),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::TooLarge(text.into()))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.into()))?;
    if bytes > i64::MAX as u64 {
        return Err(SizeError::TooLarge(text.into()));
    }
    if bytes == 0 {
        return Err(SizeError::Zero);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn suffixes_are_binary() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("256Mi"), Ok(256 << 20));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(parse_size(""), Err(SizeError::Empty(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("12Q"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Malformed(_))));
        assert_eq!(parse_size("0"), Err(SizeError::Zero));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn round_trips_mebibytes(n in 1u64..1_000_000) {
            prop_assert_eq!(parse_size(&format!("{n}M")), Ok(n << 20));
        }
    }
}
