//! Node identity.

use std::fmt;

/// One node of a cluster: a random 64-bit id drawn when the node starts, so a restarted process
/// is a new node and never inherits the state of the one it replaced.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u64);

impl NodeId {
    /// A fresh random id (never 0).
    pub fn random() -> NodeId {
        loop {
            let mut raw = [0u8; 8];
            // Without the OS's randomness there is no safe way to name nodes.
            getrandom::fill(&mut raw).expect("the operating system's random number generator is unavailable");
            if let Some(node) = NodeId::from_u64(u64::from_ne_bytes(raw)) {
                return node;
            }
        }
    }

    /// The id as a number (never 0).
    pub fn get(self) -> u64 {
        self.0
    }

    /// The node with this id; `None` for 0, which is no node.
    pub fn from_u64(id: u64) -> Option<NodeId> {
        (id != 0).then_some(NodeId(id))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:016x})", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
