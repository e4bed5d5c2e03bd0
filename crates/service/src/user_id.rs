//! [`UserId`]: a user id as the API accepts it, checked once.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A user id: a positive 64-bit integer. From text (a URL path), only its one canonical spelling
/// is accepted: decimal digits, no sign, no leading zero, so `/users/01` is not user 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(i64);

/// Why a value is not a [`UserId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user_id must be a positive 64-bit integer")]
pub struct InvalidUserId;

impl UserId {
    /// The smallest id.
    pub const MIN: UserId = UserId(1);
    /// The largest id.
    pub const MAX: UserId = UserId(i64::MAX);

    /// The id, if `id` is positive.
    ///
    /// # Errors
    ///
    /// [`InvalidUserId`] for zero or a negative number.
    pub fn new(id: i64) -> Result<Self, InvalidUserId> {
        if id > 0 {
            Ok(UserId(id))
        } else {
            Err(InvalidUserId)
        }
    }

    /// The id as a number.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl FromStr for UserId {
    type Err = InvalidUserId;

    /// ```
    /// use service::UserId;
    /// assert_eq!("42".parse::<UserId>().map(UserId::get), Ok(42));
    /// for bad in ["", "0", "-1", "+1", "01", " 1", "1.0", "9223372036854775808"] {
    ///     assert!(bad.parse::<UserId>().is_err(), "{bad:?}");
    /// }
    /// ```
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() || text.starts_with('0') || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidUserId);
        }
        text.parse::<i64>()
            .map_err(|_| InvalidUserId)
            .and_then(UserId::new)
    }
}

/// From JSON: an integer from 1 to `i64::MAX`. JSON Schema counts `7.0` as the integer 7, and so
/// does this, as long as the number is read exactly (up to 2^53); a larger number written with a
/// fraction part cannot be, and is refused rather than rounded to another user's id.
impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Id;

        impl serde::de::Visitor<'_> for Id {
            type Value = UserId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a positive integer")
            }

            fn visit_i64<E: serde::de::Error>(self, id: i64) -> Result<UserId, E> {
                UserId::new(id).map_err(|_| E::custom(format_args!("user id {id} is not positive")))
            }

            fn visit_u64<E: serde::de::Error>(self, id: u64) -> Result<UserId, E> {
                i64::try_from(id)
                    .map_err(|_| E::custom("user id is larger than 9223372036854775807"))
                    .and_then(|id| self.visit_i64(id))
            }

            fn visit_f64<E: serde::de::Error>(self, id: f64) -> Result<UserId, E> {
                // 2^53: every integer up to here is exactly representable.
                const EXACT: f64 = 9_007_199_254_740_992.0;
                if id.fract() != 0.0 || !(1.0..=EXACT).contains(&id) {
                    return Err(E::custom(
                        "user id must be a positive integer (a number with a fraction part is \
                         accepted only when whole and at most 2^53)",
                    ));
                }
                // Whole and within 2^53: the conversion is exact.
                #[allow(clippy::cast_possible_truncation)]
                self.visit_i64(id as i64)
            }
        }

        deserializer.deserialize_any(Id)
    }
}

/// In the OpenAPI document: an `int64` integer from 1 to `i64::MAX`.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for UserId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(1))
            .maximum(Some(i64::MAX))
            .description(Some("A user id: a positive 64-bit integer."))
            .examples([1])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for UserId {}

impl PartialEq<i64> for UserId {
    fn eq(&self, other: &i64) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_json_a_user_id_is_a_positive_integer_read_exactly() {
        let read = |text: &str| serde_json::from_str::<UserId>(text).map(UserId::get);
        assert_eq!(read("7").unwrap(), 7);
        assert_eq!(read("7.0").unwrap(), 7, "JSON Schema's integer 7");
        assert_eq!(read("9223372036854775807").unwrap(), i64::MAX);
        assert_eq!(read("9007199254740992.0").unwrap(), 1 << 53);
        for bad in [
            "0",
            "-1",
            "7.5",
            "0.0",
            "9223372036854775808",
            "9007199254740994.0",
            "1e300",
            "\"7\"",
            "null",
            "[7]",
        ] {
            let error = read(bad).unwrap_err().to_string();
            assert!(error.len() < 200, "{bad}: {error}");
        }
    }
}
