//! covata-gateway: a TLS-terminating reverse proxy that answers the Covata Platform's
//! OAuth2 token API itself, checks the bearer token of every other request, and streams
//! the request to the upstream its route names.
//!
//! Where a request goes, by file: [`server`] accepts it and runs TLS and HTTP;
//! [`gateway`] dispatches it: to [`token`] for the token endpoint, otherwise through
//! [`routes`] (which route), [`auth`] (the bearer check) and [`proxy`] (the header
//! rewrite), which sends it through a [`pool`] connection speaking [`upstream`]
//! HTTP/1.1.
//! Failures become responses in [`error`]. [`config`] reads `config.toml`.

pub mod admin;
pub mod auth;
pub mod authorize;
pub mod body;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod directory;
pub mod error;
pub mod form;
pub mod framing;
#[cfg(test)]
mod fuzz;
pub mod gateway;
pub mod header_policy;
pub mod lockout;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod tls;
pub mod token;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use gateway::Gateway;
