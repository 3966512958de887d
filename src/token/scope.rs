//! Scope strings (RFC 6749 §3.3): space-separated scope tokens.

use crate::error::Error;

/// Whether `s` is one scope-token: `1*( %x21 / %x23-5B / %x5D-7E )`.
pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

/// Splits a requested scope into its tokens, dropping repeats and tolerating runs of
/// spaces; a character outside the scope-token alphabet is `invalid_scope`.
pub fn parse(requested: &str) -> Result<Vec<&str>, Error> {
    let mut tokens: Vec<&str> = Vec::new();
    for token in requested.split(' ').filter(|t| !t.is_empty()) {
        if !is_scope_token(token) {
            return Err(Error::InvalidScope(
                "the scope holds a character RFC 6749 §3.3 does not allow".into(),
            ));
        }
        if !tokens.contains(&token) {
            tokens.push(token);
        }
    }
    Ok(tokens)
}

/// The scope to grant: the requested one when every token of it is within `allowed`
/// (`None` allows any), else `invalid_scope`. With nothing requested, everything allowed.
pub fn grant(requested: Option<&str>, allowed: Option<&[String]>) -> Result<String, Error> {
    match requested {
        None => Ok(allowed.map(|a| a.join(" ")).unwrap_or_default()),
        Some(requested) => {
            let tokens = parse(requested)?;
            if let Some(allowed) = allowed {
                if let Some(extra) = tokens.iter().find(|t| !allowed.iter().any(|a| a == *t)) {
                    return Err(Error::InvalidScope(
                        format!("scope `{extra}` is not allowed for this client").into(),
                    ));
                }
            }
            Ok(tokens.join(" "))
        }
    }
}

/// Narrowing on refresh (RFC 6749 §6): the new scope must be within the original grant.
pub fn narrow(requested: Option<&str>, original: &str) -> Result<String, Error> {
    match requested {
        None => Ok(original.to_owned()),
        Some(requested) => {
            let original: Vec<&str> = original.split(' ').collect();
            let tokens = parse(requested)?;
            if let Some(extra) = tokens.iter().find(|t| !original.contains(t)) {
                return Err(Error::InvalidScope(
                    format!("scope `{extra}` was not part of the original grant").into(),
                ));
            }
            Ok(tokens.join(" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(is_scope_token("read"));
        assert!(is_scope_token("urn:x:read!"));
        for bad in ["", "a b", "a\"b", "a\\b", "é"] {
            assert!(!is_scope_token(bad), "{bad}");
        }
    }

    #[test]
    fn granting() {
        let allowed = vec!["read".to_owned(), "write".to_owned()];
        assert_eq!(grant(None, Some(&allowed)).unwrap(), "read write");
        assert_eq!(
            grant(Some("write  read write"), Some(&allowed)).unwrap(),
            "write read"
        );
        assert_eq!(grant(Some("admin"), None).unwrap(), "admin");
        assert_eq!(grant(None, None).unwrap(), "");
        assert_eq!(
            grant(Some("read admin"), Some(&allowed))
                .unwrap_err()
                .code(),
            "invalid_scope"
        );
        assert_eq!(
            grant(Some("re\"ad"), None).unwrap_err().code(),
            "invalid_scope"
        );
    }

    #[test]
    fn narrowing() {
        assert_eq!(narrow(None, "read write").unwrap(), "read write");
        assert_eq!(narrow(Some("read"), "read write").unwrap(), "read");
        assert_eq!(
            narrow(Some("read admin"), "read write").unwrap_err().code(),
            "invalid_scope"
        );
        assert_eq!(
            narrow(Some("read"), "").unwrap_err().code(),
            "invalid_scope"
        );
    }
}
