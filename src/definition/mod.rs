//! Workflow definitions: the data model, parsing and validation of the JSON
//! documents users register, templates, and durations.

pub(crate) mod duration;
pub(crate) mod model;
pub(crate) mod template;
mod validate;

pub(crate) use model::*;
pub(crate) use validate::parse;
