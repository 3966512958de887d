//! The OAuth2 token API: the endpoint, its grants, scopes, and the token table.

pub mod client_auth;
pub mod codes;
pub mod endpoint;
pub mod lifecycle;
pub mod scope;
pub mod store;

pub use store::{Identity, TokenStore};
