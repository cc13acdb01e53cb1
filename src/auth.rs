//! Authentication and authorisation: JWT verification (HS256, RS256, ES256, JWKS),
//! the `caps` claim, and what a connection may do on a channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::channel::{pattern_matches, Channel};
use crate::config::{AuthConfig, Config, ConfigError};

/// An operation a capability can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Sub,
    Pub,
    History,
    Presence,
}

/// One entry of the `caps` claim: these permissions on channels matching these patterns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub channels: Vec<String>,
    pub allow: Vec<Permission>,
}

/// The claims switchyard reads; others are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caps: Vec<Capability>,
}

/// Who a verified token speaks for.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: Arc<str>,
    /// Token id, kept so a token can be revoked (shared with the connection index).
    pub jti: Option<Arc<str>>,
    /// Unix seconds.
    pub expires_at: u64,
    pub caps: Arc<[Capability]>,
}

impl Identity {
    /// Whether the token's capabilities grant `perm` on `channel`.
    pub fn granted(&self, perm: Permission, channel: &Channel) -> bool {
        self.caps.iter().any(|cap| {
            cap.allow.contains(&perm)
                && cap
                    .channels
                    .iter()
                    .any(|p| pattern_matches(p, &self.user, channel))
        })
    }
}

/// Why a token was refused; `code` is stable and documented in docs/protocol.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub code: u16,
    pub reason: &'static str,
}

impl AuthError {
    pub const MISSING: AuthError = AuthError {
        code: 201,
        reason: "token missing",
    };
    pub const INVALID: AuthError = AuthError {
        code: 202,
        reason: "token invalid",
    };
    pub const EXPIRED: AuthError = AuthError {
        code: 203,
        reason: "token expired",
    };
    pub const NOT_YET_VALID: AuthError = AuthError {
        code: 204,
        reason: "token not yet valid",
    };
    pub const WRONG_AUDIENCE: AuthError = AuthError {
        code: 205,
        reason: "token audience or issuer not accepted",
    };
    pub const REVOKED: AuthError = AuthError {
        code: 206,
        reason: "token revoked",
    };
    /// The user id reaches NATS headers and Redis keys: it must fit their grammar.
    pub const BAD_SUBJECT: AuthError = AuthError {
        code: 207,
        reason: "token subject (`sub`) must be 1 to 255 bytes of visible ASCII",
    };
}

/// Verifies tokens with the keys from `[auth]`.
pub struct Verifier {
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ec: Option<DecodingKey>,
    jwks: HashMap<String, (DecodingKey, Algorithm)>,
    /// One per algorithm: jsonwebtoken refuses a validation listing algorithms of another key family.
    validations: HashMap<Algorithm, Validation>,
}

fn read_key(path: &std::path::Path, key: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError(format!("`{key}`: cannot read {}: {e}", path.display())))
}

fn not_a_key(key: &str, path: &std::path::Path, e: jsonwebtoken::errors::Error) -> ConfigError {
    ConfigError(format!(
        "`{key}`: {} is not a PEM public key: {e}",
        path.display()
    ))
}

impl Verifier {
    /// Loads the configured keys; a key that cannot be read or parsed is a config error.
    pub fn from_config(cfg: &AuthConfig) -> Result<Verifier, ConfigError> {
        let hmac = (!cfg.hmac_secret.is_empty())
            .then(|| DecodingKey::from_secret(cfg.hmac_secret.as_bytes()));
        let rsa = match &cfg.rsa_public_key {
            Some(path) => Some(
                DecodingKey::from_rsa_pem(&read_key(path, "auth.rsa_public_key")?)
                    .map_err(|e| not_a_key("auth.rsa_public_key", path, e))?,
            ),
            None => None,
        };
        let ec = match &cfg.ec_public_key {
            Some(path) => Some(
                DecodingKey::from_ec_pem(&read_key(path, "auth.ec_public_key")?)
                    .map_err(|e| not_a_key("auth.ec_public_key", path, e))?,
            ),
            None => None,
        };
        let mut jwks = HashMap::new();
        if let Some(path) = &cfg.jwks_file {
            let text = read_key(path, "auth.jwks_file")?;
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&text).map_err(|e| {
                ConfigError(format!(
                    "`auth.jwks_file`: {} is not a JWK set: {e}",
                    path.display()
                ))
            })?;
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    return Err(ConfigError(
                        "`auth.jwks_file`: every key needs a `kid`".into(),
                    ));
                };
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                    _ => {
                        return Err(ConfigError(format!(
                            "`auth.jwks_file`: key {kid}: only RSA, EC P-256 and oct keys are supported"
                        )))
                    }
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| ConfigError(format!("`auth.jwks_file`: key {kid}: {e}")))?;
                jwks.insert(kid, (key, alg));
            }
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = cfg.leeway.as_secs();
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        let validations = [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256]
            .into_iter()
            .map(|alg| {
                let mut v = validation.clone();
                v.algorithms = vec![alg];
                (alg, v)
            })
            .collect();
        Ok(Verifier {
            hmac,
            rsa,
            ec,
            jwks,
            validations,
        })
    }

    /// Verifies a token and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::MISSING);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::INVALID)?;
        let key = match header.kid.as_deref().and_then(|kid| self.jwks.get(kid)) {
            Some((key, alg)) if *alg == header.alg => key,
            Some(_) => return Err(AuthError::INVALID),
            None => match header.alg {
                Algorithm::HS256 => self.hmac.as_ref(),
                Algorithm::RS256 => self.rsa.as_ref(),
                Algorithm::ES256 => self.ec.as_ref(),
                _ => None,
            }
            .ok_or(AuthError::INVALID)?,
        };
        let validation = self
            .validations
            .get(&header.alg)
            .ok_or(AuthError::INVALID)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::EXPIRED,
                ErrorKind::ImmatureSignature => AuthError::NOT_YET_VALID,
                ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => AuthError::WRONG_AUDIENCE,
                _ => AuthError::INVALID,
            })?;
        let claims = data.claims;
        if !crate::ids::is_valid_user(&claims.sub) {
            return Err(AuthError::BAD_SUBJECT);
        }
        Ok(Identity {
            user: Arc::from(claims.sub),
            jti: claims.jti.map(Arc::from),
            expires_at: claims.exp,
            caps: Arc::from(claims.caps),
        })
    }
}

/// Mints an HS256 token with the configured secret (for `switchyard token` and tests).
pub fn mint(
    config: &Config,
    user: &str,
    ttl: Duration,
    caps: Vec<Capability>,
) -> Result<String, ConfigError> {
    if config.auth.hmac_secret.is_empty() {
        return Err(ConfigError(
            "`auth.hmac_secret` is empty: cannot mint tokens".into(),
        ));
    }
    if !crate::ids::is_valid_user(user) {
        return Err(ConfigError(AuthError::BAD_SUBJECT.reason.into()));
    }
    let now = crate::clock::unix_now();
    let claims = Claims {
        sub: user.to_string(),
        exp: now + ttl.as_secs().max(1),
        nbf: None,
        iat: Some(now),
        jti: Some(format!("{:016x}", fastrand::u64(..))),
        iss: config.auth.issuer.clone(),
        aud: config.auth.audience.clone(),
        caps,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(config.auth.hmac_secret.as_bytes()),
    )
    .map_err(|e| ConfigError(format!("cannot sign token: {e}")))
}

/// Parses `--caps` values of the form `pattern[,pattern]=perm[+perm]`, e.g. `chat.>=sub+pub`.
pub fn parse_cap(text: &str) -> Result<Capability, String> {
    let (channels, perms) = text.split_once('=').ok_or_else(|| {
        format!("capability {text:?}: expected PATTERNS=PERMS, e.g. chat.>=sub+pub")
    })?;
    let allow = perms
        .split('+')
        .map(|p| match p {
            "sub" => Ok(Permission::Sub),
            "pub" => Ok(Permission::Pub),
            "history" => Ok(Permission::History),
            "presence" => Ok(Permission::Presence),
            other => Err(format!(
                "unknown permission {other:?} (sub, pub, history, presence)"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Capability {
        channels: channels.split(',').map(str::to_string).collect(),
        allow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_verifies() {
        let mut config = Config::default();
        config.auth.hmac_secret = "0123456789abcdef0123".into();
        let token = mint(&config, "alice", Duration::from_secs(60), vec![]).unwrap();
        let v = Verifier::from_config(&config.auth).unwrap();
        assert_eq!(&*v.verify(&token).unwrap().user, "alice");
    }
}
