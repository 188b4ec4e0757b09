//! Cluster-pool IPAM as in Cilium: the operator carves node pod CIDRs out
//! of the cluster pool ([`ClusterPool`]); each agent hands out pod
//! addresses from its node's CIDRs ([`NodeAllocator`]), persisting every
//! allocation before it is used so a restarted agent never hands out an
//! address twice.
//!
//! Pure: the only I/O is [`NodeAllocator::load`] / [`NodeAllocator::save`]
//! of one JSON file.

mod cidr;
mod cluster;
mod node;

pub use cidr::{Cidr, Family};
pub use cluster::ClusterPool;
pub use node::{ALLOCATION_THRESHOLD, Allocation, CidrState, NodeAllocator, RELEASE_THRESHOLD};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("{input:?}: not a CIDR ({why})")]
    BadCidr { input: String, why: String },
    #[error("mask size /{mask} does not fit the cluster pool {pool}")]
    BadMask { pool: Cidr, mask: u8 },
    #[error("cluster pool {0} has no free node CIDR left")]
    ClusterPoolExhausted(Cidr),
    #[error("no {family} pod CIDR on this node")]
    NoPool { family: Family },
    #[error("{family} pod CIDR(s) {cidrs} exhausted: no free address")]
    Exhausted { family: Family, cidrs: String },
    #[error("{addr} is not in this node's pod CIDRs")]
    Foreign { addr: std::net::IpAddr },
    #[error("IPAM state {path}: {why}")]
    State { path: PathBuf, why: String },
}
