//! Data-parallel training across processes: the [`Collective`] interface the trainer talks
//! to, its TCP engine over `std::net` ([`TcpCollective`]: CPU-only machines and clusters,
//! and the tests), and where a process learns its rank ([`Launch`]: flags, torchrun's
//! `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT`, SLURM's
//! `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`/`SLURM_JOB_NODELIST`).
//!
//! **TCP engine.** Rank 0 is the hub: it listens on the rendezvous port (`MASTER_PORT + 1`,
//! or `DEMOVLP_RDZV_PORT`: torchrun's agent already owns `MASTER_PORT`), every other rank
//! connects to it and says hello with its rank, the world size, a hash of its config and
//! of its binary; rank 0 checks them against its own and answers (a mismatch is an error on
//! both sides naming both values). An all-reduce goes chunk by chunk (1 Mi floats): every
//! rank sends its chunk to rank 0, which adds them **in rank order**, starting from its
//! own — `((x₀ + x₁) + x₂) + …` — and sends the sum back; so every rank ends with the same
//! bits, and the sum is the one a single process accumulating the same values in that
//! order computes. Every read and write has a timeout (`[dist] timeout_s`): a rank that
//! dies (EOF, connection reset) or hangs (timeout) ends the collective with an error naming
//! that rank, and rank 0 tells the others before it stops.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The operations data-parallel training needs. Every rank calls the same operations in
/// the same order with buffers of the same length.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank ends with the same bits.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0's values replace every other rank's (`buf` has the same length everywhere).
    fn broadcast_f32(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0's bytes replace every other rank's (any length).
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>) -> Result<()>;
    /// Element-wise sums over all ranks of the training backend's own buffers (each a
    /// `Backend::Buf`), in place on their device with no host copy, when this engine can
    /// (the NCCL engine, on CUDA buffers); `None`: it cannot, and the caller stages them
    /// through host memory and [`Collective::all_reduce_sum`].
    fn all_reduce_buffers(&mut self, _bufs: &mut [&mut dyn std::any::Any]) -> Option<Result<()>> {
        None
    }
    /// Returns when every rank reached it.
    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0]).context("barrier")
    }
    /// The engine, for logs.
    fn engine(&self) -> &'static str;
    /// Best effort, before this rank stops with an error: tell the others why (they then
    /// stop with that message instead of a closed connection). Nothing more may follow.
    fn abort(&mut self, _why: &str) {}
}

/// What every rank must agree on before training together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Hash of the run's config (its TOML after command-line overrides).
    pub config_hash: String,
    /// Size and hash of the running binary.
    pub binary_hash: String,
    /// Fresh run or `--resume`.
    pub resume: bool,
}

impl Identity {
    pub fn new(config_text: &str, resume: bool) -> Identity {
        Identity { config_hash: format!("{:016x}", fnv1a(config_text.as_bytes())), binary_hash: binary_hash(), resume }
    }
}

/// FNV-1a, 64 bits.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_continue(FNV1A_START, bytes)
}

/// The FNV-1a state before any byte.
pub const FNV1A_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a continued from state `h` over `bytes` (a hash of data read in pieces).
pub fn fnv1a_continue(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `<size in bytes>:<FNV-1a of the bytes>` of this process's executable (`/proc/self/exe`),
/// or `unknown` when it cannot be read.
pub fn binary_hash() -> String {
    let path = PathBuf::from("/proc/self/exe");
    let path = if path.exists() { path } else { std::env::current_exe().unwrap_or(path) };
    match std::fs::read(&path) {
        Ok(b) => format!("{}:{:016x}", b.len(), fnv1a(&b)),
        Err(_) => "unknown".into(),
    }
}

/// Where this process sits in a data-parallel run, and how long it waits.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// Rank within the node (torchrun `LOCAL_RANK`, SLURM `SLURM_LOCALID`): the GPU is
    /// `local_rank % device_count`.
    pub local_rank: usize,
    /// Rank 0's host.
    pub master_addr: String,
    /// The rendezvous port (rank 0 listens on it; 0 = rank 0 lets the OS choose and prints it).
    pub rdzv_port: u16,
    /// Where each value came from, for messages (`"RANK"`, `"--rank"`, `"SLURM_PROCID"`, …).
    pub sources: Vec<(String, String)>,
}

/// Explicit flags (they win over the environment).
#[derive(Clone, Debug, Default)]
pub struct LaunchFlags {
    pub rank: Option<usize>,
    pub world_size: Option<usize>,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

/// The port torchrun uses when `MASTER_PORT` is not set.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl Launch {
    /// The launch of this process from `flags`, else torchrun's variables, else SLURM's
    /// (`env` looks one up: `std::env::var` in the binary). None when the world size is 1
    /// (or nothing says otherwise): a single-process run.
    pub fn resolve(flags: &LaunchFlags, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let mut sources = Vec::new();
        let num = |name: &str| -> Result<Option<usize>> {
            match env(name) {
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| anyhow!("{name}={v:?} is not a non-negative integer")),
                None => Ok(None),
            }
        };
        let pick = |flag: Option<usize>, flag_name: &str, names: &[&str], sources: &mut Vec<(String, String)>| -> Result<Option<usize>> {
            if let Some(v) = flag {
                sources.push((flag_name.into(), v.to_string()));
                return Ok(Some(v));
            }
            for n in names {
                if let Some(v) = num(n)? {
                    sources.push(((*n).into(), v.to_string()));
                    return Ok(Some(v));
                }
            }
            Ok(None)
        };
        let world = pick(flags.world_size, "--world-size", &["WORLD_SIZE", "SLURM_NTASKS"], &mut sources)?;
        let Some(world) = world else { return Ok(None) };
        if world == 0 {
            bail!("world size 0 ({}): it must be at least 1", describe(&sources));
        }
        if world == 1 {
            return Ok(None);
        }
        let rank = pick(flags.rank, "--rank", &["RANK", "SLURM_PROCID"], &mut sources)?
            .with_context(|| format!("world size {world} but no rank: set RANK (torchrun), SLURM_PROCID (srun) or --rank"))?;
        if rank >= world {
            bail!("rank {rank} is not below the world size {world} ({})", describe(&sources));
        }
        let local_rank = pick(None, "", &["LOCAL_RANK", "SLURM_LOCALID"], &mut sources)?.unwrap_or(0);
        let master_addr = match (&flags.master_addr, env("MASTER_ADDR"), env("SLURM_JOB_NODELIST")) {
            (Some(a), _, _) => {
                sources.push(("--master-addr".into(), a.clone()));
                a.clone()
            }
            (None, Some(a), _) => {
                sources.push(("MASTER_ADDR".into(), a.clone()));
                a
            }
            (None, None, Some(list)) => {
                let host = first_host(&list).with_context(|| format!("SLURM_JOB_NODELIST={list:?}"))?;
                sources.push(("SLURM_JOB_NODELIST".into(), host.clone()));
                host
            }
            (None, None, None) => bail!("world size {world} but no rank-0 address: set MASTER_ADDR or --master-addr"),
        };
        let master_port = match flags.master_port {
            Some(p) => p,
            None => match env("MASTER_PORT") {
                Some(v) => v.trim().parse::<u16>().map_err(|_| anyhow!("MASTER_PORT={v:?} is not a port number"))?,
                None => DEFAULT_MASTER_PORT,
            },
        };
        let rdzv_port = match env("DEMOVLP_RDZV_PORT") {
            Some(v) => v.trim().parse::<u16>().map_err(|_| anyhow!("DEMOVLP_RDZV_PORT={v:?} is not a port number"))?,
            None => {
                master_port.checked_add(1).with_context(|| format!("MASTER_PORT {master_port}: no port above it for the rendezvous"))?
            }
        };
        Ok(Some(Launch { rank, world, local_rank, master_addr, rdzv_port, sources }))
    }
}

fn describe(sources: &[(String, String)]) -> String {
    sources.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
}

/// The first host of a SLURM node list: `node[01-04,07],gpu1` → `node01`, `a,b` → `a`,
/// `rack[1-2]-n[3-4]` → `rack1-n3`.
pub fn first_host(list: &str) -> Result<String> {
    let mut depth = 0usize;
    let mut first = String::new();
    for c in list.trim().chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1).with_context(|| format!("unbalanced ']' in node list {list:?}"))?,
            ',' if depth == 0 => break,
            _ => {}
        }
        first.push(c);
    }
    if depth != 0 {
        bail!("unbalanced '[' in node list {list:?}");
    }
    let mut host = String::new();
    let mut rest = first.as_str();
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = rest[open..].find(']').map(|c| open + c).context("unbalanced brackets")?;
        let inner = &rest[open + 1..close];
        let first_item = inner.split(',').next().unwrap_or("");
        let start = first_item.split('-').next().unwrap_or("").trim();
        if start.is_empty() || !start.chars().all(|c| c.is_ascii_digit()) {
            bail!("node list {list:?}: cannot read the range [{inner}]");
        }
        host.push_str(start);
        rest = &rest[close + 1..];
    }
    host.push_str(rest);
    if host.is_empty() {
        bail!("empty node list {list:?}");
    }
    Ok(host)
}

/// Timeouts of the TCP engine.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Every read and write of a collective.
    pub io: Duration,
    /// Joining: rank 0 waits this long for every rank, the others for rank 0's answer.
    pub rendezvous: Duration,
}

const TAG_HELLO: u8 = 1;
const TAG_WELCOME: u8 = 2;
const TAG_REJECT: u8 = 3;
const TAG_DATA: u8 = 4;
const TAG_ABORT: u8 = 5;
/// Floats per message of an all-reduce or broadcast.
pub const CHUNK: usize = 1 << 20;

/// The TCP engine (see the module doc).
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: the stream of rank r at index r − 1. Others: one stream, to rank 0.
    peers: Vec<TcpStream>,
    timeout: Duration,
    scratch: Vec<f32>,
    /// After an error the engine refuses further use (the streams may be mid-message).
    broken: Option<String>,
}

fn set_timeouts(s: &TcpStream, t: Duration) -> std::io::Result<()> {
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    s.set_nodelay(true)
}

fn write_frame(s: &mut TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)
}

/// Reads a frame header: (tag, length).
fn read_head(s: &mut TcpStream) -> std::io::Result<(u8, u64)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    Ok((head[0], u64::from_le_bytes(head[1..].try_into().unwrap())))
}

fn read_payload(s: &mut TcpStream, len: u64, limit: u64) -> std::io::Result<Vec<u8>> {
    if len > limit {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("message of {len} bytes (at most {limit} expected)")));
    }
    let mut v = vec![0u8; len as usize];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 plain bytes; the engine sends little-endian (checked below).
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

fn f32_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

#[cfg(not(target_endian = "little"))]
compile_error!("the TCP collective sends f32 values in the machine's byte order and assumes little-endian machines");

/// Words for an I/O error with rank `peer` during `what`.
fn peer_error(e: &std::io::Error, peer: usize, what: &str, timeout: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
            "rank {peer} did not answer within {:.0} s during {what} (it hangs, or is that much slower than this rank: \
             [dist] timeout_s / DEMOVLP_DIST_TIMEOUT / --dist-timeout)",
            timeout.as_secs_f64()
        ),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            format!("rank {peer} closed its connection during {what} (it exited or was killed): {e}")
        }
        _ => format!("connection to rank {peer} failed during {what}: {e}"),
    }
}

impl TcpCollective {
    /// Joins the run: rank 0 listens on `0.0.0.0:<rdzv_port>` and waits for every other
    /// rank; the others connect to `master_addr:rdzv_port` (retrying until the rendezvous
    /// timeout). `say` prints progress lines (rank 0 reports the port it listens on).
    pub fn join(launch: &Launch, me: &Identity, t: Timeouts, say: &dyn Fn(&str)) -> Result<TcpCollective> {
        if launch.rank == 0 {
            Self::host(launch, me, t, say)
        } else {
            Self::guest(launch, me, t)
        }
    }

    fn host(launch: &Launch, me: &Identity, t: Timeouts, say: &dyn Fn(&str)) -> Result<TcpCollective> {
        let listener = TcpListener::bind(("0.0.0.0", launch.rdzv_port)).with_context(|| {
            format!("rendezvous: rank 0 cannot listen on port {} (MASTER_PORT + 1 or DEMOVLP_RDZV_PORT)", launch.rdzv_port)
        })?;
        let port = listener.local_addr()?.port();
        say(&format!("rendezvous: rank 0 listening on port {port}, waiting for {} more ranks", launch.world - 1));
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + t.rendezvous;
        let mut slots: Vec<Option<TcpStream>> = (1..launch.world).map(|_| None).collect();
        let abort_all = |slots: &mut Vec<Option<TcpStream>>, msg: &str| {
            for s in slots.iter_mut().flatten() {
                write_frame(s, TAG_ABORT, msg.as_bytes()).ok();
            }
        };
        while slots.iter().any(Option::is_none) {
            let (mut s, addr) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let joined: Vec<String> = std::iter::once("0".to_string())
                            .chain((1..launch.world).filter(|r| slots[r - 1].is_some()).map(|r| r.to_string()))
                            .collect();
                        let missing: Vec<String> = (1..launch.world).filter(|r| slots[r - 1].is_none()).map(|r| r.to_string()).collect();
                        let msg = format!(
                            "rendezvous timed out after {:.0} s: {} of {} ranks joined (joined: {}; missing: {}); start every rank \
                             with the same MASTER_ADDR/MASTER_PORT, or wait longer ([dist] rendezvous_timeout_s / DEMOVLP_RDZV_TIMEOUT)",
                            t.rendezvous.as_secs_f64(),
                            joined.len(),
                            launch.world,
                            joined.join(", "),
                            missing.join(", ")
                        );
                        abort_all(&mut slots, &msg);
                        bail!(msg);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e).context("rendezvous: accepting a connection"),
            };
            s.set_nonblocking(false)?;
            set_timeouts(&s, t.io.min(t.rendezvous))?;
            let hello = match read_head(&mut s).and_then(|(tag, len)| {
                if tag != TAG_HELLO {
                    return Err(std::io::Error::new(ErrorKind::InvalidData, "not a hello"));
                }
                read_payload(&mut s, len, 1 << 16)
            }) {
                Ok(h) => h,
                Err(e) => {
                    say(&format!("rendezvous: ignoring a connection from {addr} that sent no valid hello ({e})"));
                    continue;
                }
            };
            let h: serde_json::Value = serde_json::from_slice(&hello).unwrap_or_default();
            let (rank, world) = (h["rank"].as_u64().unwrap_or(u64::MAX) as usize, h["world"].as_u64().unwrap_or(0) as usize);
            let field = |k: &str| h[k].as_str().unwrap_or("?").to_string();
            let problem = if world != launch.world {
                Some(format!("rank {rank} (from {addr}) has world size {world}, rank 0 has {}", launch.world))
            } else if rank == 0 || rank >= launch.world {
                Some(format!("a process at {addr} claims rank {rank} of {world}"))
            } else if slots[rank - 1].is_some() {
                Some(format!("rank {rank} joined twice (again from {addr}): two processes were given the same rank"))
            } else if field("config_hash") != me.config_hash {
                Some(format!(
                    "rank {rank}'s config hash {} differs from rank 0's {}: start every rank with the same config and overrides",
                    field("config_hash"),
                    me.config_hash
                ))
            } else if field("binary_hash") != me.binary_hash {
                Some(format!(
                    "rank {rank}'s binary {} differs from rank 0's {} (size:hash): run the same demovlp build on every rank",
                    field("binary_hash"),
                    me.binary_hash
                ))
            } else if h["resume"].as_bool() != Some(me.resume) {
                Some(format!("rank {rank} has --resume {}, rank 0 {}: give every rank the same flags", h["resume"], me.resume))
            } else {
                None
            };
            if let Some(p) = problem {
                let msg = format!("rendezvous: {p}");
                write_frame(&mut s, TAG_REJECT, msg.as_bytes()).ok();
                abort_all(&mut slots, &msg);
                bail!(msg);
            }
            slots[rank - 1] = Some(s);
        }
        let mut peers: Vec<TcpStream> = slots.into_iter().map(|s| s.expect("every slot filled")).collect();
        for (i, s) in peers.iter_mut().enumerate() {
            set_timeouts(s, t.io)?;
            write_frame(s, TAG_WELCOME, &[]).map_err(|e| anyhow!("rendezvous: {}", peer_error(&e, i + 1, "the welcome", t.io)))?;
        }
        say(&format!("rendezvous: all {} ranks joined", launch.world));
        Ok(TcpCollective { rank: 0, world: launch.world, peers, timeout: t.io, scratch: Vec::new(), broken: None })
    }

    fn guest(launch: &Launch, me: &Identity, t: Timeouts) -> Result<TcpCollective> {
        let target = format!("{}:{}", launch.master_addr, launch.rdzv_port);
        let deadline = Instant::now() + t.rendezvous;
        let mut last_err = String::from("no attempt");
        let mut stream = loop {
            let addrs: Vec<SocketAddr> = match target.to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => {
                    last_err = format!("cannot resolve {target}: {e}");
                    vec![]
                }
            };
            let mut got = None;
            for a in &addrs {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
                match TcpStream::connect_timeout(a, left.min(Duration::from_secs(5))) {
                    Ok(s) => {
                        got = Some(s);
                        break;
                    }
                    Err(e) => last_err = format!("{a}: {e}"),
                }
            }
            if let Some(s) = got {
                break s;
            }
            if Instant::now() >= deadline {
                bail!(
                    "rendezvous timed out after {:.0} s: rank {} could not reach rank 0 at {target} (last error: {last_err}); \
                     is rank 0 running, with the same MASTER_ADDR/MASTER_PORT? ([dist] rendezvous_timeout_s / DEMOVLP_RDZV_TIMEOUT)",
                    t.rendezvous.as_secs_f64(),
                    launch.rank
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        set_timeouts(&stream, t.io)?;
        let hello = serde_json::json!({
            "rank": launch.rank, "world": launch.world, "config_hash": me.config_hash,
            "binary_hash": me.binary_hash, "resume": me.resume,
        });
        write_frame(&mut stream, TAG_HELLO, hello.to_string().as_bytes())
            .with_context(|| format!("rendezvous: sending hello to {target}"))?;
        // Rank 0 answers once every rank joined: wait up to the rendezvous timeout.
        stream.set_read_timeout(Some(t.rendezvous.max(t.io)))?;
        let (tag, len) = read_head(&mut stream).map_err(|e| {
            anyhow!("rendezvous: no answer from rank 0 at {target}: {}", peer_error(&e, 0, "the rendezvous", t.rendezvous.max(t.io)))
        })?;
        match tag {
            TAG_WELCOME => {}
            TAG_REJECT | TAG_ABORT => {
                let msg = read_payload(&mut stream, len, 1 << 16).unwrap_or_default();
                bail!("rank 0 refused rank {}: {}", launch.rank, String::from_utf8_lossy(&msg));
            }
            _ => bail!("rendezvous: unexpected answer {tag} from {target} (not a demovlp rank 0?)"),
        }
        stream.set_read_timeout(Some(t.io))?;
        Ok(TcpCollective { rank: launch.rank, world: launch.world, peers: vec![stream], timeout: t.io, scratch: Vec::new(), broken: None })
    }

    fn check(&self) -> Result<()> {
        match &self.broken {
            Some(m) => bail!("the collective failed earlier: {m}"),
            None => Ok(()),
        }
    }

    /// Rank 0, after a failure with some rank: tell every other rank why (best effort).
    fn abort_others(&mut self, msg: &str, failed: usize) {
        // The failed rank too: one that hangs is alive and may read it later.
        let _ = failed;
        for s in self.peers.iter_mut() {
            s.set_write_timeout(Some(Duration::from_secs(2))).ok();
            write_frame(s, TAG_ABORT, msg.as_bytes()).ok();
        }
    }

    /// Reads one data frame of exactly `out.len()` bytes from peer index `i` (rank `peer`).
    fn recv_into(&mut self, i: usize, peer: usize, out: &mut [u8], what: &str) -> Result<(), String> {
        let t = self.timeout;
        let s = &mut self.peers[i];
        let (tag, len) = read_head(s).map_err(|e| peer_error(&e, peer, what, t))?;
        match tag {
            TAG_DATA if len == out.len() as u64 => s.read_exact(out).map_err(|e| peer_error(&e, peer, what, t)),
            TAG_DATA => Err(format!("rank {peer} sent {len} bytes during {what}, {} expected (ranks out of step)", out.len())),
            TAG_ABORT => {
                let msg = read_payload(s, len, 1 << 16).unwrap_or_default();
                Err(format!("rank {peer} stopped the run: {}", String::from_utf8_lossy(&msg)))
            }
            _ => Err(format!("rank {peer} sent an unexpected message ({tag}) during {what}")),
        }
    }

    /// Sends one data frame to peer index `i` (rank `peer`). A failed write to rank 0 first
    /// looks for rank 0's abort message (the reason it closed).
    fn send(&mut self, i: usize, peer: usize, data: &[u8], what: &str) -> Result<(), String> {
        let t = self.timeout;
        let s = &mut self.peers[i];
        match write_frame(s, TAG_DATA, data) {
            Ok(()) => Ok(()),
            Err(e) => {
                let mut why = peer_error(&e, peer, what, t);
                s.set_read_timeout(Some(Duration::from_millis(500))).ok();
                if let Ok((TAG_ABORT, len)) = read_head(s) {
                    if let Ok(m) = read_payload(s, len, 1 << 16) {
                        why = format!("rank {peer} stopped the run: {}", String::from_utf8_lossy(&m));
                    }
                }
                Err(why)
            }
        }
    }

    fn fail(&mut self, msg: String, failed: usize) -> anyhow::Error {
        if self.rank == 0 {
            self.abort_others(&format!("rank 0: {msg}"), failed);
        }
        self.broken = Some(msg.clone());
        anyhow!("rank {} of {}: {msg}", self.rank, self.world)
    }

    fn reduce_chunk(&mut self, chunk: &mut [f32]) -> Result<()> {
        if self.rank == 0 {
            let mut tmp = std::mem::take(&mut self.scratch);
            tmp.resize(chunk.len(), 0.0);
            for peer in 1..self.world {
                if let Err(m) = self.recv_into(peer - 1, peer, f32_bytes_mut(&mut tmp), "an all-reduce") {
                    self.scratch = tmp;
                    return Err(self.fail(m, peer));
                }
                // The fixed order: rank 0's values, plus rank 1's, plus rank 2's, …
                for (a, b) in chunk.iter_mut().zip(&tmp) {
                    *a += *b;
                }
            }
            self.scratch = tmp;
            for peer in 1..self.world {
                if let Err(m) = self.send(peer - 1, peer, f32_bytes(chunk), "an all-reduce") {
                    return Err(self.fail(m, peer));
                }
            }
        } else {
            if let Err(m) = self.send(0, 0, f32_bytes(chunk), "an all-reduce") {
                return Err(self.fail(m, 0));
            }
            if let Err(m) = self.recv_into(0, 0, f32_bytes_mut(chunk), "an all-reduce") {
                return Err(self.fail(m, 0));
            }
        }
        Ok(())
    }

    fn bcast_raw(&mut self, bytes: &mut [u8], what: &str) -> Result<()> {
        if self.rank == 0 {
            for peer in 1..self.world {
                if let Err(m) = self.send(peer - 1, peer, bytes, what) {
                    return Err(self.fail(m, peer));
                }
            }
        } else if let Err(m) = self.recv_into(0, 0, bytes, what) {
            return Err(self.fail(m, 0));
        }
        Ok(())
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.check()?;
        for chunk in buf.chunks_mut(CHUNK) {
            self.reduce_chunk(chunk)?;
        }
        Ok(())
    }

    fn broadcast_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.check()?;
        for chunk in buf.chunks_mut(CHUNK) {
            self.bcast_raw(f32_bytes_mut(chunk), "a broadcast")?;
        }
        Ok(())
    }

    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        self.check()?;
        let mut len = (buf.len() as u64).to_le_bytes();
        self.bcast_raw(&mut len, "a broadcast")?;
        buf.resize(u64::from_le_bytes(len) as usize, 0);
        for chunk in buf.chunks_mut(4 * CHUNK) {
            self.bcast_raw(chunk, "a broadcast")?;
        }
        Ok(())
    }

    fn engine(&self) -> &'static str {
        "tcp"
    }

    fn abort(&mut self, why: &str) {
        if self.broken.is_some() {
            return; // the failing collective already told the others
        }
        let msg = format!("rank {}: {why}", self.rank);
        for s in &mut self.peers {
            s.set_write_timeout(Some(Duration::from_secs(2))).ok();
            write_frame(s, TAG_ABORT, msg.as_bytes()).ok();
        }
        self.broken = Some(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn slurm_node_lists_give_their_first_host() {
        for (list, host) in [
            ("node[01-04]", "node01"),
            ("node[07,01-04],gpu5", "node07"),
            ("a01,b02", "a01"),
            ("single", "single"),
            ("rack[1-2]-n[003-004]", "rack1-n003"),
            ("n[1-3]-ib,m1", "n1-ib"),
        ] {
            assert_eq!(first_host(list).unwrap(), host, "{list}");
        }
        for bad in ["node[01-04", "node]", "", "n[x-y]"] {
            assert!(first_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn launch_from_torchrun_slurm_and_flags() {
        let none = LaunchFlags::default();
        assert_eq!(Launch::resolve(&none, &env_of(&[])).unwrap(), None);
        assert_eq!(Launch::resolve(&none, &env_of(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let t = Launch::resolve(
            &none,
            &env_of(&[("WORLD_SIZE", "4"), ("RANK", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29400")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!((t.rank, t.world, t.local_rank, t.master_addr.as_str(), t.rdzv_port), (2, 4, 1, "10.0.0.1", 29401));
        // SLURM alone: first host of the node list, torchrun's default port + 1.
        let env = [("SLURM_NTASKS", "8"), ("SLURM_PROCID", "5"), ("SLURM_LOCALID", "1"), ("SLURM_JOB_NODELIST", "gpu[03-06]")];
        let s = Launch::resolve(&none, &env_of(&env)).unwrap().unwrap();
        assert_eq!((s.rank, s.world, s.local_rank, s.master_addr.as_str(), s.rdzv_port), (5, 8, 1, "gpu03", DEFAULT_MASTER_PORT + 1));
        // torchrun's variables win over SLURM's, flags over both; DEMOVLP_RDZV_PORT over MASTER_PORT + 1.
        let mut both = env.to_vec();
        both.extend([("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("DEMOVLP_RDZV_PORT", "7000")]);
        let b = Launch::resolve(&none, &env_of(&both)).unwrap().unwrap();
        assert_eq!((b.rank, b.world, b.master_addr.as_str(), b.rdzv_port), (1, 2, "h", 7000));
        let flags = LaunchFlags { rank: Some(0), world_size: Some(3), master_addr: Some("m".into()), master_port: Some(100) };
        let f = Launch::resolve(&flags, &env_of(&both[..4])).unwrap().unwrap();
        assert_eq!((f.rank, f.world, f.master_addr.as_str(), f.rdzv_port), (0, 3, "m", 101));
        // Errors name the variables.
        let e = format!("{:#}", Launch::resolve(&none, &env_of(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h")])).unwrap_err());
        assert!(e.contains("RANK=2") && e.contains("WORLD_SIZE=2"), "{e}");
        let e = format!("{:#}", Launch::resolve(&none, &env_of(&[("WORLD_SIZE", "two")])).unwrap_err());
        assert!(e.contains("WORLD_SIZE"), "{e}");
        let e = format!("{:#}", Launch::resolve(&none, &env_of(&[("WORLD_SIZE", "2"), ("RANK", "1")])).unwrap_err());
        assert!(e.contains("MASTER_ADDR"), "{e}");
    }

    fn launch(rank: usize, world: usize, port: u16) -> Launch {
        Launch { rank, world, local_rank: rank, master_addr: "127.0.0.1".into(), rdzv_port: port, sources: vec![] }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// `world` ranks as threads of this process; returns each rank's result of `f`.
    fn run_ranks<T: Send + 'static>(
        world: usize,
        ids: Vec<Identity>,
        t: Timeouts,
        f: impl Fn(&mut TcpCollective) -> Result<T> + Send + Sync + Clone + 'static,
    ) -> Vec<Result<T>> {
        let port = free_port();
        let hs: Vec<_> = (0..world)
            .map(|r| {
                let (f, id) = (f.clone(), ids[r].clone());
                std::thread::spawn(move || {
                    let mut c = TcpCollective::join(&launch(r, world, port), &id, t, &|_| {})?;
                    f(&mut c)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn id(c: &str) -> Identity {
        Identity { config_hash: c.into(), binary_hash: "b".into(), resume: false }
    }

    const T: Timeouts = Timeouts { io: Duration::from_secs(10), rendezvous: Duration::from_secs(10) };

    #[test]
    fn all_reduce_is_the_rank_ordered_sum_on_every_rank() {
        let world = 3;
        let n = CHUNK + 77; // two chunks
        let vals = move |r: usize| (0..n).map(|i| ((i * 7 + r * 13) % 101) as f32 * 0.37 + r as f32 * 1e-3).collect::<Vec<f32>>();
        let out = run_ranks(world, vec![id("c"); world], T, move |c| {
            let mut v = vals(c.rank());
            c.all_reduce_sum(&mut v)?;
            let mut b = if c.rank() == 0 { b"hello".to_vec() } else { vec![] };
            c.broadcast_bytes(&mut b)?;
            let mut f = vec![c.rank() as f32; 3];
            c.broadcast_f32(&mut f)?;
            c.barrier()?;
            Ok((v, b, f))
        });
        let (v0, v1, v2) = (vals(0), vals(1), vals(2));
        let want: Vec<f32> = (0..n).map(|i| (v0[i] + v1[i]) + v2[i]).collect();
        for r in out {
            let (v, b, f) = r.unwrap();
            assert!(v.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!((b, f), (b"hello".to_vec(), vec![0.0; 3]));
        }
    }

    #[test]
    fn mismatched_configs_are_refused_naming_both_hashes() {
        let out = run_ranks(2, vec![id("aaaa"), id("bbbb")], T, |_| Ok(()));
        for r in out {
            let e = format!("{:#}", r.unwrap_err());
            assert!(e.contains("aaaa") && e.contains("bbbb") && e.contains("config hash"), "{e}");
        }
    }

    #[test]
    fn a_missing_rank_ends_the_rendezvous_with_the_missing_ranks_named() {
        let port = free_port();
        let t = Timeouts { io: Duration::from_secs(1), rendezvous: Duration::from_millis(600) };
        let e = TcpCollective::join(&launch(0, 3, port), &id("c"), t, &|_| {}).err().unwrap();
        let e = format!("{e:#}");
        assert!(e.contains("rendezvous timed out") && e.contains("missing: 1, 2"), "{e}");
        let e = TcpCollective::join(&launch(1, 2, port), &id("c"), t, &|_| {}).err().unwrap();
        let e = format!("{e:#}");
        assert!(e.contains("could not reach rank 0") && e.contains(&port.to_string()), "{e}");
    }

    #[test]
    fn a_rank_that_dies_or_hangs_is_named_within_the_timeout() {
        let t = Timeouts { io: Duration::from_millis(500), rendezvous: Duration::from_secs(10) };
        // Rank 2 leaves after one all-reduce; rank 1 hangs in its second.
        let t0 = Instant::now();
        let out = run_ranks(3, vec![id("c"); 3], t, |c| {
            let mut v = vec![1.0f32; 10];
            c.all_reduce_sum(&mut v)?;
            match c.rank() {
                2 => return Ok(()),
                1 => std::thread::sleep(Duration::from_millis(1500)),
                _ => {}
            }
            c.all_reduce_sum(&mut v)
        });
        assert!(t0.elapsed() < Duration::from_secs(5));
        let e0 = format!("{:#}", out[0].as_ref().unwrap_err());
        // Rank 0 reads rank 1 first: rank 1 hangs past the timeout.
        assert!(e0.contains("rank 1 did not answer within"), "{e0}");
        let e1 = format!("{:#}", out[1].as_ref().unwrap_err());
        assert!(e1.contains("rank 0"), "{e1}");
        // And a rank that closed is named as such.
        let out = run_ranks(2, vec![id("c"); 2], t, |c| {
            if c.rank() == 1 {
                return Ok(());
            }
            c.all_reduce_sum(&mut [1.0])
        });
        let e0 = format!("{:#}", out[0].as_ref().unwrap_err());
        assert!(e0.contains("rank 1 closed its connection"), "{e0}");
    }
}
