//! Atomic file writes for the whole workspace. A file is written under a temporary name in its
//! own folder and renamed into place, so a reader (or a kill at any point) sees the old file or the
//! new one, never half of one; on any error (a full disk, a failed serialiser) the temporary file
//! is deleted, because `tempfile` removes it when it is dropped unpersisted.

use std::io::{self, Write};
use std::path::Path;

/// The folder a file lives in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `path` by calling `write` on a temporary path beside it, then renaming it into place.
/// `write` may open the path itself (libtorch's writers take a path). The folder is created when
/// missing.
pub fn write_via<E>(path: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E>
where
    E: From<io::Error>,
{
    let dir = parent_of(path);
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    // The temporary name keeps the extension: some writers pick the format by it (plotters).
    let suffix = match path.extension() {
        Some(ext) => format!(".tmp.{}", ext.to_string_lossy()),
        None => ".tmp".to_string(),
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(&suffix);
    #[cfg(unix)]
    {
        // tempfile creates 0600 files; results and checkpoints are ordinary files (umask applies).
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder.tempfile_in(dir)?;
    write(tmp.path())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| E::from(e.error))?;
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_via(path, |tmp| {
        let mut f = std::fs::OpenOptions::new().write(true).open(tmp)?;
        f.write_all(bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_file_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_bytes(&p, b"one").unwrap();
        write_bytes(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(entries(dir.path()), vec!["a.json"]);
    }

    #[test]
    fn a_failed_write_removes_its_temporary_file_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_bytes(&p, b"old").unwrap();
        let err = write_via(&p, |tmp| -> io::Result<()> {
            std::fs::write(tmp, vec![0u8; 1 << 20])?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(entries(dir.path()), vec!["a.bin"]);
        // A rename that fails (the target is a folder) also cleans up.
        let sub = dir.path().join("sub");
        std::fs::create_dir_all(sub.join("x")).unwrap();
        assert!(write_bytes(&sub, b"data").is_err());
        assert_eq!(entries(dir.path()), vec!["a.bin", "sub"]);
    }
}
