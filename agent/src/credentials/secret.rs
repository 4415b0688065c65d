//! A credential's value, kept out of logs, error texts and freed memory.

use std::fmt;

use zeroize::Zeroizing;

/// Never printed: Debug shows a placeholder, and there is no Display or
/// Serialize. The bytes are overwritten when it is dropped.
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Refuses values that cannot be sent in a header; the error does not
    /// quote the value. Surrounding whitespace (a file's final newline) is
    /// dropped.
    pub fn new(value: &str) -> Result<Secret, &'static str> {
        let value = value.trim();
        if value.is_empty() {
            return Err("is empty");
        }
        if !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err("has characters not allowed in an HTTP header");
        }
        Ok(Secret(Zeroizing::new(value.to_owned())))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_trimmed_checked_and_never_printed() {
        let key = Secret::new(" sk-test \n").unwrap();
        assert_eq!(key.expose(), "sk-test");
        assert_eq!(format!("{key:?}"), "Secret(<redacted>)");
        assert_eq!(Secret::new("a\r\nX-Injected: 1").unwrap_err(), "has characters not allowed in an HTTP header");
        assert_eq!(Secret::new("  ").unwrap_err(), "is empty");
    }
}
