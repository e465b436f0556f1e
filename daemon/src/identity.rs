//! The node's ed25519 identity, kept in `<state_dir>/identity.key` (32 secret bytes, mode 0600).

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use ambient_core::Identity;
use rand::RngCore as _;

/// File name of the secret key inside the state directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file is not exactly 32 bytes.
    #[error(
        "{path} is {len} bytes, but an identity key is exactly 32; move it away to create a new identity"
    )]
    WrongSize {
        /// The key file.
        path: PathBuf,
        /// Its size in bytes.
        len: u64,
    },
    /// Group or others may read or write the file.
    #[error("{path} has mode {mode:o}, readable by other users; run `chmod 600 {path}`")]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading, creating or writing failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Loads the identity from `state_dir`, creating the directory and a fresh key on first start.
///
/// # Errors
/// [`IdentityError`] when the key file has the wrong size or permissions, or cannot be read or
/// written.
pub fn load_or_create(state_dir: &Path) -> Result<Identity, IdentityError> {
    crate::create_private_dir(state_dir).map_err(|source| IdentityError::Io {
        action: "create",
        path: state_dir.to_owned(),
        source,
    })?;
    let path = state_dir.join(IDENTITY_FILE);
    match fs::File::open(&path) {
        Ok(file) => read_key(&path, file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match create_key(&path) {
            Ok(identity) => Ok(identity),
            // Another process created it between our open and create: use theirs.
            Err(IdentityError::Io { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists =>
            {
                let file = fs::File::open(&path).map_err(|source| IdentityError::Io {
                    action: "open",
                    path: path.clone(),
                    source,
                })?;
                read_key(&path, file)
            }
            Err(e) => Err(e),
        },
        Err(source) => Err(IdentityError::Io {
            action: "open",
            path,
            source,
        }),
    }
}

fn read_key(path: &Path, mut file: fs::File) -> Result<Identity, IdentityError> {
    let io_err = |source| IdentityError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(io_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
    }
    if meta.len() != 32 {
        return Err(IdentityError::WrongSize {
            path: path.to_owned(),
            len: meta.len(),
        });
    }
    let mut secret = [0u8; 32];
    file.read_exact(&mut secret).map_err(io_err)?;
    let identity = Identity::from_secret(&secret);
    secret.fill(0);
    Ok(identity)
}

fn create_key(path: &Path) -> Result<Identity, IdentityError> {
    let io_err = |action| {
        move |source| IdentityError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io_err("create"))?;
    file.write_all(&secret).map_err(io_err("write"))?;
    file.sync_all().map_err(io_err("write"))?;
    if let Some(dir) = path.parent() {
        // Make the new directory entry durable too; failure here only risks a new key after
        // a power cut, so it is not an error.
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    let identity = Identity::from_secret(&secret);
    secret.fill(0);
    tracing::info!(node = %identity.node_id(), path = %path.display(), "created a new node identity");
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_agent_keeps_its_node_id() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap().node_id();
        let second = load_or_create(dir.path()).unwrap().node_id();
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(dir.path().join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_key_file_of_the_wrong_size_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&path).unwrap().write_all(b"short").unwrap();
        let Err(err) = load_or_create(dir.path()) else {
            panic!("the key was accepted")
        };
        assert!(
            matches!(err, IdentityError::WrongSize { len: 5, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("exactly 32"));
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let Err(err) = load_or_create(dir.path()) else {
            panic!("the key was accepted")
        };
        assert!(
            matches!(err, IdentityError::TooOpen { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }
}
