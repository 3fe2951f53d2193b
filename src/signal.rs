//! `wandist reload`'s reach: the `wandist run` processes that use one
//! configuration file (found in Linux's /proc), and SIGHUP to them.

use std::io;
use std::path::{Path, PathBuf};

/// The pids of this machine's `wandist run` processes whose `--config` is
/// `config` (compared as canonical paths, each resolved against its
/// process's working directory). Processes that cannot be read (another
/// user's, or gone) are skipped.
pub fn running_with(config: &Path) -> io::Result<Vec<u32>> {
    let want = std::fs::canonicalize(config)?;
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let dir = entry.path();
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else { continue };
        let args: Vec<&str> =
            cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).filter_map(|a| std::str::from_utf8(a).ok()).collect();
        let Some(arg) = run_config(&args) else { continue };
        let path = match std::fs::read_link(dir.join("cwd")) {
            Ok(cwd) => cwd.join(arg),
            Err(_) => PathBuf::from(arg),
        };
        if std::fs::canonicalize(path).is_ok_and(|p| p == want) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// `--config`'s value if `args` is a `wandist run` command line.
pub fn run_config<'a>(args: &[&'a str]) -> Option<&'a str> {
    let exe = Path::new(args.first()?).file_name()?.to_str()?;
    if !exe.starts_with("wandist") || args.get(1) != Some(&"run") {
        return None;
    }
    let mut rest = args[2..].iter();
    while let Some(a) = rest.next() {
        match *a {
            "--config" | "-c" => return rest.next().copied(),
            _ => {
                if let Some(v) = a.strip_prefix("--config=").or_else(|| a.strip_prefix("-c")) {
                    return Some(v.strip_prefix('=').unwrap_or(v));
                }
            }
        }
    }
    None
}

/// Sends SIGHUP to `pid`.
pub fn hangup(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, libc::SIGHUP) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::run_config;

    #[test]
    fn finds_the_config_of_a_run_command_line() {
        assert_eq!(run_config(&["/usr/bin/wandist", "run", "--config", "/etc/w.toml"]), Some("/etc/w.toml"));
        assert_eq!(run_config(&["wandist", "run", "-c", "w.toml"]), Some("w.toml"));
        assert_eq!(run_config(&["./wandist", "run", "--config=w.toml"]), Some("w.toml"));
        assert_eq!(run_config(&["wandist", "run", "-cw.toml"]), Some("w.toml"));
        assert_eq!(run_config(&["wandist", "run", "-c=w.toml"]), Some("w.toml"));
        // Not a running gateway: another subcommand, another program.
        assert_eq!(run_config(&["wandist", "check", "--config", "w.toml"]), None);
        assert_eq!(run_config(&["wandist", "reload", "--config", "w.toml"]), None);
        assert_eq!(run_config(&["vim", "run", "--config", "w.toml"]), None);
        assert_eq!(run_config(&["wandist", "run"]), None);
    }
}
