//! Settings from flags, `HAVEN_*` environment variables and an optional TOML file, in that
//! order of precedence.

use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// CA certificate(s) (PEM) that the commands talking to a node's admin API (status,
    /// registry, config, secrets, auth, audit, backup now/list, region
    /// status/promote/demote/takeover) trust when its URL is https:// [default: the system's
    /// roots]. Not used by `drill` and `chaos`, which reach deployments over http:// only
    #[arg(long, global = true, env = "HAVEN_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
// Parsed once per process; the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve MCP over Streamable HTTP at /mcp (both protocol eras), with /healthz and /readyz.
    Serve(ServeArgs),
    /// Serve the same catalog over stdio (one JSON-RPC message per line). It opens the data
    /// directory itself: while a `haven serve` runs on the embedded store, give `haven stdio`
    /// a --data of its own (the store of a data directory is open in one process at a time).
    Stdio(CommonArgs),
    /// Backups: ship now, list, verify, restore, create a key.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Show a running node's region: its nodes (alive, last heartbeat, version), the store
    /// (NATS servers and stream health) and backup.
    Status(NodeArgs),
    /// The upstream MCP servers a running node federates: add, list, show, remove.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Runtime settings of a running node's region: get, set, unset, list.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Secrets of a running node's region: set, list, delete, rotate-key, keys, retire-key;
    /// and new-key, which adds a key-encryption key to a key file.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Regions: status, promote, demote (asked of a running node), and bootstrap of a cold
    /// region from another region's backups.
    #[command(subcommand)]
    Region(RegionCommand),
    /// Authentication of a running node's region: API keys for machine clients.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// The tamper-evident audit log of a running node's region: list, export, verify,
    /// checkpoint.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Disaster drills: break a deployment on purpose under load and measure what clients
    /// saw against the recovery targets (list, run, history).
    #[command(subcommand)]
    Drill(DrillCommand),
    /// A randomized schedule of faults from a seed (kills, pauses, cut and slow store and
    /// route links, NATS losses, full disks, store outages) on a local deployment, or a
    /// described deployment's own fault commands, under load; then the invariants: no
    /// acknowledged write lost, every long call answered once, every task ended, every node
    /// serving every write. Exit 0 when they held, 1 when one broke, 2 when the run could not
    /// go on.
    Chaos(ChaosArgs),
}

/// `haven chaos`.
#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Run on a deployment started on this machine
    #[arg(
        long,
        required_unless_present = "deployment",
        conflicts_with = "deployment"
    )]
    pub local: bool,
    /// Run on an existing deployment described in FILE (as `haven drill run --deployment`):
    /// the faults are its drills' cause and repair commands, drawn from the seed
    #[arg(long, value_name = "FILE")]
    pub deployment: Option<PathBuf>,
    /// Do not ask to confirm a run on a described deployment
    #[arg(long)]
    pub yes: bool,
    /// Seed of the schedule: the same seed gives the same faults in the same order
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How many faults
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub faults: usize,
    /// Stop injecting faults after this many minutes, even if some are left
    #[arg(long, default_value_t = 60.0, value_name = "MINUTES")]
    pub max_minutes: f64,
    /// Print the schedule and do nothing else
    #[arg(long)]
    pub plan: bool,
    /// Haven nodes of the local deployment
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub nodes: usize,
    /// Regions of the local deployment: 1 (its nodes and three NATS servers; faults on
    /// nodes, servers, links, routes and disks) or 2 (regions A and B, one node and one NATS
    /// server each; faults on the link between them and on each region's node and server)
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=2))]
    pub regions: u8,
    /// The nats-server binary [default: nats-server on PATH]
    #[arg(
        long,
        value_name = "PATH",
        default_value = "nats-server",
        hide_default_value = true
    )]
    pub nats_server: PathBuf,
    /// The haproxy binary [default: haproxy on PATH]
    #[arg(
        long,
        value_name = "PATH",
        default_value = "haproxy",
        hide_default_value = true
    )]
    pub haproxy: PathBuf,
    /// Requests per second of the stateless, session and write clients together
    #[arg(long, default_value_t = 30.0, value_name = "N")]
    pub rate: f64,
    /// Seconds each long call lasts
    #[arg(long, default_value_t = 3, value_name = "SECONDS")]
    pub long_seconds: u32,
    /// Where the report is kept
    #[arg(long, default_value = "haven-drills", value_name = "DIR")]
    pub reports: PathBuf,
    /// Keep the local deployment's directory
    #[arg(long)]
    pub keep: bool,
}

/// `haven drill` subcommands.
#[derive(Subcommand, Debug)]
pub enum DrillCommand {
    /// The drills, with what each breaks and its targets (the design's and Haven's).
    List,
    /// Run drills, each with its own load, fault, repair and report; the exit status is 0
    /// when every drill met its targets, 1 when one missed, 2 when a drill could not run.
    Run(DrillRunArgs),
    /// The kept reports: every drill's verdict and figures, and the trend per scenario.
    History(DrillHistoryArgs),
}

/// `haven drill run`.
#[derive(Args, Debug)]
pub struct DrillRunArgs {
    /// Drills to run, in order (`all`: every drill of `haven drill list`)
    #[arg(required = true, value_name = "SCENARIO")]
    pub scenarios: Vec<String>,
    /// Start a complete deployment on this machine for the drills (three NATS servers, Haven
    /// nodes of this very binary, HAProxy) and remove it afterwards
    #[arg(long, conflicts_with = "deployment")]
    pub local: bool,
    /// Run against an existing deployment described in this TOML file (its load balancer,
    /// nodes, admin token file, and each drill's fault and repair commands; README, "Disaster
    /// drills")
    #[arg(long, value_name = "FILE")]
    pub deployment: Option<PathBuf>,
    /// With --deployment: print the plan (every command, in order) and change nothing
    #[arg(long, requires = "deployment")]
    pub dry_run: bool,
    /// With --deployment: do not ask for the deployment's name before breaking it
    #[arg(long, requires = "deployment")]
    pub yes: bool,
    /// Haven nodes of the local deployment
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub nodes: usize,
    /// The nats-server binary of the local deployment [default: nats-server on PATH]
    #[arg(
        long,
        value_name = "PATH",
        default_value = "nats-server",
        hide_default_value = true
    )]
    pub nats_server: PathBuf,
    /// The haproxy binary of the local deployment [default: haproxy on PATH]
    #[arg(
        long,
        value_name = "PATH",
        default_value = "haproxy",
        hide_default_value = true
    )]
    pub haproxy: PathBuf,
    /// The local deployment's object store for its backup: a `moto_server` binary, started
    /// on loopback [default: moto_server on PATH; without one, the backup goes to a directory]
    #[arg(
        long,
        value_name = "PATH",
        default_value = "moto_server",
        hide_default_value = true
    )]
    pub object_store: PathBuf,
    /// Seconds of load before the fault
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub warmup: f64,
    /// Seconds of load after the repair
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub after: f64,
    /// Seconds a kill or an outage lasts before its repair [default: each drill's own]
    #[arg(long, value_name = "SECONDS")]
    pub outage: Option<f64>,
    /// Requests per second of the stateless, session and write clients together (long calls
    /// and the admin probes come on top)
    #[arg(long, default_value_t = 30.0, value_name = "N")]
    pub rate: f64,
    /// Seconds each long call (a legacy `sleep` streamed with progress) lasts
    #[arg(long, default_value_t = 3, value_name = "SECONDS")]
    pub long_seconds: u32,
    /// Where reports are kept: a directory per drill (report.json, report.md, timeline.svg)
    #[arg(long, default_value = "haven-drills", value_name = "DIR")]
    pub reports: PathBuf,
    /// Keep the local deployment's directory (configuration, data, every process's log)
    #[arg(long)]
    pub keep: bool,
}

/// `haven drill history`.
#[derive(Args, Debug)]
pub struct DrillHistoryArgs {
    /// Where reports are kept
    #[arg(long, default_value = "haven-drills", value_name = "DIR")]
    pub reports: PathBuf,
    /// Print the reports as a JSON array instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `haven auth` subcommands.
#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// API keys, a way in for machine clients (`Authorization: Bearer hvn_...`): create,
    /// list, revoke.
    #[command(subcommand)]
    Keys(AuthKeysCommand),
    /// Authorization rules: which principals may use which tools, resources and prompts.
    /// With no rule everything is allowed; the first rule closes everything it does not open.
    #[command(subcommand)]
    Rules(AuthRulesCommand),
}

/// `haven auth rules` subcommands.
#[derive(Subcommand, Debug)]
pub enum AuthRulesCommand {
    /// Create a rule, or replace the rule of that name. Every node applies it as soon as its
    /// store has it (no restart).
    Set(AuthRulesSetArgs),
    /// List the rules.
    List(NodeArgs),
    /// Remove a rule.
    Remove(AuthRulesRemoveArgs),
}

/// `haven auth rules set`.
#[derive(Args, Debug)]
pub struct AuthRulesSetArgs {
    /// Name of the rule (A-Z a-z 0-9 . _ -)
    pub name: String,
    /// Who the rule is about (repeatable): sub:SUBJECT, client:CLIENT_ID, group:GROUP,
    /// key:KEY_ID, scope:SCOPE, id:PRINCIPAL_ID, authenticated, anonymous, or * (anyone)
    #[arg(long = "principal", value_name = "SELECTOR", required = true)]
    pub principals: Vec<String>,
    /// Tool name pattern (repeatable); `*` matches any run of characters, `?` one
    /// (e.g. weather__* for every tool of the upstream weather)
    #[arg(long = "tool", value_name = "PATTERN")]
    pub tools: Vec<String>,
    /// Resource URI pattern (repeatable), e.g. notes://team-a/*
    #[arg(long = "resource", value_name = "PATTERN")]
    pub resources: Vec<String>,
    /// Prompt name pattern (repeatable)
    #[arg(long = "prompt", value_name = "PATTERN")]
    pub prompts: Vec<String>,
    /// Deny what the rule covers instead of allowing it (a deny always wins)
    #[arg(long)]
    pub deny: bool,
    /// Free text for operators
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven auth rules remove`.
#[derive(Args, Debug)]
pub struct AuthRulesRemoveArgs {
    /// Name of the rule
    pub name: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven auth keys` subcommands.
#[derive(Subcommand, Debug)]
pub enum AuthKeysCommand {
    /// Create a key. The key is printed once and cannot be shown again: only a hash of its
    /// secret is stored.
    Create(AuthKeysCreateArgs),
    /// List keys: id, name, scopes, groups, created, expiry, state (never a secret).
    List(NodeArgs),
    /// Revoke a key: every node refuses it from then on. The record stays, marked revoked.
    Revoke(AuthKeysRevokeArgs),
}

/// `haven auth keys create`.
#[derive(Args, Debug)]
pub struct AuthKeysCreateArgs {
    /// Name of the key, for operators (e.g. the client or job that uses it)
    #[arg(long)]
    pub name: String,
    /// Scope granted to the key's callers, an OAuth scope token such as mcp:tools (repeatable)
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// Group or role of the key's callers, as authorization rules name them (repeatable)
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// When the key stops working: a duration from now (30d, 12h, 1d12h, 2w) or an RFC 3339
    /// time (2027-01-31T00:00:00Z) [default: never]
    #[arg(long, value_name = "WHEN")]
    pub expires: Option<String>,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven audit` subcommands.
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Audit records, oldest first: time, principal, action, target, outcome, node.
    List(AuditListArgs),
    /// Everything the log holds (records, checkpoints, chain heads, public keys), one JSON
    /// object a line, for archiving or checking elsewhere.
    Export(NodeArgs),
    /// Checks every chain and every checkpoint signature; names the first altered, removed or
    /// reordered record. Exit status 1 when something is wrong.
    Verify(AuditVerifyArgs),
    /// Signs a checkpoint of the asked node's chain now (e.g. before a backup).
    Checkpoint(NodeArgs),
}

/// `haven audit list`.
#[derive(Args, Debug)]
pub struct AuditListArgs {
    /// Only records at or after this time: RFC 3339 (2026-01-02T03:04:05Z) or Unix ms.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only records of this principal (e.g. admin-token, anonymous, token:ISS#SUB, key:ID).
    #[arg(long, value_name = "ID")]
    pub principal: Option<String>,
    /// Only records of this action (e.g. config.set), or of actions starting with it when it
    /// ends with `.` or `*` (e.g. `secrets.`).
    #[arg(long, value_name = "ACTION")]
    pub action: Option<String>,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven auth keys revoke`.
#[derive(Args, Debug)]
pub struct AuthKeysRevokeArgs {
    /// Key id, as `haven auth keys list` shows it (the part after `hvn_`)
    pub id: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven audit verify`.
#[derive(Args, Debug)]
pub struct AuditVerifyArgs {
    /// A public key (64 hex characters, as `haven audit verify` prints them) or a file holding
    /// one per line, trusted for checkpoint signatures; repeatable. Given, only these keys are
    /// trusted; else the keys published in the store are.
    #[arg(long = "trusted-key", value_name = "KEY|FILE")]
    pub trusted_keys: Vec<String>,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven region` subcommands.
#[derive(Subcommand, Debug)]
pub enum RegionCommand {
    /// This region and every other: roles and epoch, the link that applies each other
    /// region's log here, entries behind, replication lag in seconds, nodes, last heard.
    Status(RegionStatusArgs),
    /// Make the asked node's region the active one (planned switchover). Refused while the
    /// active region may be alive and this one has not applied all of its log, unless
    /// --force.
    Promote(RegionPromoteArgs),
    /// Make the asked node's region, the active one, a standby (no region is active until
    /// another is promoted).
    Demote(NodeArgs),
    /// Take over the running work of a lost region (every process of it stopped): its
    /// interrupted idempotent tool calls run again here, other requests end with the
    /// "interrupted" error, its tasks are adopted. Asked of a node of another region.
    Takeover(RegionTakeoverArgs),
    /// Build a new (cold) region's store from another region's backups: the state as of the
    /// latest backed-up change (or a point), every region's records in it, and the cursor
    /// from which the new region's nodes then apply the source region's log.
    Bootstrap(RegionBootstrapArgs),
}

/// `haven region takeover`.
#[derive(Args, Debug)]
pub struct RegionTakeoverArgs {
    /// The lost region
    pub region: String,
    /// Confirm that every Haven process of that region is stopped
    #[arg(long)]
    pub confirm_dead: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven region bootstrap`.
#[derive(Args, Debug)]
pub struct RegionBootstrapArgs {
    #[command(flatten)]
    pub target: BackupTargetArgs,
    /// The new region's store: `nats://HOST:PORT[,HOST:PORT...]` (its own JetStream domain)
    #[arg(long, value_name = "STORE")]
    pub store: String,
    /// The new region's name
    #[arg(long, value_name = "NAME")]
    pub region: String,
    /// Replicas of the new region's stream
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub store_replicas: usize,
    /// The region whose backups these are [default: read from the backup]
    #[arg(long, value_name = "NAME")]
    pub source_region: Option<String>,
    /// Bootstrap the state as of this time (RFC 3339) [default: the latest backed-up change]
    #[arg(long, value_name = "TIME", conflicts_with = "seq")]
    pub at: Option<String>,
    /// Bootstrap the state as of this sequence of the source region's log
    #[arg(long, value_name = "N")]
    pub seq: Option<u64>,
    /// Write into a region store that is not empty
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub nats_tls: NatsTlsArgs,
}

/// `haven region promote`.
#[derive(Args, Debug)]
pub struct RegionPromoteArgs {
    /// Promote even if this region is behind the active one, which may be alive
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven region status`.
#[derive(Args, Debug)]
pub struct RegionStatusArgs {
    /// Also compute a digest of the whole state (equal in every region once they converge)
    #[arg(long)]
    pub digest: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// How a command reaches a running node.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Admin API of the node to ask: its --admin-listen address if it has one, else its
    /// --listen address [default: the URL in DATA/admin.url, which the node writes at start,
    /// else http://127.0.0.1:8080]
    #[arg(long, env = "HAVEN_NODE", value_name = "URL")]
    pub node: Option<String>,
    /// Admin token file of the node [default: HAVEN_ADMIN_TOKEN, else DATA/admin.token]
    #[arg(long, env = "HAVEN_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Data directory of the node (where its admin token is) [default: ./haven-data]
    #[arg(long, env = "HAVEN_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Print JSON
    #[arg(long, global = true)]
    pub json: bool,
}

/// `haven registry` subcommands.
#[derive(Subcommand, Debug)]
pub enum RegistryCommand {
    /// Register an upstream: `--url URL` (Streamable HTTP) or `-- COMMAND [ARGS...]` (stdio).
    Add(RegistryAddArgs),
    /// List registered upstreams with this node's connection state.
    List(NodeArgs),
    /// Show one upstream's entry and connection state.
    Show(RegistryNameArgs),
    /// Remove an upstream; its connections are closed and its tools withdrawn.
    Remove(RegistryNameArgs),
}

/// `haven registry add`.
#[derive(Args, Debug)]
pub struct RegistryAddArgs {
    /// Upstream name: 1-32 of a-z, 0-9, '-', starting with a letter. Its tools are served as
    /// NAME__TOOL and its resources as NAME+URI.
    pub name: String,
    /// MCP endpoint of a Streamable HTTP upstream
    #[arg(long, value_name = "URL", conflicts_with = "command")]
    pub url: Option<String>,
    /// Request header of an HTTP upstream, `Name: value` or `Name=value`; the value may
    /// reference secrets as ${secret:NAME} (repeatable)
    #[arg(long = "header", value_name = "HEADER")]
    pub headers: Vec<String>,
    /// Environment variable of a stdio upstream, `NAME=value`; the value may reference
    /// secrets as ${secret:NAME} (repeatable)
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory of a stdio upstream
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Per-call timeout in milliseconds [default: the upstream.timeout_ms setting]
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
    /// Register it disabled (not connected, not served)
    #[arg(long)]
    pub disabled: bool,
    /// Free text for operators
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Replace an existing entry of the same name
    #[arg(long)]
    pub replace: bool,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Command and arguments of a stdio upstream (after `--`)
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// A command naming one upstream.
#[derive(Args, Debug)]
pub struct RegistryNameArgs {
    /// Upstream name
    pub name: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven config` subcommands.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Show one setting: value in force, default, where it came from.
    Get(ConfigKeyArgs),
    /// Set a setting for the whole region; every node applies it without a restart.
    Set(ConfigSetArgs),
    /// Return a setting to its default.
    Unset(ConfigKeyArgs),
    /// List every setting.
    List(NodeArgs),
}

/// A command naming one setting.
#[derive(Args, Debug)]
pub struct ConfigKeyArgs {
    /// Setting, e.g. upstream.timeout_ms (see `haven config list`)
    pub key: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven config set`.
#[derive(Args, Debug)]
pub struct ConfigSetArgs {
    /// Setting, e.g. upstream.timeout_ms (see `haven config list`)
    pub key: String,
    /// New value
    pub value: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven secrets` subcommands.
#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Store a secret. The value is read from standard input (one line; or everything with
    /// --multiline), or from --value-file; never from the command line.
    Set(SecretsSetArgs),
    /// List secrets (names, key-encryption key, times; never values).
    List(SecretsListArgs),
    /// Delete a secret (refused while a registered upstream references it, unless --force).
    Delete(SecretsDeleteArgs),
    /// Re-wrap every data key under the newest key-encryption key of the node's key file, and
    /// start signing request state with a new key. Shows which old keys are still in use.
    RotateKey(NodeArgs),
    /// Show key-encryption keys in use and the request-state signing keys.
    Keys(NodeArgs),
    /// Retire a request-state signing key (values it sealed stop verifying). The key that
    /// signs now cannot be retired; rotate first.
    RetireKey(SecretsRetireArgs),
    /// Append a new key-encryption key to a key file (it becomes the primary after the next
    /// rotate-key); creates the file if missing. Runs locally; copy the file to every node.
    NewKey(SecretsNewKeyArgs),
}

/// `haven secrets set`.
#[derive(Args, Debug)]
pub struct SecretsSetArgs {
    /// Secret name: letters, digits, '_', '-', '.', '/'
    pub name: String,
    /// Read the value from this file (all of it, as is)
    #[arg(long, value_name = "FILE")]
    pub value_file: Option<PathBuf>,
    /// Read all of standard input instead of one line
    #[arg(long)]
    pub multiline: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven secrets list`.
#[derive(Args, Debug)]
pub struct SecretsListArgs {
    /// Include Haven's own secrets (system/...)
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven secrets delete`.
#[derive(Args, Debug)]
pub struct SecretsDeleteArgs {
    /// Secret name
    pub name: String,
    /// Delete even if a registered upstream references it
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven secrets retire-key`.
#[derive(Args, Debug)]
pub struct SecretsRetireArgs {
    /// Key id, as `haven secrets keys` lists it
    pub kid: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven secrets new-key`.
#[derive(Args, Debug)]
pub struct SecretsNewKeyArgs {
    /// Key file to append to (created, mode 0600, if missing)
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
}

/// `haven backup` subcommands.
#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Ask the running node to ship every committed change now (and a snapshot with
    /// --snapshot).
    Now(BackupNowArgs),
    /// Show the backup's generations, snapshots, segments, restorable range and lag.
    List(BackupListArgs),
    /// Check every object against the manifest and the chain for continuity.
    Verify(BackupTargetArgs),
    /// Build a data directory holding exactly the state as of a point.
    Restore(BackupRestoreArgs),
    /// Create a new backup encryption key file.
    Keygen(BackupKeygenArgs),
}

/// Where a backup is and how to read it.
#[derive(Args, Debug)]
pub struct BackupTargetArgs {
    /// Backup location: a directory, file:///DIR or s3://BUCKET/PREFIX
    #[arg(long, env = "HAVEN_BACKUP_URL", value_name = "URL")]
    pub backup_url: Option<String>,
    /// File holding the backup encryption key (64 hex digits); it must not be readable by
    /// group or others (chmod 600)
    #[arg(long, env = "HAVEN_BACKUP_KEY_FILE", value_name = "FILE")]
    pub backup_key_file: Option<PathBuf>,
    /// Command that prints the backup encryption key (as in a key file) instead of a file,
    /// e.g. one asking a KMS or a vault; split into words like a shell would and run without
    /// one
    #[arg(long, env = "HAVEN_BACKUP_KEY_COMMAND", value_name = "COMMAND")]
    pub backup_key_command: Option<String>,
    /// TOML file with settings (backup_url, backup_key_file, ...)
    #[arg(long, env = "HAVEN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// `haven backup list`.
#[derive(Args, Debug)]
pub struct BackupListArgs {
    #[command(flatten)]
    pub target: BackupTargetArgs,
    /// Admin API of the node to ask for the live backup lag: its --admin-listen address if it
    /// has one, else its --listen address [default: the URL in DATA/admin.url, which the node
    /// writes at start, else http://127.0.0.1:8080]
    #[arg(long, env = "HAVEN_NODE", value_name = "URL")]
    pub node: Option<String>,
    /// Admin token file of that node [default: HAVEN_ADMIN_TOKEN, else DATA/admin.token]
    #[arg(long, env = "HAVEN_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Data directory of that node (where its admin token is) [default: ./haven-data]
    #[arg(long, env = "HAVEN_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
}

/// `haven backup restore`.
#[derive(Args, Debug)]
pub struct BackupRestoreArgs {
    #[command(flatten)]
    pub target: BackupTargetArgs,
    /// Directory to create with the restored state
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Restore every change committed at or before this time (RFC 3339)
    #[arg(long, value_name = "TIME", conflicts_with = "seq")]
    pub at: Option<String>,
    /// Restore every change with sequence at most N
    #[arg(long, value_name = "N")]
    pub seq: Option<u64>,
    /// Generation to restore from [default: chosen from the point]
    #[arg(long, value_name = "ID")]
    pub generation: Option<String>,
    /// Replace the directory if it is not empty
    #[arg(long)]
    pub overwrite: bool,
}

/// `haven backup now`.
#[derive(Args, Debug)]
pub struct BackupNowArgs {
    /// Also take a full snapshot (unless the newest one already holds the current state:
    /// then it says so)
    #[arg(long)]
    pub snapshot: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `haven backup keygen`.
#[derive(Args, Debug)]
pub struct BackupKeygenArgs {
    /// File to create (never overwritten)
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Backup settings of `haven serve`.
#[derive(Args, Debug, Default)]
pub struct BackupServeArgs {
    /// Ship the change log to this location: a directory, file:///DIR or s3://BUCKET/PREFIX
    /// (S3 endpoint and credentials from AWS_* variables) [default: no backup]
    #[arg(long, env = "HAVEN_BACKUP_URL", value_name = "URL")]
    pub backup_url: Option<String>,
    /// More locations to ship the same backups to (e.g. a bucket in another region),
    /// comma-separated or repeated; each has its own shipping state and lag
    #[arg(
        long,
        env = "HAVEN_BACKUP_ALSO",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub backup_also: Vec<String>,
    /// File holding the backup encryption key; create one with `haven backup keygen`. It must
    /// not be readable by group or others (chmod 600)
    #[arg(long, env = "HAVEN_BACKUP_KEY_FILE", value_name = "FILE")]
    pub backup_key_file: Option<PathBuf>,
    /// Command that prints the backup encryption key (as in a key file) instead of a file,
    /// e.g. one asking a KMS or a vault; split into words like a shell would and run without
    /// one
    #[arg(long, env = "HAVEN_BACKUP_KEY_COMMAND", value_name = "COMMAND")]
    pub backup_key_command: Option<String>,
    /// How often new changes are shipped, e.g. 1s, 60s, 5m [default: 60s]
    #[arg(long, env = "HAVEN_BACKUP_INTERVAL", value_name = "DURATION")]
    pub backup_interval: Option<String>,
    /// How often a full snapshot is taken [default: 24h]
    #[arg(long, env = "HAVEN_SNAPSHOT_INTERVAL", value_name = "DURATION")]
    pub snapshot_interval: Option<String>,
    /// How often the whole backup is verified [default: 7d]
    #[arg(long, env = "HAVEN_BACKUP_VERIFY_INTERVAL", value_name = "DURATION")]
    pub backup_verify_interval: Option<String>,
    /// How often retention is applied to the backup [default: 1h]
    #[arg(long, env = "HAVEN_BACKUP_PRUNE_INTERVAL", value_name = "DURATION")]
    pub backup_prune_interval: Option<String>,
    /// Every point of this recent period stays restorable [default: 24h]
    #[arg(long, env = "HAVEN_BACKUP_PITR_WINDOW", value_name = "DURATION")]
    pub backup_pitr_window: Option<String>,
    /// Snapshots kept beyond the window, as hourly,daily,monthly,yearly counts
    /// [default: 24,30,12,7]
    #[arg(long, env = "HAVEN_BACKUP_KEEP", value_name = "H,D,M,Y")]
    pub backup_keep: Option<String>,
    /// Objects older than this move to the archive storage class (S3) [default: 30d]
    #[arg(long, env = "HAVEN_BACKUP_ARCHIVE_AFTER", value_name = "DURATION")]
    pub backup_archive_after: Option<String>,
    /// Archive storage class [default: GLACIER_IR]
    #[arg(long, env = "HAVEN_BACKUP_ARCHIVE_CLASS", value_name = "CLASS")]
    pub backup_archive_class: Option<String>,
    /// Nothing older than this is kept [default: 7y]
    #[arg(long, env = "HAVEN_BACKUP_ARCHIVE_RETENTION", value_name = "DURATION")]
    pub backup_archive_retention: Option<String>,
}

/// TLS to the NATS servers (any of these makes TLS required).
#[derive(Args, Debug, Default, Clone)]
pub struct NatsTlsArgs {
    /// Require TLS to the NATS servers, verified against the system's roots unless
    /// --nats-ca-file is given (implied by the other --nats-* TLS options and by tls:// URLs)
    #[arg(long, env = "HAVEN_NATS_TLS", help_heading = "Cluster mode")]
    pub nats_tls: bool,
    /// CA certificate(s) (PEM) the NATS servers' certificates are verified against
    #[arg(
        long,
        env = "HAVEN_NATS_CA_FILE",
        value_name = "FILE",
        help_heading = "Cluster mode"
    )]
    pub nats_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to the NATS servers (mutual TLS; with --nats-key)
    #[arg(
        long,
        env = "HAVEN_NATS_CERT",
        value_name = "FILE",
        requires = "nats_key",
        help_heading = "Cluster mode"
    )]
    pub nats_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, readable by its owner only)
    #[arg(
        long,
        env = "HAVEN_NATS_KEY",
        value_name = "FILE",
        requires = "nats_cert",
        help_heading = "Cluster mode"
    )]
    pub nats_key: Option<PathBuf>,
}

impl NatsTlsArgs {
    /// The TLS settings for `servers` from these flags alone (commands without a settings
    /// file).
    pub fn resolve_flags(&self, servers: &[String]) -> Result<haven_state::NatsTls> {
        self.resolve(&mut FileSettings::default(), Some(servers))
    }

    /// The TLS settings for `servers`, from these flags over the file's keys.
    fn resolve(
        &self,
        file: &mut FileSettings,
        servers: Option<&[String]>,
    ) -> Result<haven_state::NatsTls> {
        let ca_file = self.nats_ca_file.clone().or(file.nats_ca_file.take());
        let cert = self.nats_cert.clone().or(file.nats_cert.take());
        let key = self.nats_key.clone().or(file.nats_key.take());
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(haven_state::tls::Identity { cert, key }),
            (None, None) => None,
            _ => bail!("nats_cert and nats_key go together: give both or neither"),
        };
        let tls_urls = servers.is_some_and(|s| s.iter().any(|u| u.starts_with("tls://")));
        let tls = haven_state::NatsTls {
            require: self.nats_tls || file.nats_tls.unwrap_or(false) || tls_urls,
            ca_file,
            identity,
        };
        if tls.enabled() && servers.is_none() {
            bail!("the nats TLS settings need a NATS store (--store nats://... or tls://...)");
        }
        Ok(tls)
    }
}

/// Settings shared by every command.
#[derive(Args, Debug, Default)]
pub struct CommonArgs {
    /// Data directory (created if missing) [default: ./haven-data]
    #[arg(long, env = "HAVEN_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Built-in catalog to serve next to federated upstreams: default, conformance or none
    /// (the `catalog` runtime setting wins once set) [default: default]
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
    #[arg(
        long,
        env = "HAVEN_REGION",
        value_name = "NAME",
        help_heading = "Cluster mode"
    )]
    pub region: Option<String>,
    /// Log filter, e.g. info or haven_mcp=debug [default: info]
    #[arg(
        long,
        env = "HAVEN_LOG",
        value_name = "FILTER",
        help_heading = "Logs, traces and metrics"
    )]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(
        long,
        env = "HAVEN_LOG_FORMAT",
        value_name = "FORMAT",
        help_heading = "Logs, traces and metrics"
    )]
    pub log_format: Option<String>,
    /// Export traces by OTLP over HTTP (protobuf) to this collector, e.g.
    /// http://127.0.0.1:4318 (spans go to its /v1/traces) [default: no export]
    #[arg(
        long,
        env = "HAVEN_OTLP_ENDPOINT",
        value_name = "URL",
        help_heading = "Logs, traces and metrics"
    )]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0 to 1; a request whose caller sampled its trace is
    /// always sampled [default: 1]
    #[arg(
        long,
        env = "HAVEN_TRACE_SAMPLE_RATIO",
        value_name = "RATIO",
        help_heading = "Logs, traces and metrics"
    )]
    pub trace_sample_ratio: Option<f64>,
    /// Keep metrics (on) or not (off: no /metrics, and the status page has no traffic
    /// figures; for measuring what they cost) [default: on]
    #[arg(
        long,
        env = "HAVEN_METRICS",
        value_name = "on|off",
        help_heading = "Logs, traces and metrics"
    )]
    pub metrics: Option<String>,
    /// How legacy-era requests are answered: adaptive (JSON when a request finishes at once,
    /// otherwise a resumable SSE stream) or sse (always a stored, resumable stream)
    /// [default: adaptive]
    #[arg(
        long,
        env = "HAVEN_LEGACY_RESPONSES",
        value_name = "MODE",
        help_heading = "MCP sessions"
    )]
    pub legacy_responses: Option<String>,
    /// Seconds a legacy session lives without being used [default: 86400]
    #[arg(
        long,
        env = "HAVEN_SESSION_TTL",
        value_name = "SECS",
        help_heading = "MCP sessions"
    )]
    pub session_ttl: Option<u64>,
    /// Items per page of list results (tools/list, resources/list, ...) [default: 100]
    #[arg(
        long,
        env = "HAVEN_PAGE_SIZE",
        value_name = "N",
        help_heading = "MCP sessions"
    )]
    pub page_size: Option<usize>,
    /// Worker threads of the async runtime [default: one per core]
    #[arg(long, env = "HAVEN_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Where state lives: `embedded` (a redb file in the data directory) or a NATS JetStream
    /// cluster, `nats://HOST:PORT[,HOST:PORT...]` (one stream per --region) [default: embedded]
    #[arg(
        long,
        env = "HAVEN_STORE",
        value_name = "STORE",
        help_heading = "Cluster mode"
    )]
    pub store: Option<String>,
    /// Replicas of the region's JetStream stream (3: a write survives the loss of any one
    /// NATS server) [default: 3]
    #[arg(
        long,
        env = "HAVEN_STORE_REPLICAS",
        value_name = "N",
        help_heading = "Cluster mode"
    )]
    pub store_replicas: Option<usize>,
    /// Monitoring endpoints of the NATS servers (`http://HOST:8222[,...]`): at start each
    /// server's `/varz` says whether it syncs every write (`sync_interval: always`), a warning
    /// when not (a client connection cannot learn it) [default: not checked]
    #[arg(long, env = "HAVEN_NATS_MONITOR", value_name = "URL,...")]
    pub nats_monitor: Option<String>,
    /// File of key-encryption keys for secrets (`<kid> <base64 key>` per line, the last one
    /// wraps new data keys). The keys may also come from HAVEN_SECRETS_KEYS (lines separated by
    /// `;`). Every node of a region needs the same keys. [default on an embedded store:
    /// DATA/secrets.keys, created on first start; a NATS store requires one of the two]
    #[arg(
        long,
        env = "HAVEN_SECRETS_KEY_FILE",
        value_name = "FILE",
        help_heading = "Secrets"
    )]
    pub secrets_key_file: Option<PathBuf>,
    /// Command that prints the key-encryption keys for secrets (the key file's format)
    /// instead of a file, e.g. one asking a KMS or a vault; split into words like a shell
    /// would and run without one, at start and again at every `haven secrets rotate-key`
    #[arg(
        long,
        env = "HAVEN_SECRETS_KEY_COMMAND",
        value_name = "COMMAND",
        help_heading = "Secrets"
    )]
    pub secrets_key_command: Option<String>,
    #[command(flatten)]
    pub nats_tls: NatsTlsArgs,
}

/// Settings of `haven serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "HAVEN_LISTEN", value_name = "ADDR", help_heading = "HTTP")]
    pub listen: Option<String>,
    /// Host names accepted in Host and Origin headers (DNS-rebinding protection),
    /// comma-separated; * accepts any [default: localhost,127.0.0.1,[::1]]
    #[arg(
        long,
        env = "HAVEN_ALLOWED_HOSTS",
        value_name = "HOSTS",
        value_delimiter = ',',
        help_heading = "HTTP"
    )]
    pub allowed_hosts: Option<Vec<String>>,
    /// Largest accepted request body in bytes [default: 4194304]
    #[arg(
        long,
        env = "HAVEN_MAX_BODY_BYTES",
        value_name = "BYTES",
        help_heading = "HTTP"
    )]
    pub max_body_bytes: Option<usize>,
    /// On SIGTERM, how long running requests may take to finish before the node exits
    /// [default: 30s]
    #[arg(
        long,
        env = "HAVEN_DRAIN_TIMEOUT",
        value_name = "DURATION",
        help_heading = "Cluster mode"
    )]
    pub drain_timeout: Option<String>,
    /// Largest clock difference between the nodes of a region that is not reported as skew
    /// (in status and logs; liveness never depends on clocks) [default: 500ms]
    #[arg(
        long,
        env = "HAVEN_MAX_CLOCK_SKEW",
        value_name = "DURATION",
        help_heading = "Cluster mode"
    )]
    pub max_clock_skew: Option<String>,
    /// File holding the admin API token (/admin/v1), mode 0600 or 0400 [default: the token
    /// itself in HAVEN_ADMIN_TOKEN, else DATA/admin.token, created on first start]
    #[arg(
        long,
        env = "HAVEN_ADMIN_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Admin API"
    )]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the admin API (/admin/v1) on this address of its own, e.g. 127.0.0.1:8081, and
    /// no longer on the MCP listener (so /mcp can be public while the admin API stays on
    /// loopback) [default: on the MCP listener]
    #[arg(
        long,
        env = "HAVEN_ADMIN_LISTEN",
        value_name = "ADDR",
        help_heading = "Admin API"
    )]
    pub admin_listen: Option<String>,
    /// Also serve /metrics, without credentials, on this address of its own (e.g. an
    /// address only the Prometheus network reaches) [default: /metrics only on the admin
    /// API, with its credentials]
    #[arg(
        long,
        env = "HAVEN_METRICS_LISTEN",
        value_name = "ADDR",
        help_heading = "Logs, traces and metrics"
    )]
    pub metrics_listen: Option<String>,
    /// The Prometheus whose alerts (firing and pending) the status page (/status) and
    /// `haven status` show, e.g. http://127.0.0.1:9090 [default: none; the page shows
    /// Haven's own findings only]
    #[arg(
        long,
        env = "HAVEN_ALERTS_URL",
        value_name = "URL",
        help_heading = "Logs, traces and metrics"
    )]
    pub alerts_url: Option<String>,
    /// Serve over TLS with this certificate chain (PEM, the leaf first; with --tls-key),
    /// reloaded when the file changes [default: plain HTTP]
    #[arg(
        long,
        env = "HAVEN_TLS_CERT",
        value_name = "FILE",
        help_heading = "TLS"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM, readable by its owner only)
    #[arg(long, env = "HAVEN_TLS_KEY", value_name = "FILE", help_heading = "TLS")]
    pub tls_key: Option<PathBuf>,
    /// Oldest TLS version accepted: 1.3 or 1.2 [default: 1.3]
    #[arg(
        long,
        env = "HAVEN_TLS_MIN_VERSION",
        value_name = "VERSION",
        help_heading = "TLS"
    )]
    pub tls_min_version: Option<String>,
    /// The admin listener's own certificate (with --admin-listen and --admin-tls-key)
    /// [default: the --tls-cert pair when TLS is on, else plain HTTP]
    #[arg(
        long,
        env = "HAVEN_ADMIN_TLS_CERT",
        value_name = "FILE",
        help_heading = "TLS"
    )]
    pub admin_tls_cert: Option<PathBuf>,
    /// The admin certificate's private key (PEM, readable by its owner only)
    #[arg(
        long,
        env = "HAVEN_ADMIN_TLS_KEY",
        value_name = "FILE",
        help_heading = "TLS"
    )]
    pub admin_tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) trusted for https:// upstreams besides the system's roots
    /// [default: the system's roots only]
    #[arg(
        long,
        env = "HAVEN_UPSTREAM_CA",
        value_name = "FILE",
        help_heading = "TLS"
    )]
    pub upstream_ca: Option<PathBuf>,
    /// Start with every registered upstream held: none is connected or started on this node
    /// (no stdio process spawned, no HTTP upstream called) and their calls fail with
    /// `not_connected`, e.g. for a restore drill; restart without it to start them
    /// [default: off]
    #[arg(long, env = "HAVEN_HOLD_UPSTREAMS")]
    pub hold_upstreams: bool,
    /// Other regions whose change logs this region applies, comma-separated (a NATS store
    /// only: each region's servers run JetStream with `domain: <region name>` and are joined
    /// to the others' by leafnodes) [default: none]
    #[arg(
        long,
        env = "HAVEN_PEER_REGIONS",
        value_name = "REGIONS",
        value_delimiter = ',',
        help_heading = "Multi-region"
    )]
    pub peer_regions: Option<Vec<String>>,
    /// How often another region's health is checked (its heartbeats must change between
    /// checks), at least 1s [default: 10s]
    #[arg(
        long,
        env = "HAVEN_REGION_CHECK_INTERVAL",
        value_name = "DURATION",
        help_heading = "Multi-region"
    )]
    pub region_check_interval: Option<String>,
    /// Failed checks in a row after which a region is judged failed; the active role moves
    /// only when a majority of regions judge the active one failed [default: 3]
    #[arg(
        long,
        env = "HAVEN_REGION_FAILURE_THRESHOLD",
        value_name = "N",
        help_heading = "Multi-region"
    )]
    pub region_failure_threshold: Option<u32>,
    #[command(flatten, next_help_heading = "Backup")]
    pub backup: BackupServeArgs,
    #[command(flatten, next_help_heading = "Authentication")]
    pub auth: AuthArgs,
}

/// Authentication of `/mcp`: the OAuth 2.1 resource server and API keys.
#[derive(Args, Debug, Default)]
pub struct AuthArgs {
    /// Require a credential on /mcp: `on` (an OAuth access token from --oauth-issuer, or an
    /// API key), or `off` (anyone who reaches the listener) [default: on when --oauth-issuer
    /// is given, else off]
    #[arg(long = "auth", env = "HAVEN_AUTH", value_name = "on|off")]
    pub auth: Option<String>,
    /// The OAuth authorization server whose access tokens are accepted (its issuer
    /// identifier; its keys are found through its metadata unless --oauth-jwks-uri is given)
    #[arg(long, env = "HAVEN_OAUTH_ISSUER", value_name = "URL")]
    pub oauth_issuer: Option<String>,
    /// This server's canonical resource URL, which every token's audience must name, e.g.
    /// https://mcp.example.com/mcp [default: http://LISTEN/mcp]
    #[arg(long, env = "HAVEN_OAUTH_RESOURCE", value_name = "URL")]
    pub oauth_resource: Option<String>,
    /// The issuer's JWKS URL [default: discovered from the issuer's metadata]
    #[arg(long, env = "HAVEN_OAUTH_JWKS_URI", value_name = "URL")]
    pub oauth_jwks_uri: Option<String>,
    /// Scopes every /mcp request needs, comma-separated [default: none]
    #[arg(
        long,
        env = "HAVEN_OAUTH_SCOPES",
        value_name = "SCOPES",
        value_delimiter = ','
    )]
    pub oauth_scopes: Option<Vec<String>>,
    /// JWT signature algorithms accepted, comma-separated (asymmetric only)
    /// [default: RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,EdDSA]
    #[arg(
        long,
        env = "HAVEN_OAUTH_ALGORITHMS",
        value_name = "ALGS",
        value_delimiter = ','
    )]
    pub oauth_algorithms: Option<Vec<String>>,
    /// Token claims that name the caller's groups or roles, comma-separated
    /// [default: groups,roles]
    #[arg(
        long,
        env = "HAVEN_OAUTH_GROUP_CLAIMS",
        value_name = "CLAIMS",
        value_delimiter = ','
    )]
    pub oauth_group_claims: Option<Vec<String>>,
    /// Leeway on a token's exp and nbf [default: 30s]
    #[arg(long, env = "HAVEN_OAUTH_LEEWAY", value_name = "DURATION")]
    pub oauth_leeway: Option<String>,
    /// Shortest time between two fetches of the issuer's keys caused by tokens naming an
    /// unknown key id [default: 30s]
    #[arg(long, env = "HAVEN_OAUTH_JWKS_REFRESH", value_name = "DURATION")]
    pub oauth_jwks_refresh: Option<String>,
    /// PEM file of CA certificates to trust for the issuer's HTTPS endpoints, besides the
    /// system's [default: the system's only]
    #[arg(long, env = "HAVEN_OAUTH_CA_FILE", value_name = "FILE")]
    pub oauth_ca_file: Option<PathBuf>,
}

/// The `[auth]` table of the TOML file: the same settings as the `--auth`/`--oauth-*` flags.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    auth: Option<String>,
    oauth_issuer: Option<String>,
    oauth_resource: Option<String>,
    oauth_jwks_uri: Option<String>,
    oauth_scopes: Option<Vec<String>>,
    oauth_algorithms: Option<Vec<String>>,
    oauth_group_claims: Option<Vec<String>>,
    oauth_leeway: Option<String>,
    oauth_jwks_refresh: Option<String>,
    oauth_ca_file: Option<PathBuf>,
}

/// Resolved authentication of `/mcp` (`None` in [`Settings::auth`]: off).
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The canonical resource URL of `/mcp`.
    pub resource: String,
    /// Access tokens of this issuer are accepted (`None`: API keys only).
    pub oauth: Option<haven_auth::OAuthSettings>,
    /// Scopes every request needs.
    pub required_scopes: Vec<String>,
}

impl AuthSettings {
    fn resolve(given: &AuthArgs, file: AuthFile, listen: &str) -> Result<Option<AuthSettings>> {
        let mode = given.auth.clone().or(file.auth);
        let issuer = given.oauth_issuer.clone().or(file.oauth_issuer);
        let on = match mode.as_deref().map(str::trim) {
            Some("on") => true,
            Some("off") => {
                anyhow::ensure!(
                    issuer.is_none(),
                    "auth is off but an OAuth issuer is given: set auth to on, or remove oauth_issuer"
                );
                false
            }
            Some(other) => anyhow::bail!("auth must be on or off, not {other:?}"),
            None => issuer.is_some(),
        };
        if !on {
            return Ok(None);
        }
        let resource = given
            .oauth_resource
            .clone()
            .or(file.oauth_resource)
            .unwrap_or_else(|| format!("http://{listen}/mcp"));
        let required_scopes: Vec<String> = given
            .oauth_scopes
            .clone()
            .or(file.oauth_scopes)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        for s in &required_scopes {
            anyhow::ensure!(
                s.chars()
                    .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\'),
                "the scope {s:?} has characters a scope cannot have"
            );
        }
        let oauth = match issuer {
            None => None,
            Some(issuer) => {
                let mut o = haven_auth::OAuthSettings::new(issuer, resource.clone());
                o.jwks_uri = given.oauth_jwks_uri.clone().or(file.oauth_jwks_uri);
                if let Some(a) = given.oauth_algorithms.clone().or(file.oauth_algorithms) {
                    o.algorithms = a
                        .iter()
                        .map(|n| haven_auth::oauth::parse_algorithm(n))
                        .collect::<std::result::Result<_, _>>()
                        .map_err(|e| anyhow::anyhow!("oauth_algorithms: {e}"))?;
                }
                if let Some(c) = given.oauth_group_claims.clone().or(file.oauth_group_claims) {
                    o.group_claims = c;
                }
                if let Some(l) = given.oauth_leeway.clone().or(file.oauth_leeway) {
                    o.leeway_secs = parse_duration(&l)
                        .with_context(|| format!("oauth_leeway {l:?}"))?
                        .as_secs();
                }
                if let Some(r) = given.oauth_jwks_refresh.clone().or(file.oauth_jwks_refresh) {
                    o.jwks_min_refresh =
                        parse_duration(&r).with_context(|| format!("oauth_jwks_refresh {r:?}"))?;
                }
                o.ca_file = given.oauth_ca_file.clone().or(file.oauth_ca_file);
                // Checks the URLs and the algorithms now, so that a mistake stops the start.
                haven_auth::TokenValidator::new(o.clone(), haven_auth::oauth::system_now())
                    .map_err(|e| anyhow::anyhow!("OAuth settings: {e}"))?;
                Some(o)
            }
        };
        Ok(Some(AuthSettings {
            resource,
            oauth,
            required_scopes,
        }))
    }
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
    otlp_endpoint: Option<String>,
    trace_sample_ratio: Option<f64>,
    metrics: Option<String>,
    legacy_responses: Option<String>,
    session_ttl: Option<u64>,
    page_size: Option<usize>,
    worker_threads: Option<usize>,
    store: Option<String>,
    store_replicas: Option<usize>,
    nats_monitor: Option<String>,
    secrets_key_file: Option<PathBuf>,
    secrets_key_command: Option<String>,
    drain_timeout: Option<String>,
    max_clock_skew: Option<String>,
    listen: Option<String>,
    allowed_hosts: Option<Vec<String>>,
    max_body_bytes: Option<usize>,
    admin_token_file: Option<PathBuf>,
    admin_listen: Option<String>,
    metrics_listen: Option<String>,
    alerts_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_min_version: Option<String>,
    admin_tls_cert: Option<PathBuf>,
    admin_tls_key: Option<PathBuf>,
    upstream_ca: Option<PathBuf>,
    hold_upstreams: Option<bool>,
    nats_tls: Option<bool>,
    nats_ca_file: Option<PathBuf>,
    nats_cert: Option<PathBuf>,
    nats_key: Option<PathBuf>,
    peer_regions: Option<Vec<String>>,
    region_check_interval: Option<String>,
    region_failure_threshold: Option<u32>,
    backup_url: Option<String>,
    backup_also: Option<Vec<String>>,
    backup_key_file: Option<PathBuf>,
    backup_key_command: Option<String>,
    backup_interval: Option<String>,
    snapshot_interval: Option<String>,
    backup_verify_interval: Option<String>,
    backup_prune_interval: Option<String>,
    backup_pitr_window: Option<String>,
    backup_keep: Option<String>,
    backup_archive_after: Option<String>,
    backup_archive_class: Option<String>,
    backup_archive_retention: Option<String>,
    auth: Option<AuthFile>,
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
    /// Where traces are exported (OTLP/HTTP; `None`: not exported).
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled.
    pub trace_sample_ratio: f64,
    /// Whether the process keeps metrics.
    pub metrics: bool,
    pub legacy_responses: LegacyResponses,
    pub session_ttl_secs: u64,
    pub page_size: usize,
    pub worker_threads: Option<usize>,
    /// `None`: embedded; else the NATS server URLs.
    pub nats: Option<Vec<String>>,
    pub store_replicas: usize,
    /// The NATS servers' monitoring endpoints (`--nats-monitor`), checked at start.
    pub nats_monitor: Vec<String>,
    pub drain_timeout: Duration,
    pub max_clock_skew: Duration,
    pub listen: String,
    pub allowed_hosts: Vec<String>,
    pub max_body_bytes: usize,
    pub admin_token_file: Option<PathBuf>,
    /// The admin API's own address (`None`: it shares the MCP listener).
    pub admin_listen: Option<String>,
    /// An address serving /metrics without credentials (`None`: only the admin API's).
    pub metrics_listen: Option<String>,
    /// The Prometheus whose alerts the status page shows.
    pub alerts_url: Option<reqwest::Url>,
    /// TLS of the MCP listener (`None`: plain HTTP).
    pub tls: Option<haven_server::TlsFiles>,
    /// Oldest TLS version the listeners accept.
    pub tls_min_version: haven_server::MinVersion,
    /// TLS of the admin listener (`None`: plain HTTP); the MCP listener's pair by default.
    pub admin_tls: Option<haven_server::TlsFiles>,
    /// More CA certificates trusted for https:// upstreams.
    pub upstream_ca: Option<PathBuf>,
    /// Registered upstreams are not started on this node.
    pub hold_upstreams: bool,
    /// TLS to the NATS servers.
    pub nats_tls: haven_state::NatsTls,
    pub secrets_key_file: Option<PathBuf>,
    pub secrets_key_command: Option<String>,
    pub backup: Option<BackupSettings>,
    /// Other regions this one applies the logs of (empty: one region).
    pub peer_regions: Vec<String>,
    /// Health checks of the other regions.
    pub region_health: haven_cluster::regions::HealthConfig,
    /// Authentication of `/mcp` (`None`: off).
    pub auth: Option<AuthSettings>,
}

/// Resolved backup settings of `haven serve`.
#[derive(Debug, Clone)]
pub struct BackupSettings {
    pub url: String,
    /// More targets, each shipped on its own.
    pub also: Vec<String>,
    pub key: KeySource,
    pub interval: Duration,
    pub snapshot_interval: Duration,
    pub verify_interval: Duration,
    pub prune_interval: Duration,
    pub retention: haven_backup::RetentionPolicy,
}

/// Where a key comes from: a file (which must be private to its owner) or a command that
/// prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Command(String),
}

impl KeySource {
    /// The pair of settings `<name>_file` / `<name>_command`: flags and environment first (both
    /// at once is an error), then the TOML file's (likewise).
    fn resolve(
        name: &str,
        given: (Option<PathBuf>, Option<String>),
        file: (Option<PathBuf>, Option<String>),
    ) -> Result<Option<KeySource>> {
        let pick = |(f, c): (Option<PathBuf>, Option<String>), whence: &str| match (f, c) {
            (Some(_), Some(_)) => bail!(
                "{name}_file and {name}_command are both set{whence}: the key comes from one of them"
            ),
            (Some(f), None) => Ok(Some(KeySource::File(f))),
            (None, Some(c)) => Ok(Some(KeySource::Command(c))),
            (None, None) => Ok(None),
        };
        match pick(given, " (flags or environment)")? {
            Some(k) => Ok(Some(k)),
            None => pick(file, " in the config file"),
        }
    }

    /// The backup key it holds (runs the command: blocks until it ends).
    pub fn backup_key(&self) -> Result<haven_backup::BackupKey> {
        Ok(match self {
            KeySource::File(f) => haven_backup::BackupKey::from_file(f)?,
            KeySource::Command(c) => haven_backup::BackupKey::from_command(c)?,
        })
    }
}

/// Parses a duration: a number of seconds, or a number with a unit: ms, s, m, h, d, y.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid duration {text:?}: use e.g. 1s, 60s, 5m, 24h, 7d, 7y"))?;
    let unit_millis: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "y" => 365 * 86_400_000,
        other => bail!("invalid duration unit {other:?} in {text:?}: use ms, s, m, h, d or y"),
    };
    let millis = n
        .checked_mul(unit_millis)
        .filter(|m| *m <= 1000 * 365 * 86_400_000)
        .with_context(|| format!("duration {text:?} is too long (at most 1000y)"))?;
    Ok(Duration::from_millis(millis))
}

/// A duration setting: its value (flag, environment or file) or `default`.
fn duration_setting(value: Option<String>, default: &str, name: &str) -> Result<Duration> {
    let text = value.unwrap_or_else(|| default.to_owned());
    parse_duration(&text).with_context(|| format!("setting {name}"))
}

/// The retention policy of backups: the point-in-time window, archiving and the counts kept.
fn retention_policy(
    a: &BackupServeArgs,
    file: &mut FileSettings,
) -> Result<haven_backup::RetentionPolicy> {
    let mut retention = haven_backup::RetentionPolicy {
        pitr_window_millis: duration_setting(
            a.backup_pitr_window
                .clone()
                .or(file.backup_pitr_window.take()),
            "24h",
            "backup_pitr_window",
        )?
        .as_millis() as u64,
        archive_retention_millis: duration_setting(
            a.backup_archive_retention
                .clone()
                .or(file.backup_archive_retention.take()),
            "7y",
            "backup_archive_retention",
        )?
        .as_millis() as u64,
        ..haven_backup::RetentionPolicy::default()
    };
    let archive_after = a
        .backup_archive_after
        .clone()
        .or(file.backup_archive_after.take());
    retention.archive_after_millis = match archive_after.as_deref() {
        Some("never") => None,
        Some(t) => Some(
            parse_duration(t)
                .context("setting backup_archive_after")?
                .as_millis() as u64,
        ),
        None => retention.archive_after_millis,
    };
    if let Some(class) = a
        .backup_archive_class
        .clone()
        .or(file.backup_archive_class.take())
    {
        // Classes that need a restore request before an object can be read would make
        // archived points unrestorable by `haven backup restore`.
        const INSTANT: &[&str] = &[
            "STANDARD_IA",
            "ONEZONE_IA",
            "INTELLIGENT_TIERING",
            "GLACIER_IR",
        ];
        if !INSTANT.contains(&class.as_str()) {
            bail!(
                "backup_archive_class {class:?} is not supported: archived objects must stay readable without a restore request; use one of {}",
                INSTANT.join(", ")
            );
        }
        retention.archive_class = class;
    }
    if let Some(keep) = a.backup_keep.clone().or(file.backup_keep.take()) {
        let n: Vec<usize> = keep
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .ok()
            .filter(|v: &Vec<usize>| v.len() == 4)
            .with_context(|| format!("invalid backup_keep {keep:?}: use four counts, hourly,daily,monthly,yearly, e.g. 24,30,12,7"))?;
        retention.hourly = n[0];
        retention.daily = n[1];
        retention.monthly = n[2];
        retention.yearly = n[3];
    }
    Ok(retention)
}

impl BackupSettings {
    fn resolve(
        args: Option<&BackupServeArgs>,
        file: &mut FileSettings,
    ) -> Result<Option<BackupSettings>> {
        let d = BackupServeArgs::default();
        let a = args.unwrap_or(&d);
        let Some(url) = a.backup_url.clone().or(file.backup_url.take()) else {
            return Ok(None);
        };
        let key = KeySource::resolve(
            "backup_key",
            (a.backup_key_file.clone(), a.backup_key_command.clone()),
            (file.backup_key_file.take(), file.backup_key_command.take()),
        )?;
        let Some(key) = key else {
            bail!(
                "backups need an encryption key: create one with `haven backup keygen --out FILE`, keep it outside the data directory, and pass --backup-key-file FILE (or --backup-key-command COMMAND that prints it)"
            );
        };
        let interval = duration_setting(
            a.backup_interval.clone().or(file.backup_interval.take()),
            "60s",
            "backup_interval",
        )?;
        if interval < Duration::from_secs(1) {
            bail!("backup_interval must be at least 1s");
        }
        let snapshot_interval = duration_setting(
            a.snapshot_interval
                .clone()
                .or(file.snapshot_interval.take()),
            "24h",
            "snapshot_interval",
        )?;
        if snapshot_interval < interval {
            bail!("snapshot_interval must be at least backup_interval");
        }
        let verify_interval = duration_setting(
            a.backup_verify_interval
                .clone()
                .or(file.backup_verify_interval.take()),
            "7d",
            "backup_verify_interval",
        )?;
        let prune_interval = duration_setting(
            a.backup_prune_interval
                .clone()
                .or(file.backup_prune_interval.take()),
            "1h",
            "backup_prune_interval",
        )?;
        if prune_interval < Duration::from_secs(1) {
            bail!("backup_prune_interval must be at least 1s");
        }
        let retention = retention_policy(a, file)?;
        let also: Vec<String> = if a.backup_also.is_empty() {
            file.backup_also.take().unwrap_or_default()
        } else {
            a.backup_also.clone()
        }
        .into_iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
        for (i, u) in also.iter().enumerate() {
            if *u == url || also[..i].contains(u) {
                bail!(
                    "backup location {u} is given twice (backup_url and backup_also must all differ)"
                );
            }
        }
        Ok(Some(BackupSettings {
            url,
            also,
            key,
            interval,
            snapshot_interval,
            verify_interval,
            prune_interval,
            retention,
        }))
    }
}

impl FileSettings {
    /// The settings of the TOML file `--config` names; none without one.
    fn load(config: Option<&Path>) -> Result<FileSettings> {
        let Some(path) = config else {
            return Ok(FileSettings::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing the config file {}", path.display()))
    }
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
            Command::Backup(_)
            | Command::Status(_)
            | Command::Registry(_)
            | Command::Config(_)
            | Command::Secrets(_)
            | Command::Region(_)
            | Command::Auth(_)
            | Command::Audit(_)
            | Command::Drill(_)
            | Command::Chaos(_) => {
                bail!("this command has no server settings")
            }
        }
    }

    /// Merges flags/environment (already combined by clap) over the file over defaults.
    // Long by design: one merge per setting, in the order their errors are reported.
    pub fn resolve(common: &CommonArgs, serve: Option<&ServeArgs>) -> Result<Settings> {
        let mut file = FileSettings::load(common.config.as_deref())?;
        let backup = BackupSettings::resolve(serve.map(|s| &s.backup), &mut file)?;
        let admin_token_file = serve
            .and_then(|s| s.admin_token_file.clone())
            .or(file.admin_token_file.take());
        let metrics_listen = serve
            .and_then(|s| s.metrics_listen.clone())
            .or(file.metrics_listen.take());
        let alerts_url = match serve
            .and_then(|s| s.alerts_url.clone())
            .or(file.alerts_url.take())
        {
            None => None,
            Some(u) => {
                let url = reqwest::Url::parse(&u).with_context(|| {
                    format!("alerts_url {u:?} is not a URL; give Prometheus' base URL, such as http://127.0.0.1:9090")
                })?;
                if !matches!(url.scheme(), "http" | "https") {
                    bail!("alerts_url {u:?} must be an http or https URL (Prometheus' base URL)");
                }
                Some(url)
            }
        };
        let admin_listen = serve
            .and_then(|s| s.admin_listen.clone())
            .or(file.admin_listen.take())
            .map(|a| a.trim().to_owned());
        let secrets_key = KeySource::resolve(
            "secrets_key",
            (
                common.secrets_key_file.clone(),
                common.secrets_key_command.clone(),
            ),
            (
                file.secrets_key_file.take(),
                file.secrets_key_command.take(),
            ),
        )?;
        let store = common
            .store
            .clone()
            .or(file.store.take())
            .unwrap_or_else(|| "embedded".into());
        let nats = nats_servers(&store)?;
        let nats_tls = common.nats_tls.resolve(&mut file, nats.as_deref())?;
        let tls = tls_pair(
            "tls",
            serve
                .and_then(|s| s.tls_cert.clone())
                .or(file.tls_cert.take()),
            serve
                .and_then(|s| s.tls_key.clone())
                .or(file.tls_key.take()),
        )?;
        let admin_tls = tls_pair(
            "admin_tls",
            serve
                .and_then(|s| s.admin_tls_cert.clone())
                .or(file.admin_tls_cert.take()),
            serve
                .and_then(|s| s.admin_tls_key.clone())
                .or(file.admin_tls_key.take()),
        )?;
        if admin_tls.is_some() && admin_listen.is_none() {
            bail!(
                "admin_tls_cert needs admin_listen: without a listener of its own the admin API is served on the MCP listener, with its TLS (--tls-cert)"
            );
        }
        let admin_tls = admin_tls.or_else(|| tls.clone());
        let tls_min_version: haven_server::MinVersion = serve
            .and_then(|s| s.tls_min_version.clone())
            .or(file.tls_min_version.take())
            .map(|v| {
                v.parse()
                    .map_err(|e: String| anyhow::anyhow!("tls_min_version: {e}"))
            })
            .transpose()?
            .unwrap_or_default();
        let upstream_ca = serve
            .and_then(|s| s.upstream_ca.clone())
            .or(file.upstream_ca.take());
        let hold_upstreams =
            serve.is_some_and(|s| s.hold_upstreams) || file.hold_upstreams.unwrap_or(false);
        let store_replicas = common.store_replicas.or(file.store_replicas).unwrap_or(3);
        if !(1..=5).contains(&store_replicas) {
            bail!("store_replicas must be between 1 and 5");
        }
        let nats_monitor: Vec<String> = common
            .nats_monitor
            .clone()
            .or(file.nats_monitor.take())
            .map(|m| {
                m.split(',')
                    .map(|u| u.trim().trim_end_matches('/').to_owned())
                    .filter(|u| !u.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        for u in &nats_monitor {
            if !u.starts_with("http://") || reqwest::Url::parse(u).is_err() {
                bail!(
                    "invalid nats_monitor URL {u:?}: give the NATS servers' monitoring endpoints, e.g. http://nats-1:8222"
                );
            }
        }
        if !nats_monitor.is_empty() && nats.is_none() {
            bail!("nats_monitor needs a NATS store (--store nats://...)");
        }
        let drain_timeout = duration_setting(
            serve
                .and_then(|s| s.drain_timeout.clone())
                .or(file.drain_timeout.take()),
            "30s",
            "drain_timeout",
        )?;
        let max_clock_skew = duration_setting(
            serve
                .and_then(|s| s.max_clock_skew.clone())
                .or(file.max_clock_skew.take()),
            "500ms",
            "max_clock_skew",
        )?;
        let region_health = haven_cluster::regions::HealthConfig {
            interval: duration_setting(
                serve
                    .and_then(|s| s.region_check_interval.clone())
                    .or(file.region_check_interval.take()),
                "10s",
                "region_check_interval",
            )?,
            threshold: serve
                .and_then(|s| s.region_failure_threshold)
                .or(file.region_failure_threshold)
                .unwrap_or(3),
        };
        if region_health.interval < Duration::from_secs(1) {
            bail!("region_check_interval must be at least 1s");
        }
        if !(1..=100).contains(&region_health.threshold) {
            bail!("region_failure_threshold must be between 1 and 100");
        }
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
        let otlp_endpoint = common
            .otlp_endpoint
            .clone()
            .or(file.otlp_endpoint)
            .filter(|e| !e.trim().is_empty());
        if let Some(e) = &otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            bail!(
                "invalid otlp_endpoint {e:?}: give an http:// or https:// URL of an OTLP/HTTP collector, e.g. http://127.0.0.1:4318"
            );
        }
        let trace_sample_ratio = common
            .trace_sample_ratio
            .or(file.trace_sample_ratio)
            .unwrap_or(1.0);
        if !(0.0..=1.0).contains(&trace_sample_ratio) {
            bail!("invalid trace_sample_ratio {trace_sample_ratio}: give a share from 0 to 1");
        }
        let metrics = match common
            .metrics
            .clone()
            .or(file.metrics.take())
            .as_deref()
            .unwrap_or("on")
        {
            "on" => true,
            "off" => false,
            other => bail!("invalid metrics {other:?}: give on or off"),
        };
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
        let peer_regions: Vec<String> = serve
            .and_then(|s| s.peer_regions.clone())
            .or(file.peer_regions)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty())
            .collect();
        if !peer_regions.is_empty() {
            if nats.is_none() {
                bail!(
                    "peer_regions needs a NATS store (--store nats://...): regions replicate through JetStream"
                );
            }
            let domain_name = |r: &str| {
                r.len() <= 64
                    && r.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            };
            for r in peer_regions.iter().chain([&region]) {
                if !domain_name(r) {
                    bail!(
                        "invalid region {r:?} for multi-region: a region's name is also its JetStream domain, so use letters, digits, '-' and '_' (at most 64)"
                    );
                }
            }
            if peer_regions.contains(&region) {
                bail!("peer_regions lists this node's own region {region:?}");
            }
            let mut unique = peer_regions.clone();
            unique.sort();
            unique.dedup();
            if unique.len() != peer_regions.len() {
                bail!(
                    "peer_regions lists a region twice: {}",
                    peer_regions.join(",")
                );
            }
        }
        let listen = serve
            .and_then(|s| s.listen.clone())
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let auth = match serve {
            Some(s) => {
                AuthSettings::resolve(&s.auth, file.auth.take().unwrap_or_default(), &listen)?
            }
            None => None,
        };
        if let Some(m) = &metrics_listen
            && (m.is_empty() || *m == listen || Some(m) == admin_listen.as_ref())
        {
            bail!(
                "metrics_listen {m:?} must be an address of its own, such as 127.0.0.1:9464 (not the MCP or admin listener's)"
            );
        }
        if let Some(a) = &admin_listen {
            if a.is_empty() {
                bail!(
                    "admin_listen is empty: give an address such as 127.0.0.1:8081, or leave it unset to serve the admin API on the MCP listener"
                );
            }
            if *a == listen {
                bail!(
                    "admin_listen {a} is the MCP listener's address: give the admin API another address, or leave admin_listen unset to serve it on the MCP listener"
                );
            }
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
            otlp_endpoint,
            trace_sample_ratio,
            metrics,
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
            listen,
            allowed_hosts: serve
                .and_then(|s| s.allowed_hosts.clone())
                .or(file.allowed_hosts)
                .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()]),
            max_body_bytes,
            admin_token_file,
            admin_listen,
            metrics_listen,
            alerts_url,
            tls,
            tls_min_version,
            admin_tls,
            upstream_ca,
            hold_upstreams,
            nats_tls,
            secrets_key_file: match &secrets_key {
                Some(KeySource::File(f)) => Some(f.clone()),
                _ => None,
            },
            secrets_key_command: match secrets_key {
                Some(KeySource::Command(c)) => Some(c),
                _ => None,
            },
            backup,
            peer_regions,
            region_health,
            nats,
            store_replicas,
            nats_monitor,
            drain_timeout,
            max_clock_skew,
            auth,
        })
    }
}

/// A certificate and key given together (`name`: the settings' prefix), or neither.
fn tls_pair(
    name: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<haven_server::TlsFiles>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(haven_server::TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => bail!("{name}_cert is given without {name}_key: give both"),
        (None, Some(_)) => bail!("{name}_key is given without {name}_cert: give both"),
    }
}

/// The NATS servers of a `--store` value (`None`: the embedded store). `tls://` URLs ask for
/// TLS.
pub fn nats_servers(store: &str) -> Result<Option<Vec<String>>> {
    Ok(if store == "embedded" {
        None
    } else if store.starts_with("nats://") || store.starts_with("tls://") {
        let servers: Vec<String> = store
            .split(',')
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_owned()
                } else {
                    format!("nats://{s}")
                }
            })
            .collect();
        Some(servers)
    } else {
        bail!(
            "invalid store {store:?}: use embedded or nats://HOST:PORT[,HOST:PORT...] (tls://... for TLS)"
        );
    })
}

/// Backup location and key for the `haven backup` commands: flags, environment, then the
/// TOML file.
pub fn backup_target(args: &BackupTargetArgs) -> Result<(String, Option<KeySource>)> {
    let mut file = FileSettings::load(args.config.as_deref())?;
    let Some(url) = args.backup_url.clone().or(file.backup_url.take()) else {
        bail!(
            "no backup location: pass --backup-url URL (a directory, file:///DIR or s3://BUCKET/PREFIX) or set HAVEN_BACKUP_URL"
        );
    };
    let key = KeySource::resolve(
        "backup_key",
        (
            args.backup_key_file.clone(),
            args.backup_key_command.clone(),
        ),
        (file.backup_key_file.take(), file.backup_key_command.take()),
    )?;
    Ok((url, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn binary_paths_show_their_default_once() {
        use clap::CommandFactory;
        for path in [&["drill", "run"][..], &["chaos"][..]] {
            let mut cmd = Cli::command();
            let mut sub = &mut cmd;
            for name in path {
                sub = sub.find_subcommand_mut(name).unwrap();
            }
            // Whitespace as one space: the help is wrapped to a width.
            let help = sub
                .render_long_help()
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            for binary in ["nats-server", "haproxy"] {
                let shown = help.matches(&format!("[default: {binary}")).count();
                assert_eq!(shown, 1, "{binary} in {path:?}:\n{help}");
                assert!(
                    help.contains(&format!("[default: {binary} on PATH]")),
                    "{help}"
                );
            }
        }
    }

    fn resolve(args: &[&str]) -> Result<(Mode, Settings)> {
        let cli = Cli::try_parse_from(args).map_err(|e| anyhow::anyhow!("{e}"))?;
        Settings::from_cli(&cli)
    }

    #[test]
    fn tls_settings_resolve_and_half_given_pairs_are_refused() {
        let (_, s) = resolve(&["haven", "serve"]).unwrap();
        assert!(s.tls.is_none() && s.admin_tls.is_none());
        assert_eq!(s.tls_min_version, haven_server::MinVersion::Tls13);
        assert!(!s.nats_tls.enabled());
        let (_, s) = resolve(&[
            "haven",
            "serve",
            "--tls-cert",
            "/c",
            "--tls-key",
            "/k",
            "--tls-min-version",
            "1.2",
            "--admin-listen",
            "127.0.0.1:9",
        ])
        .unwrap();
        let pair = haven_server::TlsFiles {
            cert: "/c".into(),
            key: "/k".into(),
        };
        assert_eq!(s.tls.as_ref(), Some(&pair));
        assert_eq!(
            s.admin_tls.as_ref(),
            Some(&pair),
            "the admin API shares the pair"
        );
        assert_eq!(s.tls_min_version, haven_server::MinVersion::Tls12);
        let e = resolve(&["haven", "serve", "--tls-cert", "/c"]).unwrap_err();
        assert!(e.to_string().contains("tls_key"), "{e}");
        let e = resolve(&["haven", "serve", "--tls-min-version", "1.0"]).unwrap_err();
        assert!(e.to_string().contains("tls_min_version"), "{e}");
        let e = resolve(&[
            "haven",
            "serve",
            "--admin-tls-cert",
            "/c",
            "--admin-tls-key",
            "/k",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("admin_listen"), "{e}");
        // NATS: tls:// URLs or any option make TLS required; without a NATS store, refused.
        let (_, s) = resolve(&["haven", "serve", "--store", "tls://127.0.0.1:4222"]).unwrap();
        assert!(s.nats_tls.require);
        let (_, s) = resolve(&[
            "haven",
            "serve",
            "--store",
            "nats://127.0.0.1:4222",
            "--nats-ca-file",
            "/ca",
        ])
        .unwrap();
        assert!(s.nats_tls.enabled() && !s.nats_tls.require);
        assert!(resolve(&["haven", "serve", "--nats-ca-file", "/ca"]).is_err());
        assert!(resolve(&["haven", "serve", "--nats-cert", "/c"]).is_err());
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
        let e = resolve(&["haven", "serve", "--admin-listen", "127.0.0.1:8080"]).unwrap_err();
        assert!(format!("{e:#}").contains("MCP listener"), "{e:#}");
        let nats = ["haven", "serve", "--store", "nats://127.0.0.1:4222"];
        let e = resolve(&[&nats[..], &["--nats-monitor", "nats-1:8222"]].concat()).unwrap_err();
        assert!(format!("{e:#}").contains("monitoring endpoints"), "{e:#}");
        let e = resolve(&["haven", "serve", "--nats-monitor", "http://n:8222"]).unwrap_err();
        assert!(format!("{e:#}").contains("needs a NATS store"), "{e:#}");
        let (_, s) = resolve(
            &[
                &nats[..],
                &["--nats-monitor", "http://a:8222/, http://b:8222"],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(s.nats_monitor, ["http://a:8222", "http://b:8222"]);
    }

    #[test]
    fn keys_come_from_a_file_or_a_command() {
        let (_, s) = resolve(&["haven", "serve", "--secrets-key-command", "kms get"]).unwrap();
        assert_eq!(
            (s.secrets_key_file, s.secrets_key_command.as_deref()),
            (None, Some("kms get"))
        );
        let e = resolve(&[
            "haven",
            "serve",
            "--secrets-key-command",
            "kms get",
            "--secrets-key-file",
            "/k",
        ])
        .unwrap_err();
        assert!(format!("{e:#}").contains("both set"), "{e:#}");
        // A flag wins over the file's pair; the file alone may not name both.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.toml");
        std::fs::write(
            &file,
            "backup_url = \"/b\"\nbackup_key_file = \"/k\"\nadmin_listen = \"127.0.0.1:9\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let (_, s) = resolve(&["haven", "serve", "--config", f]).unwrap();
        assert_eq!(s.backup.unwrap().key, KeySource::File("/k".into()));
        assert_eq!(s.admin_listen.as_deref(), Some("127.0.0.1:9"));
        let (_, s) = resolve(&[
            "haven",
            "serve",
            "--config",
            f,
            "--backup-key-command",
            "vault read",
        ])
        .unwrap();
        assert_eq!(
            s.backup.unwrap().key,
            KeySource::Command("vault read".into())
        );
        std::fs::write(
            &file,
            "secrets_key_file = \"/k\"\nsecrets_key_command = \"x\"\n",
        )
        .unwrap();
        let e = resolve(&["haven", "serve", "--config", f]).unwrap_err();
        assert!(format!("{e:#}").contains("in the config file"), "{e:#}");
    }
}
