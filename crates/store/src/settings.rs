//! The vocabulary of configurable values, shared by every crate of the workspace: an inclusive
//! range ([`Bounds`]) and the refusal of a setting outside it ([`SettingError`]). Each settings
//! struct (the store's here, the engine's, the listener's, the HTTP adapter's) deserializes
//! its own config section and checks its own ranges with these.

/// An inclusive range a value must lie in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u64,
    pub max: u64,
}

impl Bounds {
    pub const fn new(min: u64, max: u64) -> Self {
        Self { min, max }
    }

    pub const fn contains(self, value: u64) -> bool {
        self.min <= value && value <= self.max
    }

    /// Why `value` is refused, as the config and the API say it: "must be between A and B,
    /// got V" (None: it is within).
    pub fn refusal(self, value: u64) -> Option<String> {
        (!self.contains(value)).then(|| format!("must be between {} and {}, got {value}", self.min, self.max))
    }

    /// `value` brought into the range (for a client's wish that may only lower a setting).
    pub fn clamp(self, value: u64) -> u64 {
        value.clamp(self.min, self.max)
    }

    /// The setting `key` refused when `value` is outside.
    ///
    /// # Errors
    /// `value` is outside the range.
    pub fn setting(self, key: &str, value: u64) -> Result<(), SettingError> {
        match self.refusal(value) {
            Some(reason) => Err(SettingError::new(key, reason)),
            None => Ok(()),
        }
    }
}

/// A setting refused: its key (within its section, until [`SettingError::in_section`]) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SettingError {
    pub key: String,
    pub reason: String,
}

impl SettingError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The same refusal with its key qualified by the section, e.g. `store.retention_ms`.
    #[must_use]
    pub fn in_section(self, section: &str) -> Self {
        Self {
            key: format!("{section}.{}", self.key),
            reason: self.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_refuse_naming_the_range() {
        let b = Bounds::new(1, 128);
        assert!(b.contains(1) && b.contains(128) && !b.contains(129));
        assert_eq!(b.clamp(0), 1);
        let e = b.setting("max_pull_size", 500).expect_err("out of range");
        assert_eq!(e.to_string(), "max_pull_size: must be between 1 and 128, got 500");
        assert_eq!(e.in_section("consumer[0]").key, "consumer[0].max_pull_size");
    }
}
