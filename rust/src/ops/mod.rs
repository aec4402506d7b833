//! What tasks do together over the exchange: collectives ([`collectives`]), parameter-server
//! variables ([`variables`]), and remote operations called by name ([`remote`]).

pub mod collectives;
pub mod remote;
pub mod variables;
