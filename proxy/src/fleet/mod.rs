//! The fleet budget: many dbproxy instances share one database's connections.
//!
//! [`alloc`] decides, sans-IO, what one instance may hold; the store (etcd first) sits
//! behind [`store::Store`]; the driver runs the allocator on the control-plane runtime and
//! sets each pool's budget to its cap.

pub mod alloc;
pub mod driver;
#[cfg(test)]
mod sim;
pub mod store;

pub use driver::{Fleet, FleetPool, FleetStatus, SharedPool};
