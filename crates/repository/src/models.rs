//! Typed rows returned by the repository.
//!
//! Money is an exact decimal ([`Decimal`]) and serialises as a JSON string such as `"19.99"`, so no
//! client ever sees a binary floating-point rounding of an amount.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

/// A user's profile: one row of `users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Profile {
    /// The user's id.
    pub id: i64,
    /// Unique login name.
    pub username: String,
    /// Contact address.
    pub email: String,
    /// Avatar URL, when the user has set one.
    pub avatar: Option<String>,
}

/// One order of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Order {
    /// The order's id.
    pub id: i64,
    /// What was bought.
    pub product: String,
    /// What it cost, exactly: a decimal string such as `"19.99"`.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "19.99"))]
    pub amount: Decimal,
    /// When it was placed.
    pub created_at: DateTime<Utc>,
}

/// One review written by a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Review {
    /// The review's id.
    pub id: i64,
    /// The reviewed product.
    pub product_id: i64,
    /// 1 to 5 stars.
    pub rating: i16,
    /// The text of the review.
    pub content: String,
}

/// How many orders a user has placed and what they add up to, over all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OrderSummary {
    /// Number of orders.
    pub order_count: i64,
    /// Sum of their amounts, as a decimal string; `"0"` when there are none.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "249.10"))]
    pub total_amount: Decimal,
}

/// A profile with its order summary: one entry of a batch summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserSummary {
    /// The user's profile.
    pub profile: Profile,
    /// The user's orders, summarised.
    #[serde(flatten)]
    pub orders: OrderSummary,
}

/// At most a configured number of rows, newest first, and whether there are more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The rows.
    pub items: Vec<T>,
    /// Whether more rows exist beyond these.
    pub more: bool,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Page {
            items: Vec::new(),
            more: false,
        }
    }
}

impl<T> Page<T> {
    /// The first `limit` of `rows` (read with a limit one higher, to learn whether there are
    /// more), converted by `each`.
    pub(crate) fn of(
        rows: Vec<tokio_postgres::Row>,
        limit: i64,
        each: impl Fn(&tokio_postgres::Row) -> Result<T, crate::Error>,
    ) -> Result<Self, crate::Error> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = rows.len() > limit;
        let items = rows
            .iter()
            .take(limit)
            .map(each)
            .collect::<Result<_, _>>()?;
        Ok(Page { items, more })
    }
}
