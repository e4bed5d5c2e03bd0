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

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = i64::deserialize(deserializer)?;
        UserId::new(id).map_err(|_| {
            serde::de::Error::custom(format_args!("user id {id} is not a positive integer"))
        })
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
