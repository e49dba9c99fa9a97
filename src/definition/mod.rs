//! Workflow definitions: the data model, parsing and validation of the JSON
//! documents users register, templates, and durations.

pub mod duration;
pub mod model;
pub mod template;
mod validate;

pub use model::*;
pub use validate::parse;
