//! TEMPORARY STUB (replaced by the real module).
use std::path::{Path, PathBuf};
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError { #[error("{0}")] Other(String) }
pub struct PgBinaries { pub bin_dir: PathBuf }
impl PgBinaries { pub fn find() -> Result<Self, EmbeddedError> { todo!() } }
pub enum RunAs { CurrentUser }
impl RunAs { pub fn detect() -> Result<Self, EmbeddedError> { todo!() } }
pub struct Cluster { pub data_dir: PathBuf, pub port: u16 }
impl Cluster {
  pub fn init(_: &PgBinaries, _: &RunAs, _: &Path) -> Result<Self, EmbeddedError> { todo!() }
  pub async fn start(&mut self) -> Result<String, EmbeddedError> { todo!() }
  pub fn stop(&self) -> Result<(), EmbeddedError> { todo!() }
  pub fn psql_command(&self, _: &str) -> String { todo!() }
}
