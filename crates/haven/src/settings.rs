//! Settings from flags, `HAVEN_*` environment variables and an optional TOML file, in that
//! order of precedence.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use haven_mcp::engine::LegacyResponses;
use serde::Deserialize;

/// Haven: an MCP server that keeps its sessions, streams and tasks through crashes.
#[derive(Parser, Debug)]
#[command(name = "haven", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve MCP over Streamable HTTP at /mcp (both protocol eras), with /healthz and /readyz.
    Serve(ServeArgs),
    /// Serve the same catalog over stdio (one JSON-RPC message per line).
    Stdio(CommonArgs),
}

/// Settings shared by every command.
#[derive(Args, Debug, Default)]
pub struct CommonArgs {
    /// Data directory (created if missing) [default: ./haven-data]
    #[arg(long, env = "HAVEN_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Catalog to serve: default or conformance [default: default]
    #[arg(long, env = "HAVEN_CATALOG", value_name = "NAME")]
    pub catalog: Option<String>,
    /// TOML file with settings (keys as the long flags, with underscores); flags and
    /// environment variables override it
    #[arg(long, env = "HAVEN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Node id [default: generated once and kept in the data directory]
    #[arg(long, env = "HAVEN_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// Region name stamped on every write [default: local]
    #[arg(long, env = "HAVEN_REGION", value_name = "NAME")]
    pub region: Option<String>,
    /// Log filter, e.g. info or haven_mcp=debug [default: info]
    #[arg(long, env = "HAVEN_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "HAVEN_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// How legacy-era requests are answered: adaptive (JSON when a request finishes at once,
    /// otherwise a resumable SSE stream) or sse (always a stored, resumable stream)
    /// [default: adaptive]
    #[arg(long, env = "HAVEN_LEGACY_RESPONSES", value_name = "MODE")]
    pub legacy_responses: Option<String>,
    /// Seconds a legacy session lives without being used [default: 86400]
    #[arg(long, env = "HAVEN_SESSION_TTL", value_name = "SECS")]
    pub session_ttl: Option<u64>,
    /// Items per page of list results (tools/list, resources/list, ...) [default: 100]
    #[arg(long, env = "HAVEN_PAGE_SIZE", value_name = "N")]
    pub page_size: Option<usize>,
    /// Worker threads of the async runtime [default: one per core]
    #[arg(long, env = "HAVEN_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
}

/// Settings of `haven serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "HAVEN_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Host names accepted in Host and Origin headers (DNS-rebinding protection),
    /// comma-separated; * accepts any [default: localhost,127.0.0.1,[::1]]
    #[arg(
        long,
        env = "HAVEN_ALLOWED_HOSTS",
        value_name = "HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Option<Vec<String>>,
    /// Largest accepted request body in bytes [default: 4194304]
    #[arg(long, env = "HAVEN_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
}

/// The TOML file: every key optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    data: Option<PathBuf>,
    catalog: Option<String>,
    node_id: Option<String>,
    region: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    legacy_responses: Option<String>,
    session_ttl: Option<u64>,
    page_size: Option<usize>,
    worker_threads: Option<usize>,
    listen: Option<String>,
    allowed_hosts: Option<Vec<String>>,
    max_body_bytes: Option<usize>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data: PathBuf,
    pub catalog: String,
    pub node_id: Option<String>,
    pub region: String,
    pub log_level: String,
    pub log_format: String,
    pub legacy_responses: LegacyResponses,
    pub session_ttl_secs: u64,
    pub page_size: usize,
    pub worker_threads: Option<usize>,
    pub listen: String,
    pub allowed_hosts: Vec<String>,
    pub max_body_bytes: usize,
}

fn load_file(path: &Path) -> Result<FileSettings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing the config file {}", path.display()))
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// `haven serve`.
    Serve,
    /// `haven stdio`.
    Stdio,
}

impl Settings {
    /// The command and its resolved settings.
    pub fn from_cli(cli: &Cli) -> Result<(Mode, Settings)> {
        match &cli.command {
            Command::Serve(args) => Ok((Mode::Serve, Settings::resolve(&args.common, Some(args))?)),
            Command::Stdio(args) => Ok((Mode::Stdio, Settings::resolve(args, None)?)),
        }
    }

    /// Merges flags/environment (already combined by clap) over the file over defaults.
    pub fn resolve(common: &CommonArgs, serve: Option<&ServeArgs>) -> Result<Settings> {
        let file = match &common.config {
            Some(p) => load_file(p)?,
            None => FileSettings::default(),
        };
        let legacy = common
            .legacy_responses
            .clone()
            .or(file.legacy_responses)
            .unwrap_or_else(|| "adaptive".into());
        let legacy_responses = match legacy.as_str() {
            "adaptive" => LegacyResponses::Adaptive,
            "sse" => LegacyResponses::Sse,
            other => bail!("invalid legacy_responses {other:?}: use adaptive or sse"),
        };
        let log_format = common
            .log_format
            .clone()
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            bail!("invalid log_format {log_format:?}: use text or json");
        }
        let max_body_bytes = serve
            .and_then(|s| s.max_body_bytes)
            .or(file.max_body_bytes)
            .unwrap_or(4 * 1024 * 1024);
        if max_body_bytes < 1024 {
            bail!("max_body_bytes must be at least 1024");
        }
        let region = common
            .region
            .clone()
            .or(file.region)
            .unwrap_or_else(|| "local".into());
        if region.is_empty() || region.contains('/') {
            bail!("invalid region {region:?}: use a non-empty name without '/'");
        }
        Ok(Settings {
            data: common
                .data
                .clone()
                .or(file.data)
                .unwrap_or_else(|| PathBuf::from("./haven-data")),
            catalog: common
                .catalog
                .clone()
                .or(file.catalog)
                .unwrap_or_else(|| "default".into()),
            node_id: common.node_id.clone().or(file.node_id),
            region,
            log_level: common
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format,
            legacy_responses,
            session_ttl_secs: common
                .session_ttl
                .or(file.session_ttl)
                .unwrap_or(86_400)
                .max(1),
            page_size: common
                .page_size
                .or(file.page_size)
                .unwrap_or(100)
                .clamp(1, 10_000),
            worker_threads: common
                .worker_threads
                .or(file.worker_threads)
                .filter(|n| *n > 0),
            listen: serve
                .and_then(|s| s.listen.clone())
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:8080".into()),
            allowed_hosts: serve
                .and_then(|s| s.allowed_hosts.clone())
                .or(file.allowed_hosts)
                .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()]),
            max_body_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str]) -> Result<(Mode, Settings)> {
        let cli = Cli::try_parse_from(args).map_err(|e| anyhow::anyhow!("{e}"))?;
        Settings::from_cli(&cli)
    }

    #[test]
    fn defaults_file_and_flags_in_order_of_precedence() {
        let (_, s) = resolve(&["haven", "serve"]).unwrap();
        assert_eq!(s.listen, "127.0.0.1:8080");
        assert_eq!(s.data, PathBuf::from("./haven-data"));
        assert_eq!(s.catalog, "default");
        assert_eq!(s.max_body_bytes, 4 * 1024 * 1024);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("haven.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\ncatalog = \"conformance\"\nmax_body_bytes = 2048\nallowed_hosts = [\"mcp.example\"]\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let (_, s) = resolve(&["haven", "serve", "--config", f]).unwrap();
        assert_eq!(s.listen, "127.0.0.1:9000");
        assert_eq!(s.catalog, "conformance");
        assert_eq!(s.max_body_bytes, 2048);
        assert_eq!(s.allowed_hosts, vec!["mcp.example".to_owned()]);

        let (_, s) = resolve(&[
            "haven",
            "serve",
            "--config",
            f,
            "--listen",
            "127.0.0.1:9100",
        ])
        .unwrap();
        assert_eq!(s.listen, "127.0.0.1:9100", "a flag wins over the file");
        assert_eq!(s.catalog, "conformance");
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "no_such_setting = 1\n").unwrap();
        let e = resolve(&["haven", "serve", "--config", file.to_str().unwrap()]).unwrap_err();
        assert!(format!("{e:#}").contains("no_such_setting"), "{e:#}");
        let e = resolve(&["haven", "serve", "--legacy-responses", "sometimes"]).unwrap_err();
        assert!(format!("{e:#}").contains("adaptive or sse"), "{e:#}");
        let e = resolve(&["haven", "serve", "--max-body-bytes", "10"]).unwrap_err();
        assert!(format!("{e:#}").contains("at least 1024"), "{e:#}");
        let e = resolve(&["haven", "serve", "--config", "/nonexistent/haven.toml"]).unwrap_err();
        assert!(
            format!("{e:#}").contains("reading the config file"),
            "{e:#}"
        );
    }
}
