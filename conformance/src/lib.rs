pub mod api;
pub mod certs;
pub mod echo;
