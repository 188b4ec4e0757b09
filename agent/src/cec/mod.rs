//! CiliumEnvoyConfig processing: decode every resource into Envoy protobuf,
//! qualify names the way Cilium does, and fill in what Membrane supplies
//! (config sources, listener addresses).

mod parse;
mod qualify;
mod shared;

pub use parse::{
    CecError, Decoded, Encoded, ParsedCec, ParsedListener, check_names, parse_cec, parse_decoded,
};
pub use qualify::qualify;
pub use shared::{Joined, SharedJoin};
