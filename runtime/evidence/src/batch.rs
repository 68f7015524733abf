//! Batch signatures: one signature over the Merkle root of many events, and each event's
//! inclusion proof, so every event still verifies on its own.
//!
//! ```text
//!             events_root ◄── signed in a batch envelope (envelope::batch_signing_input)
//!              /        \
//!          h01            h2          node = sha256(0x01 ‖ left ‖ right)
//!         /    \           |
//!       h0      h1        h2          leaf = sha256(0x00 ‖ event_sha256)
//!       e0      e1        e2          (RFC 9162 §2.1.1: the tree of an unbalanced count)
//! ```
//!
//! Why: a producer that signs every event pays one signature per event. With KMS that is a
//! network round trip per event inside the ledger's batch (and KMS's per-second quota for
//! asymmetric signing), and even a local Ed25519 signature is a fifth of the ledger's CPU per
//! reserve+commit pair. One signature per batch keeps the per-event evidence: a row stores the
//! batch signature and its [`Inclusion`] (index, count and the sibling hashes), from which a
//! verifier recomputes the root the envelope names.
//!
//! The tree and the proof are RFC 9162's (Certificate Transparency 2.0), so the hashing is the
//! one transparency-log tooling already implements; the leaf data is the event's sha256.

use sha2::{Digest, Sha256};

/// Most events one batch signature may cover. A ledger batch holds at most a few hundred
/// commands of a few events each; the bound keeps a proof under 32 sibling hashes.
pub const BATCH_EVENTS_MAX: usize = 1 << 20;

/// Version byte of the stored [`Inclusion`] encoding.
const INCLUSION_VERSION: u8 = 1;

/// Where one event sits in a signed batch: enough to recompute the batch's root from the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inclusion {
    /// The event's position in the batch, from 0.
    pub index: u32,
    /// Events in the batch (the envelope's `event_count`).
    pub count: u32,
    /// Sibling hashes from the leaf up (RFC 9162 §2.1.3.1).
    pub path: Vec<[u8; 32]>,
}

/// Why stored inclusion bytes cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("inclusion proof is malformed")]
pub struct InclusionMalformed;

impl Inclusion {
    /// The stored form: version 1, index and count as big-endian u32, then the path.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + 32 * self.path.len());
        out.push(INCLUSION_VERSION);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        for hash in &self.path {
            out.extend_from_slice(hash);
        }
        out
    }

    /// Reads the stored form. Structure only: whether the path fits the index and count is
    /// judged by [`Inclusion::root`].
    ///
    /// # Errors
    /// [`InclusionMalformed`] for another version, a truncated header or a partial hash.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InclusionMalformed> {
        let (&version, rest) = bytes.split_first().ok_or(InclusionMalformed)?;
        if version != INCLUSION_VERSION || rest.len() < 8 || (rest.len() - 8) % 32 != 0 {
            return Err(InclusionMalformed);
        }
        let u32_at = |at: usize| {
            let mut word = [0; 4];
            word.copy_from_slice(&rest[at..at + 4]);
            u32::from_be_bytes(word)
        };
        let path = rest[8..]
            .chunks_exact(32)
            .map(|chunk| {
                let mut hash = [0; 32];
                hash.copy_from_slice(chunk);
                hash
            })
            .collect();
        Ok(Self {
            index: u32_at(0),
            count: u32_at(4),
            path,
        })
    }

    /// The root of the batch that holds the event with this sha256 at this proof's place
    /// (RFC 9162 §2.1.3.2), or `None` when the path does not fit the index and count.
    pub fn root(&self, event_sha256: &[u8; 32]) -> Option<[u8; 32]> {
        if self.index >= self.count {
            return None;
        }
        let mut index = self.index;
        let mut last = self.count - 1;
        let mut hash = leaf_hash(event_sha256);
        for sibling in &self.path {
            if last == 0 {
                return None;
            }
            if index & 1 == 1 || index == last {
                hash = node_hash(sibling, &hash);
                if index & 1 == 0 {
                    while index & 1 == 0 && index != 0 {
                        index >>= 1;
                        last >>= 1;
                    }
                }
            } else {
                hash = node_hash(&hash, sibling);
            }
            index >>= 1;
            last >>= 1;
        }
        (last == 0).then_some(hash)
    }
}

/// A batch's root and every event's inclusion proof, in the events' order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTree {
    /// The Merkle root the batch envelope names.
    pub root: [u8; 32],
    /// One proof per event.
    pub inclusions: Vec<Inclusion>,
}

impl BatchTree {
    /// Builds the tree over events given by their sha256, or `None` for no events or more than
    /// [`BATCH_EVENTS_MAX`].
    pub fn of(event_sha256s: &[[u8; 32]]) -> Option<Self> {
        if event_sha256s.is_empty() || event_sha256s.len() > BATCH_EVENTS_MAX {
            return None;
        }
        let count = u32::try_from(event_sha256s.len()).ok()?;
        let leaves: Vec<[u8; 32]> = event_sha256s.iter().map(leaf_hash).collect();
        // Each level halves the nodes; a level of odd length carries its last node up unhashed,
        // which is exactly RFC 9162's split at the largest power of two below the count.
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|level| level.len() > 1) {
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let above = below
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node_hash(left, right),
                    [single] => *single,
                    _ => unreachable!("chunks of two"),
                })
                .collect();
            levels.push(above);
        }
        let root = levels.last().and_then(|top| top.first()).copied()?;
        let inclusions = (0..count)
            .map(|index| {
                let mut path = Vec::new();
                let mut at = index as usize;
                for level in &levels[..levels.len() - 1] {
                    let sibling = at ^ 1;
                    if let Some(hash) = level.get(sibling) {
                        path.push(*hash);
                    }
                    at >>= 1;
                }
                Inclusion { index, count, path }
            })
            .collect();
        Some(Self { root, inclusions })
    }
}

/// RFC 9162 leaf hash of an event, by its sha256.
fn leaf_hash(event_sha256: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update([0x00]);
    hasher.update(event_sha256);
    hasher.finalize().into()
}

/// RFC 9162 interior node hash.
fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update([0x01]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn events(n: usize) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| Sha256::digest(i.to_be_bytes()).into())
            .collect()
    }

    /// RFC 9162 §2.1.1 written as its recursive definition, to check the level-by-level build.
    fn reference_root(leaves: &[[u8; 32]]) -> [u8; 32] {
        match leaves {
            [single] => leaf_hash(single),
            _ => {
                let k = leaves.len().next_power_of_two() / 2;
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    #[test]
    fn every_event_of_every_batch_size_proves_the_root() {
        // Goal: the root is RFC 9162's for every count (balanced or not), and every event's
        // proof recomputes it from that event alone.
        for n in 1..=70 {
            let events = events(n);
            let tree = BatchTree::of(&events).unwrap();
            assert_eq!(tree.root, reference_root(&events), "n={n}");
            for (event, inclusion) in events.iter().zip(&tree.inclusions) {
                assert_eq!(
                    inclusion.root(event),
                    Some(tree.root),
                    "n={n} {inclusion:?}"
                );
                let stored = Inclusion::from_bytes(&inclusion.to_bytes()).unwrap();
                assert_eq!(&stored, inclusion);
            }
        }
    }

    #[test]
    fn a_proof_proves_nothing_for_another_event_place_or_count() {
        // Goal: changing the event, its index or any sibling changes the root, and a path too
        // short or too long for its place gives no root at all. (A count with the same path can
        // give the same root: the batch envelope signs the count too, see envelope.rs.)
        let events = events(11);
        let tree = BatchTree::of(&events).unwrap();
        let proof = &tree.inclusions[6];
        assert_ne!(proof.root(&events[5]), Some(tree.root));
        for changed in [
            Inclusion {
                index: 7,
                ..proof.clone()
            },
            Inclusion {
                path: {
                    let mut path = proof.path.clone();
                    path[1][0] ^= 1;
                    path
                },
                ..proof.clone()
            },
        ] {
            assert_ne!(changed.root(&events[6]), Some(tree.root), "{changed:?}");
        }
        let mut short = proof.clone();
        short.path.pop();
        assert_eq!(short.root(&events[6]), None);
        let mut long = proof.clone();
        long.path.push([0; 32]);
        assert_eq!(long.root(&events[6]), None);
        let outside = Inclusion {
            index: 11,
            ..proof.clone()
        };
        assert_eq!(outside.root(&events[6]), None);
    }

    #[test]
    fn a_batch_of_one_is_its_leaf_and_empty_batches_do_not_exist() {
        let events = events(1);
        let tree = BatchTree::of(&events).unwrap();
        assert_eq!(tree.root, leaf_hash(&events[0]));
        assert!(tree.inclusions[0].path.is_empty());
        assert_eq!(BatchTree::of(&[]), None);
    }

    #[test]
    fn stored_proofs_refuse_other_versions_and_ragged_lengths() {
        let good = BatchTree::of(&events(3)).unwrap().inclusions[2].to_bytes();
        assert!(Inclusion::from_bytes(&good).is_ok());
        let mut other_version = good.clone();
        other_version[0] = 2;
        for bad in [
            &[][..],
            &good[..5],
            &good[..good.len() - 1],
            &other_version[..],
        ] {
            assert_eq!(Inclusion::from_bytes(bad), Err(InclusionMalformed));
        }
    }
}
