//! Finding the PostgreSQL server binaries, and the command that installs
//! them when they are missing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{check_output, EmbeddedError, Result};

/// Where the PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`) are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    /// The directory holding them (absolute).
    pub bin_dir: PathBuf,
}

pub(super) const REQUIRED_BINARIES: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

impl PgBinaries {
    /// The directory of `initdb` on PATH (symlinks resolved, with `pg_ctl`
    /// and `postgres` beside it); else the highest-numbered
    /// `/usr/lib/postgresql/*/bin` (Debian, Ubuntu) or `/usr/pgsql-*/bin`
    /// (RHEL family).
    pub fn find() -> Result<Self> {
        Self::find_in(std::env::var_os("PATH").as_deref())
    }

    pub(super) fn find_in(path: Option<&std::ffi::OsStr>) -> Result<Self> {
        if let Some(path) = path {
            for dir in std::env::split_paths(path) {
                let candidate = dir.join("initdb");
                if !is_executable(&candidate) {
                    continue;
                }
                let Ok(real) = fs::canonicalize(&candidate) else {
                    continue;
                };
                if let Some(bin_dir) = real.parent() {
                    if let Ok(bins) = Self::from_dir(bin_dir) {
                        return Ok(bins);
                    }
                }
            }
        }
        let mut found: Vec<(Vec<u32>, PathBuf)> = Vec::new();
        for (parent, prefix, suffix) in [
            ("/usr/lib/postgresql", "", "bin"),
            ("/usr", "pgsql-", "bin"),
            ("/opt/homebrew/opt", "postgresql@", "bin"),
            ("/usr/local/opt", "postgresql@", "bin"),
        ] {
            let Ok(entries) = fs::read_dir(parent) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Some(version) = name.strip_prefix(prefix) else {
                    continue;
                };
                let Some(key) = parse_version(version) else {
                    continue;
                };
                let bin_dir = entry.path().join(suffix);
                if Self::from_dir(&bin_dir).is_ok() {
                    found.push((key, bin_dir));
                }
            }
        }
        found.sort();
        match found.pop() {
            Some((_, bin_dir)) => Ok(Self { bin_dir }),
            None => Err(EmbeddedError::BinariesNotFound),
        }
    }

    /// Use the binaries in `dir`, which must hold `initdb`, `pg_ctl` and
    /// `postgres`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let missing: Vec<&str> = REQUIRED_BINARIES
            .iter()
            .copied()
            .filter(|b| !is_executable(&dir.join(b)))
            .collect();
        if !missing.is_empty() {
            return Err(EmbeddedError::IncompleteBinaries {
                dir: dir.to_path_buf(),
                missing: missing.join(", "),
            });
        }
        let bin_dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        Ok(Self { bin_dir })
    }

    /// `initdb` in `bin_dir`.
    pub fn initdb(&self) -> PathBuf {
        self.bin_dir.join("initdb")
    }

    /// `pg_ctl` in `bin_dir`.
    pub fn pg_ctl(&self) -> PathBuf {
        self.bin_dir.join("pg_ctl")
    }

    /// `postgres` in `bin_dir`.
    pub fn postgres(&self) -> PathBuf {
        self.bin_dir.join("postgres")
    }

    /// The server version, e.g. `15.18`, from `postgres --version`.
    pub fn version(&self) -> Result<String> {
        let out = Command::new(self.postgres())
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| EmbeddedError::Spawn {
                program: self.postgres(),
                source,
            })?;
        check_output("postgres --version", &out)?;
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .split_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or(&text)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        Ok(version)
    }

    /// The major version as PostgreSQL writes it into `PG_VERSION`
    /// (`15`, or `9.6` for the old scheme).
    pub fn major_version(&self) -> Result<String> {
        Ok(major_of(&self.version()?))
    }
}

/// The command that installs the PostgreSQL server binaries on this
/// machine, for error messages.
pub fn install_command() -> String {
    // SAFETY: geteuid cannot fail.
    let sudo = if unsafe { libc::geteuid() } == 0 {
        ""
    } else {
        "sudo "
    };
    if cfg!(target_os = "macos") {
        "brew install postgresql@15".into()
    } else if Path::new("/etc/debian_version").exists() {
        format!("{sudo}apt-get install postgresql")
    } else if Path::new("/etc/redhat-release").exists() {
        format!("{sudo}dnf install postgresql-server")
    } else if Path::new("/etc/alpine-release").exists() {
        format!("{sudo}apk add postgresql")
    } else {
        "your system's PostgreSQL server package (it has initdb, pg_ctl and postgres)".into()
    }
}

pub(super) fn major_of(version: &str) -> String {
    let digits: Vec<&str> = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .collect();
    match digits.as_slice() {
        [] => version.to_string(),
        [first, second, ..] if first.parse::<u32>().is_ok_and(|v| v < 10) => {
            format!("{first}.{second}")
        }
        [first, ..] => first.to_string(),
    }
}

pub(super) fn parse_version(s: &str) -> Option<Vec<u32>> {
    s.split('.').map(|p| p.parse().ok()).collect()
}

pub(super) fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub(super) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}
