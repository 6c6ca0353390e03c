pub mod envoy;
pub mod upstream;
