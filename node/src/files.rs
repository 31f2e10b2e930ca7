//! Files shoal reads secrets from and files it must never leave half written.
//!
//! - [`read_secret`]: the admin token, the cluster key and TLS private keys are refused when
//!   their mode gives group or others any access (as ssh refuses a private key), with an error
//!   naming the file, the mode and the fix. The mode is read from the opened file, so what is
//!   checked is what is read.
//! - [`write_atomic`]: a temporary file in the same directory, fsynced, renamed over the target,
//!   then the directory fsynced: after a crash the file holds the old content or the new one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Mode bits a secret file may not have: any access for group or others.
const NOT_PRIVATE: u32 = 0o077;

/// Why a file with permission bits `mode` may not hold a secret (`None`: it may).
pub fn mode_problem(path: &Path, mode: u32) -> Option<String> {
    (mode & NOT_PRIVATE != 0).then(|| {
        format!(
            "mode {:04o} lets group or others read this secret; make it private: chmod 600 {}",
            mode & 0o7777,
            path.display()
        )
    })
}

/// Refuses `file` (opened from `path`) when group or others may access it.
fn check_private(path: &Path, file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata()?.permissions().mode();
        if let Some(problem) = mode_problem(path, mode) {
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, problem));
        }
    }
    #[cfg(not(unix))]
    let _ = (path, file);
    Ok(())
}

/// Reads a secret file, refusing it when it is not private (see the module doc). A missing
/// file keeps its `NotFound` kind, so callers can create it.
pub fn read_secret(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    check_private(path, &file)?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// Checks a secret file's mode without keeping its content (TLS keys, read by rustls later).
pub fn ensure_private(path: &Path) -> std::io::Result<()> {
    check_private(path, &std::fs::File::open(path)?)
}

/// Replaces `path` with `contents` atomically and durably, the new file having `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = temp_name(path);
    // A temporary left by a crash could carry another mode: start from a new file.
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let written = options.open(&tmp).and_then(|mut f| {
        f.write_all(contents)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// `.<name>.tmp` beside `path` (hidden, and never mistaken for the real file).
fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owner_only_modes_may_hold_secrets() {
        let p = Path::new("/etc/shoal/cluster.key");
        assert_eq!(mode_problem(p, 0o100600), None);
        assert_eq!(mode_problem(p, 0o400), None);
        for bad in [0o640, 0o604, 0o644, 0o660, 0o601, 0o610] {
            let why = mode_problem(p, bad).expect("refused");
            assert!(why.contains(&format!("{bad:04o}")) && why.contains("chmod 600 /etc/shoal/cluster.key"), "{why}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn readable_secrets_are_refused_with_the_file_and_mode_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("admin.token");
        write_atomic(&path, b"s3cret-s3cret-s3cret", 0o600).expect("write");
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        assert_eq!(read_secret(&path).expect("private"), "s3cret-s3cret-s3cret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_secret(&path).expect_err("group/other readable");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("0644") && err.to_string().contains(&path.display().to_string()), "{err}");
        assert!(ensure_private(&path).is_err());
        let missing = read_secret(&dir.path().join("nope")).expect_err("missing");
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn atomic_writes_replace_the_whole_file_and_leave_no_temporary() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("node_id");
        write_atomic(&path, b"a much longer first content", 0o644).expect("first");
        write_atomic(&path, b"42", 0o644).expect("second");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "42");
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("node_id")], "no temporary left behind");
        assert!(write_atomic(&dir.path().join("missing/x"), b"1", 0o644).is_err());
    }
}
