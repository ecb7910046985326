//! Files at rest. Haven's data directory holds session ids, note text and every record in
//! clear, so it is private to the user Haven runs as: the directory is created 0700 and every
//! file Haven creates in it 0600 (on Unix; elsewhere these are no-ops). A data directory or a
//! file of Haven's that other users can reach is tightened when Haven opens it, and the change
//! is logged (nothing Haven needs is lost by it, and leaving it open would leave the data open).
//!
//! Key and token files are different: a key that other users could read may have been read,
//! which chmod cannot undo, so [`check_private_file`] refuses such a file (naming it, its mode
//! and the `chmod 600` fix) instead of changing it.
//!
//! A key can also come from a command ([`run_key_command`]), so that an operator can plug a
//! KMS or a vault in: the command line is split into words by POSIX shell quoting rules and run
//! without a shell, its standard output is the key, its standard error is never shown or logged.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

/// Mode of the data directory and the directories Haven creates in it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file Haven creates in its data directory, and of key and token files.
pub const FILE_MODE: u32 = 0o600;
/// How long a key command may run.
pub const KEY_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a key command may print (a key file is a few lines).
pub const KEY_COMMAND_MAX_OUTPUT: usize = 64 * 1024;

/// Creates directory `dir` (its missing parents as usual) with mode 0700; an existing `dir`
/// that group or others may use is tightened to 0700 (logged).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    match builder.create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {
            tighten(dir, DIR_MODE).map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Options that create a file with mode 0600 (the umask can only take bits away). They apply
/// to a file they create; an existing file keeps its mode (see [`tighten`]).
pub fn private_options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    options
}

/// Writes `content` to `path`, created 0600 or replaced in place (an existing file is
/// tightened to 0600 first), and syncs it.
pub fn write_private(path: &Path, content: &[u8]) -> io::Result<()> {
    use std::io::Write;
    if path.exists() {
        tighten(path, FILE_MODE)?;
    }
    let mut f = private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(content)?;
    f.sync_all()
}

/// Takes away the permissions of group and others from `path` (a file or directory of
/// Haven's) when it has any, leaving it `mode`; returns whether it changed anything. The change
/// is logged at warn level, naming the path and its old mode.
pub fn tighten(path: &Path, mode: u32) -> io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let old = std::fs::metadata(path)?.permissions().mode() & 0o7777;
        if old & 0o077 == 0 {
            return Ok(false);
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        tracing::warn!(
            path = %path.display(),
            old_mode = %format!("{old:04o}"),
            new_mode = %format!("{mode:04o}"),
            "other users could reach this part of Haven's data; restricted it to Haven's user"
        );
        Ok(true)
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(false)
    }
}

/// Tightens `path` if it exists (see [`tighten`]); a missing path is fine.
pub fn tighten_if_present(path: &Path, mode: u32) -> io::Result<()> {
    match tighten(path, mode) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why a key could not be had from its file or command.
#[derive(Debug, thiserror::Error)]
pub enum KeySourceError {
    /// The key or token file may be read or changed by other users.
    #[error(
        "the {what} {path} has mode {mode:04o}: other users can read or change it; restrict it with `chmod 600 {path}` (and replace the key if someone else may have read it)"
    )]
    TooOpen {
        /// What the file is (e.g. `backup key file`).
        what: String,
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file's mode could not be read.
    #[error("reading the {what} {path}: {error}")]
    Io {
        /// What the file is.
        what: String,
        /// The file.
        path: String,
        /// The error.
        error: io::Error,
    },
    /// The key command could not be split into words.
    #[error("the {what} command cannot be split into words ({reason}): {command_help}")]
    BadCommand {
        /// What the command gives (e.g. `secrets key`).
        what: String,
        /// What is wrong.
        reason: &'static str,
        /// How to write it.
        command_help: &'static str,
    },
    /// The command could not be started.
    #[error("starting the {what} command {program:?}: {error}")]
    Spawn {
        /// What the command gives.
        what: String,
        /// Its program (first word).
        program: String,
        /// The error.
        error: io::Error,
    },
    /// The command ended with a failure.
    #[error(
        "the {what} command {program:?} failed ({status}); its standard error ({stderr_bytes} bytes) is not shown because it could hold key material: run the command by hand to see it"
    )]
    Failed {
        /// What the command gives.
        what: String,
        /// Its program.
        program: String,
        /// How it ended.
        status: String,
        /// How much it wrote to standard error.
        stderr_bytes: usize,
    },
    /// The command succeeded but printed nothing (or only white space).
    #[error(
        "the {what} command {program:?} printed nothing on its standard output; it must print the key in the format of the key file"
    )]
    Empty {
        /// What the command gives.
        what: String,
        /// Its program.
        program: String,
    },
    /// The command printed more than a key could be.
    #[error(
        "the {what} command {program:?} printed more than {KEY_COMMAND_MAX_OUTPUT} bytes; it must print only the key"
    )]
    TooLong {
        /// What the command gives.
        what: String,
        /// Its program.
        program: String,
    },
    /// The command did not end in time (it was killed).
    #[error(
        "the {what} command {program:?} did not finish within {} s and was stopped",
        KEY_COMMAND_TIMEOUT.as_secs()
    )]
    Timeout {
        /// What the command gives.
        what: String,
        /// Its program.
        program: String,
    },
}

/// Refuses a key or token file (`what`, e.g. `backup key file`) that group or others may read,
/// write or execute, as OpenSSH does with private keys. A symbolic link is judged by the file
/// it points to.
pub fn check_private_file(path: &Path, what: &str) -> Result<(), KeySourceError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|error| KeySourceError::Io {
            what: what.to_owned(),
            path: path.display().to_string(),
            error,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeySourceError::TooOpen {
                what: what.to_owned(),
                path: path.display().to_string(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
    Ok(())
}

const COMMAND_HELP: &str = "it is split into words like a shell would (quotes and backslashes work) and run without a shell; for pipes or variables write `sh -c '...'`";

/// Runs the key command `command` (for `what`, e.g. `secrets key`) and returns what it printed
/// on standard output. The command line is split into words by POSIX shell rules and run
/// without a shell, with standard input closed, within [`KEY_COMMAND_TIMEOUT`]. A failure, an
/// empty output, too long an output or a timeout is an error; standard error is read and
/// dropped (its size is reported on failure, never its content, which could hold the key).
///
/// Blocking: runs on a thread of its own; call it from a blocking context.
pub fn run_key_command(command: &str, what: &str) -> Result<Zeroizing<Vec<u8>>, KeySourceError> {
    let bad = |reason| KeySourceError::BadCommand {
        what: what.to_owned(),
        reason,
        command_help: COMMAND_HELP,
    };
    let words = shlex::split(command).ok_or_else(|| bad("unbalanced quotes or a trailing \\"))?;
    let Some((program, args)) = words.split_first() else {
        return Err(bad("it is empty"));
    };
    let program = program.clone();
    let args = args.to_vec();
    let what_owned = what.to_owned();
    // A runtime of its own on a thread of its own: callers may be inside another runtime.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| KeySourceError::Spawn {
                        what: what_owned.clone(),
                        program: program.clone(),
                        error,
                    })?;
                runtime.block_on(run(&program, &args, &what_owned))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(KeySourceError::Spawn {
                    what: what.to_owned(),
                    program: program.clone(),
                    error: io::Error::other("the thread running it panicked"),
                })
            })
    })
}

async fn run(
    program: &str,
    args: &[String],
    what: &str,
) -> Result<Zeroizing<Vec<u8>>, KeySourceError> {
    use tokio::io::AsyncReadExt;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| KeySourceError::Spawn {
            what: what.to_owned(),
            program: program.to_owned(),
            error,
        })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let work = async {
        // Room for the longest output and one byte more, allocated once: no copy of the key
        // is left behind by a reallocation.
        let mut out = Zeroizing::new(Vec::with_capacity(KEY_COMMAND_MAX_OUTPUT + 1));
        let read_out = async {
            if let Some(s) = stdout {
                s.take(KEY_COMMAND_MAX_OUTPUT as u64 + 1)
                    .read_to_end(&mut out)
                    .await?;
            }
            io::Result::Ok(())
        };
        let count_err = async {
            let mut n = 0usize;
            if let Some(mut s) = stderr {
                let mut buf = Zeroizing::new([0u8; 4096]);
                loop {
                    let got = s.read(&mut buf[..]).await?;
                    if got == 0 {
                        break;
                    }
                    n += got;
                }
            }
            io::Result::Ok(n)
        };
        let (o, e) = tokio::join!(read_out, count_err);
        let status = child.wait().await;
        (o, e, status, out)
    };
    let (o, e, status, out) = match tokio::time::timeout(KEY_COMMAND_TIMEOUT, work).await {
        Ok(done) => done,
        // Dropping `work` dropped the child handle, which kills it (`kill_on_drop`).
        Err(_) => {
            return Err(KeySourceError::Timeout {
                what: what.to_owned(),
                program: program.to_owned(),
            });
        }
    };
    let io_failed = |error| KeySourceError::Spawn {
        what: what.to_owned(),
        program: program.to_owned(),
        error,
    };
    // Too long an output first: a command cut off by the closed pipe fails because of it.
    if out.len() > KEY_COMMAND_MAX_OUTPUT {
        return Err(KeySourceError::TooLong {
            what: what.to_owned(),
            program: program.to_owned(),
        });
    }
    let status = status.map_err(io_failed)?;
    if !status.success() {
        return Err(KeySourceError::Failed {
            what: what.to_owned(),
            program: program.to_owned(),
            status: status.to_string(),
            stderr_bytes: e.unwrap_or(0),
        });
    }
    o.map_err(io_failed)?;
    if out.iter().all(u8::is_ascii_whitespace) {
        return Err(KeySourceError::Empty {
            what: what.to_owned(),
            program: program.to_owned(),
        });
    }
    Ok(out)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_data_directory_and_its_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b/data");
        private_dir(&data).unwrap();
        assert_eq!(mode(&data), 0o700);
        let f = data.join("node-id");
        write_private(&f, b"x").unwrap();
        assert_eq!(mode(&f), 0o600);
        // An existing open directory and file are tightened.
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        private_dir(&data).unwrap();
        write_private(&f, b"y").unwrap();
        assert_eq!((mode(&data), mode(&f)), (0o700, 0o600));
        assert_eq!(std::fs::read(&f).unwrap(), b"y");
        assert!(!tighten(&f, FILE_MODE).unwrap());
        tighten_if_present(&data.join("missing"), FILE_MODE).unwrap();
    }

    #[test]
    fn key_files_others_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, "key").unwrap();
        for m in [0o600, 0o400] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m)).unwrap();
            check_private_file(&f, "backup key file").unwrap();
        }
        for m in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m)).unwrap();
            let e = check_private_file(&f, "backup key file")
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{m:04o}")), "{e}");
            assert!(e.contains(&format!("chmod 600 {}", f.display())), "{e}");
            assert!(e.contains("backup key file"), "{e}");
        }
    }

    #[test]
    fn key_commands() {
        let out = run_key_command("printf 'k1 %s\\n' 'a b'", "secrets key").unwrap();
        assert_eq!(&out[..], b"k1 a b\n");
        // No shell: a pipe is an argument.
        let out = run_key_command("echo one | two", "secrets key").unwrap();
        assert_eq!(&out[..], b"one | two\n");
        let out = run_key_command("sh -c 'echo $((1+1))'", "secrets key").unwrap();
        assert_eq!(&out[..], b"2\n");
        let e = run_key_command("sh -c 'echo s3cr3t >&2; exit 3'", "backup key")
            .unwrap_err()
            .to_string();
        assert!(e.contains("failed") && e.contains("7 bytes"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = run_key_command("printf '  \\n'", "backup key")
            .unwrap_err()
            .to_string();
        assert!(e.contains("printed nothing"), "{e}");
        let e = run_key_command("no-such-program-here", "backup key")
            .unwrap_err()
            .to_string();
        assert!(e.contains("starting the backup key command"), "{e}");
        for bad in ["", "  ", "echo 'open"] {
            let e = run_key_command(bad, "backup key").unwrap_err().to_string();
            assert!(e.contains("cannot be split"), "{bad:?}: {e}");
        }
        let e = run_key_command("head -c 70000 /dev/zero", "backup key")
            .unwrap_err()
            .to_string();
        assert!(e.contains("printed more than"), "{e}");
    }
}
