//! The LB pool type and a Service's LB address, which the agent needs to
//! bind addresses and keep CEC listeners off the pool. Handing addresses
//! out (LB IPAM) is the operator's job (crate membrane-operator).

pub use membrane_ingress::{Pool, PoolError, lb_ip};
