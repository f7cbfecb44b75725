//! Command implementations that are not the server itself.

pub mod aoi;
pub mod models;
pub mod sensors;
