//! The Graph API client for customer-list Custom Audiences, and the one classification of Meta's
//! answers that every caller acts on. It never logs a token, never puts one in a URL, and never
//! sees raw identifiers: callers hand it values already normalized and hashed.

mod classify;
mod client;
mod usage;

pub use classify::{classify, CallOutcome, ErrorClass};
pub use client::{
    users_form, AddUsersResponse, GraphClient, GraphError, ListedAdAccount, MetaError, TokenInfo,
    TokenInfoError,
};
pub use usage::Usage;
