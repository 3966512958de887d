//! Which request headers a client may send through to an upstream.
//!
//! The gateway speaks for the client to the upstream through headers of its own: the
//! identity it checked (`X-Authenticated-*`, `X-Token-Id`) and what it saw of the
//! connection (`X-Forwarded-*`, `Forwarded`). A client must not be able to supply any
//! of them, in any spelling an upstream might read as the same name: CGI and WSGI
//! environments, PHP and some Java containers turn `X_Authenticated_User` and
//! `X-Authenticated-User` into the same variable. So names are compared folded (case,
//! and `_` as `-`), and, as nginx does by default (`underscores_in_headers off`), any
//! name with `_` is dropped unless a route passes it by name.
//!
//! A second set is not the gateway's but is trusted by common upstream stacks to
//! override what the gateway vouches for (the client address, the URL, the method);
//! those are dropped unless a route lists them in `pass_headers`.

/// Whether `name` (lower-case, as `http` keeps names) folds to a header the gateway
/// sets itself: never passed, whatever a route says.
pub fn is_owned(name: &str) -> bool {
    let folded;
    let name = if name.as_bytes().contains(&b'_') {
        folded = name.replace('_', "-");
        folded.as_str()
    } else {
        name
    };
    owned_folded(name)
}

fn owned_folded(name: &str) -> bool {
    name.starts_with("x-authenticated-")
        || name.starts_with("x-forwarded-")
        || matches!(name, "x-token-id" | "forwarded")
}

/// Headers that some upstreams trust over what the gateway vouches for: the client's
/// address, the URL or the method the request "really" has, the host it was "really"
/// sent to. Dropped unless a route passes them.
const DISTRUSTED: &[&str] = &[
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-original-host",
    "x-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    // The scheme the request "really" came with (Tornado, Rack, IIS).
    "x-forwarded",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    // Addresses and paths other proxies vouch for.
    "x-proxyuser-ip",
    "x-original-forwarded-for",
    "x-envoy-external-address",
    "x-envoy-original-path",
    // A client certificate some proxy is supposed to have checked.
    "x-client-cert",
    "x-ssl-client-cert",
    "ssl-client-cert",
];

/// Whether a client's header is dropped unless the route passes it: a name with `_`,
/// or one of the headers some upstreams trust over the gateway.
pub fn is_dropped_by_default(name: &str) -> bool {
    name.as_bytes().contains(&b'_') || DISTRUSTED.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_names_are_caught_in_every_spelling() {
        for name in [
            "x-authenticated-user",
            "x_authenticated_user",
            "x-authenticated_roles",
            "x_authenticated-scope",
            "x-authenticated-anything",
            "x-token-id",
            "x_token_id",
            "x-forwarded-for",
            "x_forwarded_for",
            "x-forwarded-port",
            "forwarded",
        ] {
            assert!(is_owned(name), "{name}");
        }
        for name in [
            "x-token",
            "x-authenticated",
            "accept",
            "x_custom",
            "forwardedx",
        ] {
            assert!(!is_owned(name), "{name}");
        }
    }

    #[test]
    fn underscores_and_distrusted_names_are_dropped_by_default() {
        for name in [
            "x_custom",
            "_",
            "x-real-ip",
            "x-original-url",
            "x-http-method-override",
            "x-scheme",
            "front-end-https",
            "x-ssl-client-cert",
        ] {
            assert!(is_dropped_by_default(name), "{name}");
        }
        for name in ["accept", "x-custom", "content-type", "x-request-id"] {
            assert!(!is_dropped_by_default(name), "{name}");
        }
    }
}
