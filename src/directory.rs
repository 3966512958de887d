//! The clients and users of a configuration, ready for lookups by the token endpoint.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, GrantType};

/// A registered client application.
#[derive(Debug)]
pub struct Client {
    /// Its id.
    pub id: Arc<str>,
    /// PHC string of its secret; `None` for a public client.
    pub secret: Option<Arc<str>>,
    /// Grants it may use.
    pub grants: Vec<GrantType>,
    /// Exact redirect URIs.
    pub redirect_uris: Vec<String>,
    /// Access token lifetime, seconds.
    pub access_ttl: u64,
    /// Refresh token lifetime, seconds.
    pub refresh_ttl: u64,
    /// Scopes it may ask for; `None` for any.
    pub scopes: Option<Vec<String>>,
}

impl Client {
    /// Whether the client may use `grant`.
    pub fn allows(&self, grant: GrantType) -> bool {
        self.grants.contains(&grant)
    }

    /// Whether the client is public (no secret).
    pub fn is_public(&self) -> bool {
        self.secret.is_none()
    }
}

/// A user who may sign in.
#[derive(Debug)]
pub struct User {
    /// Sign-in name.
    pub username: Arc<str>,
    /// PHC string of the password.
    pub password: Arc<str>,
    /// Roles.
    pub roles: Vec<String>,
}

/// Clients and users by name.
#[derive(Debug)]
pub struct Directory {
    clients: HashMap<Arc<str>, Arc<Client>>,
    users: HashMap<Arc<str>, Arc<User>>,
    /// Verified in place of a missing user's password, at the same cost.
    pub decoy_password: Arc<str>,
}

impl Directory {
    /// Builds the directory; computes the decoy hash (one argon2 run).
    pub fn new(config: &Config) -> Directory {
        let clients = config
            .clients
            .iter()
            .map(|c| {
                let id: Arc<str> = c.client_id.get_ref().as_str().into();
                let client = Client {
                    id: id.clone(),
                    secret: c.client_secret.as_ref().map(|s| s.0.as_str().into()),
                    grants: c.authorized_grant_types.get_ref().clone(),
                    redirect_uris: c.registered_redirect_uris.clone(),
                    access_ttl: c.access_token_validity_seconds,
                    refresh_ttl: c.refresh_token_validity_seconds,
                    scopes: c.scopes.clone(),
                };
                (id, Arc::new(client))
            })
            .collect();
        let users = config
            .users
            .iter()
            .map(|u| {
                let name: Arc<str> = u.username.get_ref().as_str().into();
                let user = User {
                    username: name.clone(),
                    password: u.password.0.as_str().into(),
                    roles: u.roles.get_ref().clone(),
                };
                (name, Arc::new(user))
            })
            .collect();
        let like = config.users.first().map(|u| u.password.0.as_str());
        Directory {
            clients,
            users,
            decoy_password: crate::credentials::decoy_hash(like).into(),
        }
    }

    /// A client by id.
    pub fn client(&self, id: &str) -> Option<&Arc<Client>> {
        self.clients.get(id)
    }

    /// All clients.
    pub fn clients(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.clients.values()
    }

    /// A user by name.
    pub fn user(&self, username: &str) -> Option<&Arc<User>> {
        self.users.get(username)
    }
}
