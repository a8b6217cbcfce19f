//! Device tokens: verifying the JWT a device presents in its Auth frame, and minting one.
//!
//! A token is a JWT whose claims name the device: `sub` (the user, a decimal `u64` string
//! other than "0", or a JSON number), `dev` (the device, a `u32` as a JSON number or a
//! decimal string) and `exp` (Unix seconds). The gateway only verifies tokens; [`TokenSigner`]
//! exists for the gateway's `token` command, loadgen and tests.
//!
//! Keys and `kid`: a [`TokenVerifier`] holds a key set of 1 to [`VERIFICATION_KEYS_MAX`]
//! keys, so that keys rotate without a restart (the gateway reloads the set on SIGHUP).
//! A set is one of two shapes, and which key checks a token follows from it:
//! - **One key without an id** (the single-key setup, [`TokenVerifier::new`]): every token
//!   is checked with that key, with or without a `kid` in its header, as before key sets
//!   existed, so that issuers can stamp a `kid` before the gateway names its keys.
//! - **Keys with ids** (every key has a distinct id, [`TokenVerifier::with_key_set`], even
//!   a set of one): a token must name its key in the header's `kid`, compared byte for
//!   byte. No `kid` is [`AuthError::MissingKeyId`], a `kid` naming no key of the set is
//!   [`AuthError::UnknownKeyId`]; both are `BadToken` on the wire.
//!
//! A set mixing a key without an id with others is refused when it is built, so a token
//! without `kid` is accepted only when exactly one key, without an id, is configured.
//!
//! Invariants:
//! - Each key verifies exactly one algorithm, its own (HS256 or EdDSA). The token's `kid`
//!   only selects a key; its `alg` must then be that key's algorithm. `alg: none`, any
//!   other algorithm, or an `alg` that differs from the selected key's is rejected, so an
//!   HS256 token naming an Ed25519 key (the classic algorithm confusion) never verifies.
//! - Nothing here reads a clock. The JWT library's own `exp`/`nbf` checks read the system
//!   clock, so they are switched off and `exp` is checked here against the `now` the
//!   driver passes in, with an explicit leeway.
//! - A token longer than the configured bound is rejected before any of it is parsed.
//! - Claims are looked at only after the signature has been verified; of the header,
//!   only `alg`, `kid` and `crit` are used.
//! - Error messages never echo the token, its `kid` or claim values, only what was wrong.
//!
//! Left to others: loading keys from files or config (the gateway), the Auth deadline and
//! the Error frame that carries [`AuthError::code`] (the session), and the clock (drivers).
//! Claims other than `sub`, `dev` and `exp` are ignored, except that a token carrying `aud`
//! is rejected (see [`TokenVerifier::new`]); `nbf` and `iat` are not checked.
//!
//! Clock and randomness audit of jsonwebtoken 11.1.0 (read from its source for this file):
//! the only clock read in the crate is `get_current_timestamp` (validation.rs), and
//! `validate` calls it only when `validate_exp || validate_nbf`; both are false here. Header
//! parsing, HMAC-SHA256 and Ed25519 verification and claims deserialization read no time.
//! HS256 and Ed25519 signing draw no randomness (only RSA signing uses `thread_rng`).
//! `Validation` holds std `HashSet`s, whose `RandomState` is seeded from the OS; that seed
//! only orders iteration inside the library and never changes a result, so verification
//! stays deterministic.

use crate::proto::{DeviceId, ErrorCode, UserId};
use crate::Instant;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The shortest HS256 secret accepted. RFC 7518 section 3.2 requires a key at least as
/// long as the hash output (256 bits); a shorter secret makes tokens forgeable by search.
pub const HS256_SECRET_BYTES_MIN: usize = 32;

/// The most keys one [`TokenVerifier`] holds. A rotation needs the current key, the next
/// one and perhaps one being retired; 16 leaves room for a few issuers rotating at once,
/// while a misconfigured set (a whole directory of keys, a runaway deploy script) is
/// refused instead of being loaded into every shard.
pub const VERIFICATION_KEYS_MAX: usize = 16;

/// The longest key id accepted in a key set. 64 bytes: longer than the usual `kid`s (a
/// UUID is 36 characters, a base64url SHA-256 thumbprint 43), short enough to log.
pub const KEY_ID_BYTES_MAX: usize = 64;

/// Why a token (or a key) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is longer than the configured bound; none of it was parsed.
    #[error("token is {len} bytes, over the limit of {max} bytes")]
    TooLong {
        /// The token's length in bytes.
        len: usize,
        /// The configured bound.
        max: usize,
    },
    /// The token is not a well-formed JWT: not three base64url parts, or a header or claims
    /// that are not the expected JSON. An `alg` the library does not know (`none` among
    /// them) fails header parsing and lands here.
    #[error("token is not a well-formed JWT: {0}")]
    Malformed(&'static str),
    /// The header names a known algorithm other than the one this verifier accepts.
    #[error("token is signed with {found}, but only {expected} is accepted")]
    WrongAlgorithm {
        /// The algorithm of the verifier's key.
        expected: &'static str,
        /// The algorithm the token's header names.
        found: &'static str,
    },
    /// The verifier's keys have ids, and the token's header names none (no `kid`).
    #[error("token header has no `kid`, but the configured keys are selected by id")]
    MissingKeyId,
    /// The token's `kid` names none of the configured keys (the id is not repeated).
    #[error("token header's `kid` names none of the configured keys")]
    UnknownKeyId,
    /// The signature does not match the header and claims under the configured key.
    #[error("token signature does not match its contents under the configured key")]
    BadSignature,
    /// A claim this gateway needs is absent (or null).
    #[error("token has no `{0}` claim")]
    MissingClaim(&'static str),
    /// A claim is present but its value cannot be used.
    #[error("token claim `{claim}` is invalid: {reason}")]
    BadClaim {
        /// The claim's name.
        claim: &'static str,
        /// What is wrong with its value (the value itself is not repeated).
        reason: &'static str,
    },
    /// The token expired before `now`, beyond the allowed leeway.
    #[error("token expired at {exp_secs} (Unix seconds); it is now {now_secs}")]
    Expired {
        /// The token's `exp` claim.
        exp_secs: u64,
        /// The driver's time when the token was checked, in Unix seconds.
        now_secs: u64,
    },
    /// A key or key set given to [`TokenVerifier::new`], [`TokenVerifier::with_key_set`] or
    /// [`TokenSigner::new`] cannot be used.
    #[error("key cannot be used: {0}")]
    BadKey(String),
    /// The JWT library refused the token for a reason none of the variants above names.
    #[error("token rejected: {0}")]
    Rejected(String),
}

impl AuthError {
    /// The wire code for this error: `TokenExpired` for an expired token, `BadToken` for
    /// everything else.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Expired { .. } => ErrorCode::TokenExpired,
            AuthError::TooLong { .. }
            | AuthError::Malformed(_)
            | AuthError::WrongAlgorithm { .. }
            | AuthError::MissingKeyId
            | AuthError::UnknownKeyId
            | AuthError::BadSignature
            | AuthError::MissingClaim(_)
            | AuthError::BadClaim { .. }
            | AuthError::BadKey(_)
            | AuthError::Rejected(_) => ErrorCode::BadToken,
        }
    }
}

/// The key a gateway verifies tokens with.
#[derive(Clone, PartialEq, Eq)]
pub enum KeyConfig {
    /// A shared secret for HMAC-SHA256, at least [`HS256_SECRET_BYTES_MIN`] bytes.
    Hs256 {
        /// The raw secret bytes.
        secret: Vec<u8>,
    },
    /// An Ed25519 public key, PEM-encoded (`-----BEGIN PUBLIC KEY-----`, as written by
    /// `openssl pkey -pubout`).
    EdDsa {
        /// The PEM text.
        public_key_pem: Vec<u8>,
    },
}

impl fmt::Debug for KeyConfig {
    // The secret never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyConfig::Hs256 { secret } => f
                .debug_struct("Hs256")
                .field("secret_bytes", &secret.len())
                .finish_non_exhaustive(),
            KeyConfig::EdDsa { .. } => f.write_str("EdDsa { public_key_pem: .. }"),
        }
    }
}

/// The key tokens are minted with.
#[derive(Clone, PartialEq, Eq)]
pub enum SigningKey {
    /// A shared secret for HMAC-SHA256, at least [`HS256_SECRET_BYTES_MIN`] bytes.
    Hs256 {
        /// The raw secret bytes.
        secret: Vec<u8>,
    },
    /// An Ed25519 private key, PEM-encoded PKCS#8 (`-----BEGIN PRIVATE KEY-----`, as
    /// written by `openssl genpkey -algorithm ed25519`).
    EdDsa {
        /// The PEM text.
        private_key_pem: Vec<u8>,
    },
}

impl fmt::Debug for SigningKey {
    // The key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SigningKey::Hs256 { secret } => f
                .debug_struct("Hs256")
                .field("secret_bytes", &secret.len())
                .finish_non_exhaustive(),
            SigningKey::EdDsa { .. } => f.write_str("EdDsa { private_key_pem: .. }"),
        }
    }
}

/// Who a verified token names, and until when it is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The `sub` claim.
    pub user: UserId,
    /// The `dev` claim.
    pub device: DeviceId,
    /// The `exp` claim (whole seconds, as milliseconds). The leeway is not added.
    pub expires: Instant,
}

/// One key of a verifier's key set: the key and the id tokens name it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerificationKey {
    /// The id a token's header names in `kid` to be checked with this key: non-empty, at
    /// most [`KEY_ID_BYTES_MAX`] bytes of printable ASCII without spaces. `None` only for
    /// the one key of a single-key set (see the module docs).
    pub kid: Option<String>,
    /// The key, and with it the one algorithm it verifies.
    pub key: KeyConfig,
}

/// Checks tokens against a key set (one algorithm per key) and a caller-given time.
#[derive(Clone, Debug)]
pub struct TokenVerifier {
    keys: Keys,
    leeway_secs: u64,
    token_bytes_max: usize,
}

/// A verifier's keys, in one of the two shapes the module docs describe.
#[derive(Clone, Debug)]
enum Keys {
    /// One key without an id: every token is checked with it, whatever its `kid`.
    Single(Box<Key>),
    /// Keys by id: a token is checked with the key its `kid` names, and no other. A
    /// `BTreeMap`, not a `HashMap`: core iterates no randomly seeded map.
    ById(BTreeMap<String, Key>),
}

/// One usable key: proven to build a verifier, and bound to its algorithm.
#[derive(Clone, Debug)]
struct Key {
    decoding: DecodingKey,
    algorithm: Algorithm,
    /// Accepts `algorithm` only.
    validation: Validation,
}

impl Key {
    fn new(key: &KeyConfig) -> Result<Key, AuthError> {
        let (decoding, algorithm) = match key {
            KeyConfig::Hs256 { secret } => {
                check_hs256_secret(secret)?;
                (DecodingKey::from_secret(secret), Algorithm::HS256)
            }
            KeyConfig::EdDsa { public_key_pem } => {
                let decoding_key = DecodingKey::from_ed_pem(public_key_pem).map_err(|e| {
                    AuthError::BadKey(format!("not an Ed25519 public key in PEM: {e}"))
                })?;
                // jsonwebtoken builds its Ed25519 verifier from `bytes[..32]`, which panics
                // on a shorter key and silently ignores the rest of a longer one. An
                // Ed25519 public key is exactly 32 bytes, so check that here, once.
                let len = decoding_key
                    .try_get_as_bytes()
                    .map_err(|e| AuthError::BadKey(e.to_string()))?
                    .len();
                if len != 32 {
                    return Err(AuthError::BadKey(format!(
                        "an Ed25519 public key is 32 bytes, this one is {len}"
                    )));
                }
                (decoding_key, Algorithm::EdDSA)
            }
        };
        // The library builds its verifier from the key on every decode; building one now
        // turns a key it would refuse (say, 32 bytes that are not a curve point) into an
        // error at start-up instead of a rejection of every token.
        jsonwebtoken::crypto::verify("", b"", &decoding, algorithm)
            .map_err(|e| AuthError::BadKey(e.to_string()))?;

        let mut validation = Validation::new(algorithm);
        // These two checks read the system clock; `verify` checks `exp` against `now`.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        // `verify` requires sub, dev and exp itself, so that it can say which one is missing.
        validation.required_spec_claims.clear();
        assert_eq!(validation.algorithms, [algorithm], "one algorithm per key");
        Ok(Key {
            decoding,
            algorithm,
            validation,
        })
    }
}

impl TokenVerifier {
    /// A verifier with a single key and no key id (the single-key setup): tokens signed
    /// with `key`'s algorithm and key, whatever their `kid`. It accepts a token up to
    /// `leeway` (whole seconds count) past its `exp`, and refuses tokens longer than
    /// `token_bytes_max` bytes (normally [`crate::Limits::token_bytes_max`]).
    ///
    /// A token carrying an `aud` claim is rejected: the JWT library refuses audience-bound
    /// tokens when no audience is configured, and imgate configures none, so a token minted
    /// for another service under the same key is not taken for one of ours.
    pub fn new(
        key: &KeyConfig,
        leeway: Duration,
        token_bytes_max: usize,
    ) -> Result<TokenVerifier, AuthError> {
        Ok(TokenVerifier {
            keys: Keys::Single(Box::new(Key::new(key)?)),
            leeway_secs: leeway.as_secs(),
            token_bytes_max,
        })
    }

    /// A verifier for a key set, otherwise as [`TokenVerifier::new`]. The set is either one
    /// key without an id (the same as [`TokenVerifier::new`]) or 1 to
    /// [`VERIFICATION_KEYS_MAX`] keys that all have distinct, well-formed ids; anything
    /// else, or any key that cannot be used, is [`AuthError::BadKey`] naming the key.
    pub fn with_key_set(
        keys: &[VerificationKey],
        leeway: Duration,
        token_bytes_max: usize,
    ) -> Result<TokenVerifier, AuthError> {
        if keys.is_empty() {
            return Err(AuthError::BadKey("the key set is empty".to_owned()));
        }
        if keys.len() > VERIFICATION_KEYS_MAX {
            return Err(AuthError::BadKey(format!(
                "the key set has {} keys, over the limit of {VERIFICATION_KEYS_MAX}",
                keys.len()
            )));
        }
        if let [VerificationKey { kid: None, key }] = keys {
            return TokenVerifier::new(key, leeway, token_bytes_max);
        }
        let mut by_id = BTreeMap::new();
        for (i, entry) in keys.iter().enumerate() {
            let Some(kid) = &entry.kid else {
                return Err(AuthError::BadKey(format!(
                    "key {} of {} has no id; only a set of one key may leave out its id",
                    i + 1,
                    keys.len()
                )));
            };
            check_key_id(kid).map_err(|why| {
                AuthError::BadKey(format!("key {} of {}: {why}", i + 1, keys.len()))
            })?;
            let key =
                Key::new(&entry.key).map_err(|e| AuthError::BadKey(format!("key `{kid}`: {e}")))?;
            if by_id.insert(kid.clone(), key).is_some() {
                return Err(AuthError::BadKey(format!(
                    "the key id `{kid}` is used twice"
                )));
            }
        }
        Ok(TokenVerifier {
            keys: Keys::ById(by_id),
            leeway_secs: leeway.as_secs(),
            token_bytes_max,
        })
    }

    /// The ids of the keys, in order; none for a single key without an id.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        let by_id = match &self.keys {
            Keys::Single(_) => None,
            Keys::ById(keys) => Some(keys.keys().map(String::as_str)),
        };
        by_id.into_iter().flatten()
    }

    /// Checks `token`'s size, key id, algorithm, signature and claims, and that it has not
    /// expired at `now` (expired iff `exp + leeway < now`, in whole seconds).
    pub fn verify(&self, token: &str, now: Instant) -> Result<Identity, AuthError> {
        if token.len() > self.token_bytes_max {
            return Err(AuthError::TooLong {
                len: token.len(),
                max: self.token_bytes_max,
            });
        }
        let key = self.key_for(token)?;
        let data = jsonwebtoken::decode::<RawClaims>(token, &key.decoding, &key.validation)
            .map_err(|e| decode_error(token, key.algorithm, e))?;
        // RFC 7515 4.1.11: a recipient must reject a token whose `crit` names extensions it
        // does not understand. imgate understands none; the library does not check `crit`.
        if data.header.crit.is_some() {
            return Err(AuthError::Malformed(
                "the header lists critical extensions (`crit`), which are not supported",
            ));
        }
        let claims = data.claims;
        let user = parse_id("sub", claims.sub)?;
        if user == 0 {
            return Err(AuthError::BadClaim {
                claim: "sub",
                reason: "user 0 is not a user",
            });
        }
        let device =
            u32::try_from(parse_id("dev", claims.dev)?).map_err(|_| AuthError::BadClaim {
                claim: "dev",
                reason: "out of the range of device ids (u32)",
            })?;
        let exp_secs = parse_exp(claims.exp)?;
        let Some(expires) = exp_secs.checked_mul(1000).map(Instant::from_millis) else {
            return Err(AuthError::BadClaim {
                claim: "exp",
                reason: "too far in the future to represent",
            });
        };
        let now_secs = now.as_unix_secs();
        if exp_secs.saturating_add(self.leeway_secs) < now_secs {
            return Err(AuthError::Expired { exp_secs, now_secs });
        }
        Ok(Identity {
            user: UserId(user),
            device: DeviceId(device),
            expires,
        })
    }

    /// The key `token` is checked with: the single key, or the one its `kid` names. Only
    /// the header is read here; the signature is checked by the caller, with this key.
    fn key_for(&self, token: &str) -> Result<&Key, AuthError> {
        match &self.keys {
            Keys::Single(key) => Ok(key),
            Keys::ById(keys) => {
                let header = jsonwebtoken::decode_header(token).map_err(|e| {
                    malformed(&e).unwrap_or_else(|| AuthError::Rejected(e.to_string()))
                })?;
                let kid = header.kid.ok_or(AuthError::MissingKeyId)?;
                keys.get(&kid).ok_or(AuthError::UnknownKeyId)
            }
        }
    }
}

/// Translates the library's refusal of `token` under a key for `expected` into ours,
/// without echoing the token.
fn decode_error(token: &str, expected: Algorithm, e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    if let Some(malformed) = malformed(&e) {
        return malformed;
    }
    match e.kind() {
        ErrorKind::InvalidAlgorithm => {
            // The header parsed (the library read it to compare algorithms), so reading
            // it again only names what it found.
            let found = jsonwebtoken::decode_header(token)
                .map(|h| algorithm_name(h.alg))
                .unwrap_or("an unknown algorithm");
            AuthError::WrongAlgorithm {
                expected: algorithm_name(expected),
                found,
            }
        }
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAudience => AuthError::BadClaim {
            claim: "aud",
            reason: "audience-bound tokens are not accepted",
        },
        // `Key::new` proved the key usable, so these mean the library changed under us.
        ErrorKind::InvalidKeyFormat | ErrorKind::InvalidEddsaKey => {
            AuthError::BadKey(e.to_string())
        }
        _ => AuthError::Rejected(e.to_string()),
    }
}

/// The library's refusals of a token that is not a well-formed JWT, as ours.
fn malformed(e: &jsonwebtoken::errors::Error) -> Option<AuthError> {
    use jsonwebtoken::errors::ErrorKind;
    Some(match e.kind() {
        ErrorKind::InvalidToken => AuthError::Malformed("not three dot-separated parts"),
        ErrorKind::Base64(_) => AuthError::Malformed("a part is not unpadded base64url"),
        ErrorKind::Utf8(_) => AuthError::Malformed("a part is not UTF-8"),
        ErrorKind::Json(_) => AuthError::Malformed(
            "the header or claims are not a JSON object of the expected shape, \
             or the header names an unsupported `alg`",
        ),
        _ => return None,
    })
}

/// A key id of a key set: non-empty, at most [`KEY_ID_BYTES_MAX`] bytes, printable ASCII
/// without spaces, so that it reads the same in a config file, a log line and a header.
fn check_key_id(kid: &str) -> Result<(), String> {
    if kid.is_empty() {
        return Err("the key id is empty".to_owned());
    }
    if kid.len() > KEY_ID_BYTES_MAX {
        return Err(format!(
            "the key id is {} bytes, over the limit of {KEY_ID_BYTES_MAX}",
            kid.len()
        ));
    }
    if !kid.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a key id may hold only printable ASCII without spaces".to_owned());
    }
    Ok(())
}

/// Mints tokens that a [`TokenVerifier`] with the matching key accepts; with
/// [`TokenSigner::with_kid`], tokens that name their key for a key set.
#[derive(Clone, Debug)]
pub struct TokenSigner {
    key: EncodingKey,
    header: Header,
}

impl TokenSigner {
    /// A signer for `key`. The key is tried once here, so that [`TokenSigner::mint`]
    /// cannot fail later.
    pub fn new(key: &SigningKey) -> Result<TokenSigner, AuthError> {
        let (encoding_key, algorithm) = match key {
            SigningKey::Hs256 { secret } => {
                check_hs256_secret(secret)?;
                (EncodingKey::from_secret(secret), Algorithm::HS256)
            }
            SigningKey::EdDsa { private_key_pem } => {
                let encoding_key = EncodingKey::from_ed_pem(private_key_pem).map_err(|e| {
                    AuthError::BadKey(format!("not an Ed25519 private key in PKCS#8 PEM: {e}"))
                })?;
                (encoding_key, Algorithm::EdDSA)
            }
        };
        let signer = TokenSigner {
            key: encoding_key,
            header: Header::new(algorithm),
        };
        signer
            .try_mint(UserId(1), DeviceId(0), Instant::from_millis(0))
            .map_err(|e| AuthError::BadKey(e.to_string()))?;
        Ok(signer)
    }

    /// The same signer, naming `kid` in the header of every token it mints, so that a
    /// verifier with a key set checks them with the key of that id. The id is not checked
    /// here: tests mint tokens naming ids no verifier has.
    pub fn with_kid(mut self, kid: impl Into<String>) -> TokenSigner {
        // A header with one more string field serializes as surely as the one `new` tried.
        self.header.kid = Some(kid.into());
        self
    }

    /// A token for `user`'s `device`, valid until `expires` (rounded down to whole seconds):
    /// `sub` as a decimal string, `dev` as a number, `exp` in Unix seconds.
    pub fn mint(&self, user: UserId, device: DeviceId, expires: Instant) -> String {
        assert!(user.0 != 0, "user 0 is not a user");
        // `new` minted a token with this key and header. What can fail in `encode` depends
        // only on those (key family, key parsing, which the library's fixed crypto provider
        // does the same way each time) or on serializing these three plain fields, which
        // cannot fail; HMAC and Ed25519 signing are infallible.
        self.try_mint(user, device, expires)
            .expect("signing was proven to work with this key in TokenSigner::new")
    }

    fn try_mint(
        &self,
        user: UserId,
        device: DeviceId,
        expires: Instant,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = MintedClaims {
            sub: user.0.to_string(),
            dev: device.0,
            exp: expires.as_unix_secs(),
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key)
    }
}

/// The claims a minted token carries.
#[derive(Serialize)]
struct MintedClaims {
    sub: String,
    dev: u32,
    exp: u64,
}

/// The claims `verify` reads. Each is parsed leniently here and judged in `verify`, so a
/// claim of the wrong type is reported by name instead of as unparseable JSON.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Option<ClaimValue>,
    #[serde(default)]
    dev: Option<ClaimValue>,
    #[serde(default)]
    exp: Option<ClaimValue>,
}

/// A claim's JSON value, sorted into the shapes `verify` distinguishes.
#[derive(Deserialize)]
#[serde(untagged)]
enum ClaimValue {
    /// A non-negative integer that fits in a u64.
    Integer(u64),
    /// Any other JSON number (negative, fractional, or too large for a u64).
    Number(f64),
    /// A JSON string.
    Text(String),
    /// Anything else: a boolean, an array, an object.
    Other(IgnoredAny),
}

fn check_hs256_secret(secret: &[u8]) -> Result<(), AuthError> {
    if secret.len() < HS256_SECRET_BYTES_MIN {
        return Err(AuthError::BadKey(format!(
            "an HS256 secret must be at least {HS256_SECRET_BYTES_MIN} bytes, this one is {}",
            secret.len()
        )));
    }
    Ok(())
}

/// An id claim: a JSON integer, or a decimal string in canonical form.
fn parse_id(claim: &'static str, value: Option<ClaimValue>) -> Result<u64, AuthError> {
    match value {
        None => Err(AuthError::MissingClaim(claim)),
        Some(ClaimValue::Integer(n)) => Ok(n),
        Some(ClaimValue::Text(s)) => parse_decimal(&s).ok_or(AuthError::BadClaim {
            claim,
            reason: "not a decimal integer (digits only, no sign or leading zero) in range",
        }),
        Some(ClaimValue::Number(_)) => Err(AuthError::BadClaim {
            claim,
            reason: "not a non-negative integer in range",
        }),
        Some(ClaimValue::Other(_)) => Err(AuthError::BadClaim {
            claim,
            reason: "neither a number nor a decimal string",
        }),
    }
}

/// A u64 written as a canonical decimal: digits only, no sign, no leading zero. Rust's
/// `parse` alone would also accept "+5", so the digits are checked first.
fn parse_decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// `exp` as whole Unix seconds. RFC 7519 allows a fractional NumericDate; the fraction is
/// dropped, which can only make the token expire earlier.
fn parse_exp(value: Option<ClaimValue>) -> Result<u64, AuthError> {
    // 2^64 as an f64: every non-negative f64 below it converts to a u64 exactly (floored).
    const U64_END: f64 = 18_446_744_073_709_551_616.0;
    match value {
        None => Err(AuthError::MissingClaim("exp")),
        Some(ClaimValue::Integer(secs)) => Ok(secs),
        Some(ClaimValue::Number(secs)) if (0.0..U64_END).contains(&secs) => Ok(secs as u64),
        Some(ClaimValue::Number(_)) => Err(AuthError::BadClaim {
            claim: "exp",
            reason: "negative or too large",
        }),
        Some(ClaimValue::Text(_) | ClaimValue::Other(_)) => Err(AuthError::BadClaim {
            claim: "exp",
            reason: "not a number of seconds since the Unix epoch",
        }),
    }
}

/// The JOSE name of an algorithm, for error messages.
fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        // `Algorithm` is non-exhaustive; a newer library may know more names.
        _ => "another algorithm",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::json;

    /// A fixed Ed25519 keypair made for these tests with `openssl genpkey -algorithm ed25519`
    /// and `openssl pkey -pubout`. It signs nothing outside this file.
    const ED_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIOBruIBoTB10R8+nWhv/VpNeGPLObdzANU6/Zt8LixOO
-----END PRIVATE KEY-----
";
    const ED_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAQpEfO7dtFFlfdyVV4xUEvdLaDqaXppJtBKJ08+cZ3ug=
-----END PUBLIC KEY-----
";
    /// The public half of another Ed25519 keypair, whose private half was thrown away.
    const ED_OTHER_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAodoerquL9E6wSlJ/hxS14O0dmNZuAvkfgjPnHzWSVmI=
-----END PUBLIC KEY-----
";
    const SECRET: &[u8] = b"imgate-test-secret-of-32-bytes!!";
    const OTHER_SECRET: &[u8] = b"another-test-secret-of-32-bytes!";
    const LEEWAY: Duration = Duration::from_secs(30);
    const TOKEN_BYTES_MAX: usize = 4096;
    /// The driver's time in every test: 2023-11-14T22:13:20Z.
    const NOW: Instant = Instant::from_millis(1_700_000_000_000);
    const NOW_SECS: u64 = 1_700_000_000;
    /// An hour after NOW, in whole seconds so that it survives minting unchanged.
    const LATER: Instant = Instant::from_millis(1_700_003_600_000);

    fn hs_verifier() -> TokenVerifier {
        let key = KeyConfig::Hs256 {
            secret: SECRET.to_vec(),
        };
        TokenVerifier::new(&key, LEEWAY, TOKEN_BYTES_MAX).unwrap()
    }

    fn hs_signer(secret: &[u8]) -> TokenSigner {
        TokenSigner::new(&SigningKey::Hs256 {
            secret: secret.to_vec(),
        })
        .unwrap()
    }

    fn ed_verifier(public_key_pem: &str) -> TokenVerifier {
        let key = KeyConfig::EdDsa {
            public_key_pem: public_key_pem.as_bytes().to_vec(),
        };
        TokenVerifier::new(&key, LEEWAY, TOKEN_BYTES_MAX).unwrap()
    }

    fn ed_signer() -> TokenSigner {
        TokenSigner::new(&SigningKey::EdDsa {
            private_key_pem: ED_PRIVATE_PEM.as_bytes().to_vec(),
        })
        .unwrap()
    }

    /// An HS256 token over arbitrary claims, for claims `mint` would never write.
    fn hs_token_with_claims(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn identity(user: u64, device: u32, expires: Instant) -> Identity {
        Identity {
            user: UserId(user),
            device: DeviceId(device),
            expires,
        }
    }

    fn bad_claim(claim: &'static str, token: &str) {
        match hs_verifier().verify(token, NOW) {
            Err(AuthError::BadClaim { claim: c, .. }) if c == claim => {}
            other => {
                let claims = URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap());
                let claims = String::from_utf8(claims.unwrap()).unwrap();
                panic!("expected a bad `{claim}` claim in {claims}, got {other:?}")
            }
        }
    }

    #[test]
    fn hs256_token_round_trips_to_the_same_identity() {
        let token = hs_signer(SECRET).mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Ok(identity(42, 7, LATER))
        );
    }

    #[test]
    fn eddsa_token_round_trips_to_the_same_identity() {
        let token = ed_signer().mint(UserId(u64::MAX), DeviceId(u32::MAX), LATER);
        assert_eq!(
            ed_verifier(ED_PUBLIC_PEM).verify(&token, NOW),
            Ok(identity(u64::MAX, u32::MAX, LATER))
        );
    }

    #[test]
    fn minted_claims_are_sub_as_string_dev_as_number_exp_in_seconds() {
        let token = hs_signer(SECRET).mint(UserId(42), DeviceId(7), LATER);
        let claims = token.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(
            claims,
            json!({"sub": "42", "dev": 7, "exp": 1_700_003_600_u64})
        );
    }

    #[test]
    fn minted_expiry_is_rounded_down_to_whole_seconds() {
        let token =
            hs_signer(SECRET).mint(UserId(1), DeviceId(1), LATER + Duration::from_millis(999));
        assert_eq!(hs_verifier().verify(&token, NOW).unwrap().expires, LATER);
    }

    #[test]
    fn token_signed_with_another_secret_is_rejected() {
        let token = hs_signer(OTHER_SECRET).mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn token_signed_with_another_ed25519_key_is_rejected() {
        let token = ed_signer().mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            ed_verifier(ED_OTHER_PUBLIC_PEM).verify(&token, NOW),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn eddsa_token_is_rejected_by_an_hs256_verifier() {
        let token = ed_signer().mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Err(AuthError::WrongAlgorithm {
                expected: "HS256",
                found: "EdDSA"
            })
        );
    }

    #[test]
    fn hs256_token_is_rejected_by_an_eddsa_verifier() {
        let token = hs_signer(SECRET).mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            ed_verifier(ED_PUBLIC_PEM).verify(&token, NOW),
            Err(AuthError::WrongAlgorithm {
                expected: "EdDSA",
                found: "HS256"
            })
        );
    }

    #[test]
    fn hs384_token_under_the_same_secret_is_rejected() {
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "42", "dev": 7, "exp": NOW_SECS + 3600}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Err(AuthError::WrongAlgorithm {
                expected: "HS256",
                found: "HS384"
            })
        );
    }

    #[test]
    fn unsigned_alg_none_token_is_rejected() {
        let header = b64(r#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64(&format!(
            r#"{{"sub":"42","dev":7,"exp":{}}}"#,
            NOW_SECS + 3600
        ));
        let token = format!("{header}.{claims}.");
        let err = hs_verifier().verify(&token, NOW).unwrap_err();
        assert!(matches!(err, AuthError::Malformed(_)), "{err:?}");
        assert_eq!(err.code(), ErrorCode::BadToken);
        // The same claims under the same header with a real HS256 signature would pass:
        // what is rejected is the algorithm, not the claims.
        let signed = hs_token_with_claims(json!({"sub":"42","dev":7,"exp":NOW_SECS + 3600}));
        assert!(hs_verifier().verify(&signed, NOW).is_ok());
    }

    #[test]
    fn hs256_header_with_an_empty_signature_is_rejected() {
        let token = hs_signer(SECRET).mint(UserId(42), DeviceId(7), LATER);
        let unsigned = &token[..=token.rfind('.').unwrap()];
        assert_eq!(
            hs_verifier().verify(unsigned, NOW),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn token_expired_beyond_leeway_is_rejected_as_expired() {
        let exp = NOW_SECS - LEEWAY.as_secs() - 1;
        let token =
            hs_signer(SECRET).mint(UserId(42), DeviceId(7), Instant::from_millis(exp * 1000));
        let err = hs_verifier().verify(&token, NOW).unwrap_err();
        assert_eq!(
            err,
            AuthError::Expired {
                exp_secs: exp,
                now_secs: NOW_SECS
            }
        );
        assert_eq!(err.code(), ErrorCode::TokenExpired);
    }

    #[test]
    fn token_expired_within_leeway_is_accepted() {
        let exp = NOW_SECS - LEEWAY.as_secs();
        let expires = Instant::from_millis(exp * 1000);
        let token = hs_signer(SECRET).mint(UserId(42), DeviceId(7), expires);
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Ok(identity(42, 7, expires))
        );
    }

    #[test]
    fn expiry_is_judged_by_the_time_passed_in_not_the_system_clock() {
        // Expired for decades by any real clock, but valid at the time the driver says.
        let expires = Instant::from_millis(1_000_000_000);
        let token = hs_signer(SECRET).mint(UserId(42), DeviceId(7), expires);
        assert_eq!(
            hs_verifier().verify(&token, Instant::from_millis(999_000_000)),
            Ok(identity(42, 7, expires))
        );
        assert!(matches!(
            hs_verifier().verify(&token, NOW),
            Err(AuthError::Expired { .. })
        ));
    }

    #[test]
    fn fractional_exp_is_accepted_and_rounded_down() {
        let token = hs_token_with_claims(json!({"sub":"42","dev":7,"exp":1_700_003_600.75}));
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Ok(identity(42, 7, LATER))
        );
    }

    #[test]
    fn token_without_sub_is_rejected() {
        let token = hs_token_with_claims(json!({"dev":7,"exp":NOW_SECS + 60}));
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Err(AuthError::MissingClaim("sub"))
        );
    }

    #[test]
    fn token_without_dev_is_rejected() {
        let token = hs_token_with_claims(json!({"sub":"42","exp":NOW_SECS + 60}));
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Err(AuthError::MissingClaim("dev"))
        );
    }

    #[test]
    fn token_without_exp_is_rejected() {
        let token = hs_token_with_claims(json!({"sub":"42","dev":7}));
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Err(AuthError::MissingClaim("exp"))
        );
    }

    #[test]
    fn null_claim_counts_as_missing() {
        let token = hs_token_with_claims(json!({"sub":null,"dev":7,"exp":NOW_SECS + 60}));
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Err(AuthError::MissingClaim("sub"))
        );
    }

    #[test]
    fn numeric_sub_and_string_dev_are_accepted() {
        let token = hs_token_with_claims(json!({"sub":42,"dev":"7","exp":NOW_SECS + 3600}));
        assert_eq!(
            hs_verifier().verify(&token, NOW),
            Ok(identity(42, 7, LATER))
        );
    }

    #[test]
    fn user_zero_is_rejected() {
        bad_claim(
            "sub",
            &hs_token_with_claims(json!({"sub":"0","dev":7,"exp":NOW_SECS + 60})),
        );
        bad_claim(
            "sub",
            &hs_token_with_claims(json!({"sub":0,"dev":7,"exp":NOW_SECS + 60})),
        );
    }

    #[test]
    fn sub_that_is_not_a_decimal_integer_is_rejected() {
        for sub in [
            json!("alice"),
            json!(""),
            json!("+42"),
            json!("-42"),
            json!("042"),
            json!(" 42"),
            json!("18446744073709551616"),
            json!(-42),
            json!(42.5),
            json!(true),
        ] {
            bad_claim(
                "sub",
                &hs_token_with_claims(json!({"sub":sub,"dev":7,"exp":NOW_SECS + 60})),
            );
        }
    }

    #[test]
    fn sub_that_is_an_array_or_object_is_rejected() {
        // jsonwebtoken's own claim pre-check reads `sub` as a string and, on an array or
        // object, gives up without consuming it, which fails the whole claims JSON: such a
        // token is refused as malformed before `verify` sees the claim.
        for sub in [json!(["42"]), json!({"id": 42})] {
            let token = hs_token_with_claims(json!({"sub":sub,"dev":7,"exp":NOW_SECS + 60}));
            assert!(matches!(
                hs_verifier().verify(&token, NOW),
                Err(AuthError::Malformed(_))
            ));
        }
    }

    #[test]
    fn dev_out_of_u32_range_is_rejected() {
        for dev in [json!(4_294_967_296_u64), json!("4294967296"), json!(-1)] {
            bad_claim(
                "dev",
                &hs_token_with_claims(json!({"sub":"42","dev":dev,"exp":NOW_SECS + 60})),
            );
        }
    }

    #[test]
    fn exp_that_is_not_a_non_negative_number_is_rejected() {
        for exp in [json!("1700003600"), json!(-1), json!({})] {
            bad_claim(
                "exp",
                &hs_token_with_claims(json!({"sub":"42","dev":7,"exp":exp})),
            );
        }
    }

    #[test]
    fn exp_beyond_the_range_of_instant_is_rejected() {
        let exp = u64::MAX / 1000 + 1;
        bad_claim(
            "exp",
            &hs_token_with_claims(json!({"sub":"42","dev":7,"exp":exp})),
        );
    }

    #[test]
    fn audience_bound_token_is_rejected() {
        let token =
            hs_token_with_claims(json!({"sub":"42","dev":7,"exp":NOW_SECS + 60,"aud":"billing"}));
        bad_claim("aud", &token);
    }

    #[test]
    fn token_with_critical_header_extensions_is_rejected() {
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".to_owned()]);
        let token = jsonwebtoken::encode(
            &header,
            &json!({"sub":"42","dev":7,"exp":NOW_SECS + 60}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(matches!(
            hs_verifier().verify(&token, NOW),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn oversize_token_is_rejected_before_parsing() {
        let token = hs_signer(SECRET).mint(UserId(42), DeviceId(7), LATER);
        let key = KeyConfig::Hs256 {
            secret: SECRET.to_vec(),
        };
        let exact = TokenVerifier::new(&key, LEEWAY, token.len()).unwrap();
        assert!(exact.verify(&token, NOW).is_ok());
        let short = TokenVerifier::new(&key, LEEWAY, token.len() - 1).unwrap();
        assert_eq!(
            short.verify(&token, NOW),
            Err(AuthError::TooLong {
                len: token.len(),
                max: token.len() - 1
            })
        );
        // Far over the bound, even bytes that are not a token are never looked at.
        let huge = "x".repeat(TOKEN_BYTES_MAX + 1);
        assert!(matches!(
            hs_verifier().verify(&huge, NOW),
            Err(AuthError::TooLong { .. })
        ));
    }

    #[test]
    fn garbage_is_rejected_as_malformed() {
        for garbage in [
            "",
            "garbage",
            "a.b",
            "a.b.c.d",
            "!!!.???.###",
            "..",
            "\u{0}.\u{1}.\u{2}",
        ] {
            let err = hs_verifier().verify(garbage, NOW).unwrap_err();
            assert!(
                matches!(err, AuthError::Malformed(_)),
                "{garbage:?}: {err:?}"
            );
            assert_eq!(err.code(), ErrorCode::BadToken);
        }
    }

    #[test]
    fn token_with_tampered_claims_is_rejected() {
        let signer = hs_signer(SECRET);
        let token = signer.mint(UserId(42), DeviceId(7), LATER);
        let other = signer.mint(UserId(43), DeviceId(7), LATER);
        let parts: Vec<&str> = token.split('.').collect();
        let other_claims = other.split('.').nth(1).unwrap();
        let tampered = format!("{}.{}.{}", parts[0], other_claims, parts[2]);
        assert_eq!(
            hs_verifier().verify(&tampered, NOW),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn eddsa_token_with_tampered_claims_is_rejected() {
        let token = ed_signer().mint(UserId(42), DeviceId(7), LATER);
        let parts: Vec<&str> = token.split('.').collect();
        let claims = b64(&format!(
            r#"{{"sub":"1","dev":7,"exp":{}}}"#,
            NOW_SECS + 3600
        ));
        let tampered = format!("{}.{}.{}", parts[0], claims, parts[2]);
        assert_eq!(
            ed_verifier(ED_PUBLIC_PEM).verify(&tampered, NOW),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn error_messages_do_not_echo_the_token() {
        let signer = hs_signer(OTHER_SECRET);
        let wrong_key = signer.mint(UserId(42), DeviceId(7), LATER);
        let bad_sub =
            hs_token_with_claims(json!({"sub":"secret-user-name","dev":7,"exp":NOW_SECS}));
        let expired = hs_signer(SECRET).mint(UserId(42), DeviceId(7), Instant::from_millis(0));
        let not_json = format!("{}.{}.x", b64("secret-header"), b64("secret-claims"));
        for token in [wrong_key, bad_sub, expired, not_json] {
            let message = hs_verifier().verify(&token, NOW).unwrap_err().to_string();
            for part in token.split('.').filter(|p| p.len() > 1) {
                assert!(!message.contains(part), "{message:?} echoes {part:?}");
            }
            assert!(!message.contains("secret"), "{message:?}");
        }
    }

    #[test]
    fn every_error_but_expiry_maps_to_bad_token() {
        assert_eq!(AuthError::BadSignature.code(), ErrorCode::BadToken);
        assert_eq!(AuthError::MissingClaim("sub").code(), ErrorCode::BadToken);
        assert_eq!(
            AuthError::Expired {
                exp_secs: 1,
                now_secs: 2
            }
            .code(),
            ErrorCode::TokenExpired
        );
    }

    #[test]
    fn short_hs256_secret_is_refused() {
        let short = vec![7; HS256_SECRET_BYTES_MIN - 1];
        assert!(matches!(
            TokenVerifier::new(
                &KeyConfig::Hs256 {
                    secret: short.clone()
                },
                LEEWAY,
                TOKEN_BYTES_MAX
            ),
            Err(AuthError::BadKey(_))
        ));
        assert!(matches!(
            TokenSigner::new(&SigningKey::Hs256 { secret: short }),
            Err(AuthError::BadKey(_))
        ));
    }

    #[test]
    fn private_key_is_refused_as_a_verification_key_and_vice_versa() {
        let private_as_public = KeyConfig::EdDsa {
            public_key_pem: ED_PRIVATE_PEM.as_bytes().to_vec(),
        };
        assert!(matches!(
            TokenVerifier::new(&private_as_public, LEEWAY, TOKEN_BYTES_MAX),
            Err(AuthError::BadKey(_))
        ));
        let public_as_private = SigningKey::EdDsa {
            private_key_pem: ED_PUBLIC_PEM.as_bytes().to_vec(),
        };
        assert!(matches!(
            TokenSigner::new(&public_as_private),
            Err(AuthError::BadKey(_))
        ));
        let not_pem = KeyConfig::EdDsa {
            public_key_pem: b"not a key".to_vec(),
        };
        assert!(matches!(
            TokenVerifier::new(&not_pem, LEEWAY, TOKEN_BYTES_MAX),
            Err(AuthError::BadKey(_))
        ));
    }

    #[test]
    fn ed25519_public_key_of_the_wrong_length_is_refused() {
        // A SubjectPublicKeyInfo for Ed25519 (OID 1.3.101.112) around a key of `len` bytes.
        // jsonwebtoken would panic on the short one at the first token, and use only the
        // first 32 bytes of the long one.
        for len in [31_u8, 33] {
            let mut der = vec![0x30, len + 10, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
            der.extend([0x03, len + 1, 0x00]);
            der.extend(std::iter::repeat_n(0x42, usize::from(len)));
            let pem = format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                base64::engine::general_purpose::STANDARD.encode(&der)
            );
            let key = KeyConfig::EdDsa {
                public_key_pem: pem.into_bytes(),
            };
            match TokenVerifier::new(&key, LEEWAY, TOKEN_BYTES_MAX) {
                Err(AuthError::BadKey(why)) => assert!(why.contains("is 32 bytes"), "{why}"),
                other => panic!("a {len}-byte key gave {other:?}"),
            }
        }
    }

    #[test]
    fn key_debug_output_hides_the_secret() {
        let key = KeyConfig::Hs256 {
            secret: SECRET.to_vec(),
        };
        let signing = SigningKey::Hs256 {
            secret: SECRET.to_vec(),
        };
        let shown = format!("{key:?} {signing:?} {:?}", hs_verifier());
        assert!(!shown.contains("imgate-test-secret"), "{shown}");
    }

    // Key sets and `kid`.

    /// A set of two keys of different algorithms: `a` (HS256, SECRET) and `b` (EdDSA).
    fn key_set_a_b() -> TokenVerifier {
        TokenVerifier::with_key_set(
            &[
                VerificationKey {
                    kid: Some("a".to_owned()),
                    key: KeyConfig::Hs256 {
                        secret: SECRET.to_vec(),
                    },
                },
                VerificationKey {
                    kid: Some("b".to_owned()),
                    key: KeyConfig::EdDsa {
                        public_key_pem: ED_PUBLIC_PEM.as_bytes().to_vec(),
                    },
                },
            ],
            LEEWAY,
            TOKEN_BYTES_MAX,
        )
        .unwrap()
    }

    fn hs_key(kid: &str, secret: &[u8]) -> VerificationKey {
        VerificationKey {
            kid: Some(kid.to_owned()),
            key: KeyConfig::Hs256 {
                secret: secret.to_vec(),
            },
        }
    }

    fn key_set(keys: &[VerificationKey]) -> Result<TokenVerifier, AuthError> {
        TokenVerifier::with_key_set(keys, LEEWAY, TOKEN_BYTES_MAX)
    }

    fn header_of(token: &str) -> serde_json::Value {
        let header = token.split('.').next().unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap()
    }

    #[test]
    fn minted_token_names_its_kid_in_the_header() {
        let token = hs_signer(SECRET)
            .with_kid("a")
            .mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            header_of(&token),
            json!({"alg": "HS256", "typ": "JWT", "kid": "a"})
        );
        let plain = hs_signer(SECRET).mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(header_of(&plain), json!({"alg": "HS256", "typ": "JWT"}));
    }

    #[test]
    fn token_naming_kid_a_verifies_with_key_a() {
        let token = hs_signer(SECRET)
            .with_kid("a")
            .mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            key_set_a_b().verify(&token, NOW),
            Ok(identity(42, 7, LATER))
        );
    }

    #[test]
    fn token_naming_kid_b_verifies_with_key_b() {
        let token = ed_signer()
            .with_kid("b")
            .mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            key_set_a_b().verify(&token, NOW),
            Ok(identity(42, 7, LATER))
        );
    }

    #[test]
    fn token_naming_an_unknown_kid_is_bad_token() {
        for kid in ["c", "A", "a ", "", "ab"] {
            let token = hs_signer(SECRET)
                .with_kid(kid)
                .mint(UserId(42), DeviceId(7), LATER);
            let err = key_set_a_b().verify(&token, NOW).unwrap_err();
            assert_eq!(err, AuthError::UnknownKeyId, "kid {kid:?}");
            assert_eq!(err.code(), ErrorCode::BadToken);
        }
    }

    #[test]
    fn unknown_kid_is_not_echoed_in_the_error() {
        let token = hs_signer(SECRET)
            .with_kid("secret-kid")
            .mint(UserId(42), DeviceId(7), LATER);
        let message = key_set_a_b().verify(&token, NOW).unwrap_err().to_string();
        assert!(!message.contains("secret-kid"), "{message}");
    }

    #[test]
    fn token_signed_by_one_key_naming_another_kid_is_rejected() {
        let set = key_set(&[hs_key("a", SECRET), hs_key("b", OTHER_SECRET)]).unwrap();
        let right = hs_signer(OTHER_SECRET)
            .with_kid("b")
            .mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(set.verify(&right, NOW), Ok(identity(42, 7, LATER)));
        let wrong = hs_signer(OTHER_SECRET)
            .with_kid("a")
            .mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(set.verify(&wrong, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn eddsa_token_naming_an_hs256_kid_is_rejected() {
        let token = ed_signer()
            .with_kid("a")
            .mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            key_set_a_b().verify(&token, NOW),
            Err(AuthError::WrongAlgorithm {
                expected: "HS256",
                found: "EdDSA"
            })
        );
    }

    #[test]
    fn hs256_token_naming_an_eddsa_kid_is_rejected() {
        let token = hs_signer(SECRET)
            .with_kid("b")
            .mint(UserId(42), DeviceId(7), LATER);
        assert_eq!(
            key_set_a_b().verify(&token, NOW),
            Err(AuthError::WrongAlgorithm {
                expected: "EdDSA",
                found: "HS256"
            })
        );
    }

    #[test]
    fn hs256_token_keyed_with_the_public_key_of_an_eddsa_kid_is_rejected() {
        // The classic algorithm confusion: the public key is known to everyone, so an
        // HMAC under it would be a forgery if the key's algorithm followed the header.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("b".to_owned());
        let claims = json!({"sub":"42","dev":7,"exp":NOW_SECS + 60});
        for secret in [ED_PUBLIC_PEM.as_bytes(), SECRET] {
            let forged =
                jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap();
            assert!(matches!(
                key_set_a_b().verify(&forged, NOW),
                Err(AuthError::WrongAlgorithm { .. })
            ));
        }
    }

    #[test]
    fn token_without_kid_is_rejected_when_the_keys_have_ids() {
        let hs = hs_signer(SECRET).mint(UserId(42), DeviceId(7), LATER);
        let ed = ed_signer().mint(UserId(42), DeviceId(7), LATER);
        for token in [&hs, &ed] {
            let err = key_set_a_b().verify(token, NOW).unwrap_err();
            assert_eq!(err, AuthError::MissingKeyId);
            assert_eq!(err.code(), ErrorCode::BadToken);
        }
        // A set of one key with an id wants the id too.
        let one = key_set(&[hs_key("a", SECRET)]).unwrap();
        assert_eq!(one.verify(&hs, NOW), Err(AuthError::MissingKeyId));
    }

    #[test]
    fn a_single_key_without_id_checks_every_token_whatever_its_kid() {
        let unnamed = key_set(&[VerificationKey {
            kid: None,
            key: KeyConfig::Hs256 {
                secret: SECRET.to_vec(),
            },
        }])
        .unwrap();
        assert_eq!(unnamed.key_ids().count(), 0);
        let signer = hs_signer(SECRET);
        for token in [
            signer.mint(UserId(42), DeviceId(7), LATER),
            signer
                .clone()
                .with_kid("x")
                .mint(UserId(42), DeviceId(7), LATER),
        ] {
            assert_eq!(unnamed.verify(&token, NOW), Ok(identity(42, 7, LATER)));
            assert_eq!(
                hs_verifier().verify(&token, NOW),
                Ok(identity(42, 7, LATER))
            );
        }
        // The kid does not open another key: the single key's algorithm still rules.
        let ed = ed_signer()
            .with_kid("x")
            .mint(UserId(42), DeviceId(7), LATER);
        assert!(matches!(
            unnamed.verify(&ed, NOW),
            Err(AuthError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn a_key_set_checks_expiry_claims_and_size_as_a_single_key_does() {
        let signer = hs_signer(SECRET).with_kid("a");
        let expired = signer.mint(UserId(42), DeviceId(7), Instant::from_millis(0));
        assert!(matches!(
            key_set_a_b().verify(&expired, NOW),
            Err(AuthError::Expired { .. })
        ));
        let huge = "x".repeat(TOKEN_BYTES_MAX + 1);
        assert!(matches!(
            key_set_a_b().verify(&huge, NOW),
            Err(AuthError::TooLong { .. })
        ));
        for garbage in ["", "garbage", "a.b", "!!!.???.###", ".."] {
            let err = key_set_a_b().verify(garbage, NOW).unwrap_err();
            assert!(
                matches!(err, AuthError::Malformed(_)),
                "{garbage:?}: {err:?}"
            );
        }
        // A header whose `kid` is not a string is malformed, not an unknown key.
        let header = b64(r#"{"alg":"HS256","typ":"JWT","kid":7}"#);
        let claims = b64(r#"{"sub":"42","dev":7,"exp":1700003600}"#);
        assert!(matches!(
            key_set_a_b().verify(&format!("{header}.{claims}.x"), NOW),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn key_ids_are_listed_in_order() {
        let set = key_set(&[hs_key("b", OTHER_SECRET), hs_key("a", SECRET)]).unwrap();
        assert_eq!(set.key_ids().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn key_set_of_up_to_the_limit_is_accepted_and_over_it_refused() {
        let keys: Vec<VerificationKey> = (0..=VERIFICATION_KEYS_MAX)
            .map(|i| hs_key(&format!("k{i}"), SECRET))
            .collect();
        let full = key_set(&keys[..VERIFICATION_KEYS_MAX]).unwrap();
        assert_eq!(full.key_ids().count(), VERIFICATION_KEYS_MAX);
        assert!(matches!(key_set(&keys), Err(AuthError::BadKey(_))));
        assert!(matches!(key_set(&[]), Err(AuthError::BadKey(_))));
    }

    #[test]
    fn key_set_mixing_a_key_without_id_with_others_is_refused() {
        let unnamed = VerificationKey {
            kid: None,
            key: KeyConfig::Hs256 {
                secret: OTHER_SECRET.to_vec(),
            },
        };
        for keys in [
            vec![hs_key("a", SECRET), unnamed.clone()],
            vec![unnamed.clone(), hs_key("a", SECRET)],
            vec![unnamed.clone(), unnamed],
        ] {
            match key_set(&keys) {
                Err(AuthError::BadKey(why)) => assert!(why.contains("no id"), "{why}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn key_set_with_a_repeated_or_malformed_id_is_refused() {
        let long = "k".repeat(KEY_ID_BYTES_MAX + 1);
        for bad in ["", "a b", "kéy", "\n", long.as_str()] {
            assert!(
                matches!(
                    key_set(&[hs_key("a", SECRET), hs_key(bad, OTHER_SECRET)]),
                    Err(AuthError::BadKey(_))
                ),
                "{bad:?}"
            );
        }
        assert!(key_set(&[hs_key(&"k".repeat(KEY_ID_BYTES_MAX), SECRET)]).is_ok());
        match key_set(&[hs_key("a", SECRET), hs_key("a", OTHER_SECRET)]) {
            Err(AuthError::BadKey(why)) => assert!(why.contains("twice"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_set_with_an_unusable_key_is_refused_naming_it() {
        let keys = [
            hs_key("a", SECRET),
            hs_key("short", &[7; HS256_SECRET_BYTES_MIN - 1]),
        ];
        match key_set(&keys) {
            Err(AuthError::BadKey(why)) => assert!(why.contains("`short`"), "{why}"),
            other => panic!("{other:?}"),
        }
        let private_as_public = VerificationKey {
            kid: Some("b".to_owned()),
            key: KeyConfig::EdDsa {
                public_key_pem: ED_PRIVATE_PEM.as_bytes().to_vec(),
            },
        };
        assert!(matches!(
            key_set(&[hs_key("a", SECRET), private_as_public]),
            Err(AuthError::BadKey(_))
        ));
    }

    #[test]
    fn key_set_debug_output_hides_the_secrets() {
        let shown = format!("{:?}", key_set_a_b());
        assert!(!shown.contains("imgate-test-secret"), "{shown}");
        assert!(shown.contains("\"a\""), "{shown}");
    }
}
