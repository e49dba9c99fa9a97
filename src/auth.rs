//! API keys and roles: what a key may do, and how a key is made, shown once
//! and checked. Pure: the store keeps the keys (`store/keys.rs`) and the API
//! asks it on every request (`api/auth.rs`), so a revoked key stops working
//! at once on every node.
//!
//! A key reads `stead_<id>_<secret>`: the id (16 hex digits) finds its row,
//! and the row holds only the SHA-256 of the secret (64 hex digits, 256
//! random bits, so a fast hash is enough: there is nothing to guess). The
//! secret never leaves the process that checks it: it is not sent to the
//! database, and it is compared with the stored digest in constant time.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::model::Vocabulary;

/// What a key may do. `admin` may do everything; `operator` may start,
/// signal, cancel, retry and read; `worker` may claim, heartbeat, complete
/// and fail tasks of the queues named on its key, and nothing else;
/// `reader` may only read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything: workflows, keys, instances, tasks of every queue.
    Admin,
    /// Start, signal, cancel, retry and read instances; read workflows.
    Operator,
    /// Claim and finish tasks of the key's queues.
    Worker,
    /// Read only.
    Reader,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Worker, Role::Reader];

    /// The role's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Worker => "worker",
            Role::Reader => "reader",
        }
    }

    /// Whether a key of this role may do what `need` names.
    pub(crate) fn may(self, need: Need) -> bool {
        match need {
            Need::Read => matches!(self, Role::Admin | Role::Operator | Role::Reader),
            Need::Operate => matches!(self, Role::Admin | Role::Operator),
            Need::Work => matches!(self, Role::Admin | Role::Worker),
            Need::Admin => self == Role::Admin,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Role as Vocabulary>::parse(s)
            .ok_or_else(|| format!("unknown role {s:?}: use admin, operator, worker or reader"))
    }
}

impl Vocabulary for Role {
    const ALL: &'static [Self] = &Role::ALL;

    fn as_str(self) -> &'static str {
        Role::as_str(self)
    }
}

/// What a route needs of the caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Reading workflows, instances, history, the cluster.
    Read,
    /// Starting, signalling, cancelling, retrying instances.
    Operate,
    /// Claiming and finishing tasks (of the key's queues).
    Work,
    /// Registering workflows, managing keys.
    Admin,
}

impl Need {
    /// What the need is, for a 403's detail.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Need::Read => "reading needs the reader, operator or admin role",
            Need::Operate => "acting on instances needs the operator or admin role",
            Need::Work => "claiming and finishing tasks needs the worker or admin role",
            Need::Admin => "this needs the admin role",
        }
    }
}

/// How the API decides who may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Every request needs `Authorization: Bearer <key>` of a role that may
    /// make it (the default).
    Keys,
    /// No keys: anyone who reaches the API may do everything. For `stead
    /// dev` on loopback, tests and benchmarks.
    None,
}

/// Length of a key id, in hex digits.
const ID_HEX: usize = 16;
/// Length of a key secret, in hex digits.
const SECRET_HEX: usize = 64;
/// What every key begins with (so a leaked key is easy to recognise).
const PREFIX: &str = "stead_";

/// A new key: its id, the whole key (shown once) and the digest to store.
pub(crate) struct Minted {
    pub id: String,
    pub key: String,
    pub digest: [u8; 32],
}

/// Makes a new random key.
pub(crate) fn mint() -> Minted {
    let mut id = [0u8; ID_HEX / 2];
    let mut secret = [0u8; SECRET_HEX / 2];
    let mut rng = rand::rngs::OsRng;
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let (id, secret) = (hex(&id), hex(&secret));
    Minted {
        key: format!("{PREFIX}{id}_{secret}"),
        digest: digest(&secret),
        id,
    }
}

/// A presented key split into its id and secret, if it has a key's shape.
pub(crate) fn parse(key: &str) -> Option<(&str, &str)> {
    let (id, secret) = key.strip_prefix(PREFIX)?.split_once('_')?;
    let hex_of = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_of(id, ID_HEX) && hex_of(secret, SECRET_HEX)).then_some((id, secret))
}

/// The stored form of a secret.
pub(crate) fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether a presented secret matches a stored digest, in time that does
/// not depend on where they differ.
pub(crate) fn matches(secret: &str, stored: &[u8]) -> bool {
    let presented = digest(secret);
    stored.len() == presented.len()
        && presented
            .iter()
            .zip(stored)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Longest key name and queue name, in bytes.
const MAX_NAME_BYTES: usize = 200;
/// Most queues one worker key may name.
pub(crate) const MAX_KEY_QUEUES: usize = 100;

/// Checks what a new key is to be: a name, a role, and queues exactly when
/// the role is `worker`. The error names the field.
pub(crate) fn check_new_key(
    name: &str,
    role: Role,
    queues: &[String],
) -> Result<(), (&'static str, String)> {
    if name.trim().is_empty() || name.len() > MAX_NAME_BYTES {
        return Err((
            "name",
            format!("must be 1 to {MAX_NAME_BYTES} bytes, not blank"),
        ));
    }
    match (role, queues.len()) {
        (Role::Worker, 0) => Err((
            "queues",
            "a worker key must name the queues it may work".into(),
        )),
        (Role::Worker, n) if n > MAX_KEY_QUEUES => Err((
            "queues",
            format!("may name at most {MAX_KEY_QUEUES} queues"),
        )),
        (Role::Worker, _) => match queues
            .iter()
            .find(|q| q.is_empty() || q.len() > MAX_NAME_BYTES)
        {
            Some(q) => Err((
                "queues",
                format!("{q:?} is not a queue name (1 to {MAX_NAME_BYTES} bytes)"),
            )),
            None => Ok(()),
        },
        (_, 0) => Ok(()),
        (role, _) => Err((
            "queues",
            format!(
                "only worker keys name queues; a {role} key may use every queue its role allows"
            ),
        )),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_key_parses_back_to_its_id_and_matches_its_digest() {
        let m = mint();
        let (id, secret) = parse(&m.key).expect("a key's shape");
        assert_eq!(id, m.id);
        assert!(matches(secret, &m.digest));
        assert!(!matches(secret, &digest("something else")));
        assert!(
            !matches(secret, &m.digest[..31]),
            "a short digest never matches"
        );
        assert_ne!(mint().key, m.key, "keys are random");
    }

    #[test]
    fn text_without_a_keys_shape_is_not_a_key() {
        let m = mint();
        for bad in [
            "",
            "stead_",
            &m.key[PREFIX.len()..],
            &m.key[..m.key.len() - 1],
            &format!("{}0", m.key),
            &m.key.replace('_', "-"),
            &format!("stead_{}_{}", "g".repeat(ID_HEX), "0".repeat(SECRET_HEX)),
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn each_role_may_do_exactly_its_part() {
        use Need::*;
        let table = [
            (Role::Admin, [true, true, true, true]),
            (Role::Operator, [true, true, false, false]),
            (Role::Worker, [false, false, true, false]),
            (Role::Reader, [true, false, false, false]),
        ];
        for (role, allowed) in table {
            for (need, ok) in [Read, Operate, Work, Admin].into_iter().zip(allowed) {
                assert_eq!(role.may(need), ok, "{role} {need:?}");
            }
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn a_new_key_names_queues_exactly_when_it_is_a_worker_key() {
        let q = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(check_new_key("ci", Role::Worker, &q(&["a", "b"])), Ok(()));
        assert_eq!(check_new_key("ci", Role::Admin, &[]), Ok(()));
        let field = |r: Result<(), (&'static str, String)>| r.unwrap_err().0;
        assert_eq!(field(check_new_key("ci", Role::Worker, &[])), "queues");
        assert_eq!(
            field(check_new_key("ci", Role::Reader, &q(&["a"]))),
            "queues"
        );
        assert_eq!(
            field(check_new_key("ci", Role::Worker, &q(&[""]))),
            "queues"
        );
        let many: Vec<String> = (0..=MAX_KEY_QUEUES).map(|i| i.to_string()).collect();
        assert_eq!(field(check_new_key("ci", Role::Worker, &many)), "queues");
        assert_eq!(
            check_new_key("ci", Role::Worker, &many[1..]),
            Ok(()),
            "at the limit"
        );
        assert_eq!(field(check_new_key(" ", Role::Admin, &[])), "name");
        assert_eq!(
            field(check_new_key(&"n".repeat(201), Role::Admin, &[])),
            "name"
        );
        assert_eq!(check_new_key(&"n".repeat(200), Role::Admin, &[]), Ok(()));
    }
}
