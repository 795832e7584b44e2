//! Commands: the table of what the relay understands, and each command's semantics.
//!
//! Every handler runs with the state locked and writes its reply into the connection's
//! [`Out`]; an `Err` is an error reply. Replies and error strings follow Redis 7 so that any
//! Redis client, `redis-cli` included, sees what it expects.

use super::db::{self, Collection, Hash, Keyspace, Kind, List, Value};
use super::glob;
use super::stream::{self, AppendError, IdArg, NewId, Stream, StreamId, Trim};
use super::wire::Out;
use bytes::Bytes;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The Redis version the relay answers as: the one whose command semantics it follows.
pub(crate) const REDIS_VERSION: &str = "7.2.0";

pub(crate) const WRONGTYPE: &str =
    "WRONGTYPE Operation against a key holding the wrong kind of value";
pub(crate) const NOAUTH: &str = "NOAUTH Authentication required.";
pub(crate) const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";
pub(crate) const OOM: &str = "OOM command not allowed when used memory > 'maxmemory'.";
const NOT_INT: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";

type Reply = Cow<'static, str>;
type CmdResult = Result<Flow, Reply>;

/// What the connection does after a command.
#[derive(Debug)]
pub(crate) enum Flow {
    Continue,
    /// Reply, then close (QUIT).
    Close,
    /// Nothing to reply yet: wait for one of the streams to grow.
    Block(BlockSpec),
}

/// A blocked XREAD, with `$` already resolved to IDs.
#[derive(Debug, Clone)]
pub(crate) struct BlockSpec {
    pub db: usize,
    pub keys: Vec<(Bytes, StreamId)>,
    pub count: Option<usize>,
    /// `None`: wait for ever (BLOCK 0).
    pub deadline: Option<Instant>,
}

/// A blocked client: its ID, what wakes it, and, once its connection has nothing else to
/// send, how an append may answer it at once.
pub(crate) struct Waiter {
    pub id: u64,
    pub notify: Arc<Notify>,
    pub armed: Option<Arc<Armed>>,
}

/// What an append needs to answer a blocked reader itself: the reader's socket, its read and
/// its protocol. Writing the answer there and then, on the appender's thread, takes the
/// reader's own task (and on a relay of several threads, the wake-up of another thread) off
/// the path from the append to the reader; the reader's task is still woken, to go on.
pub(crate) struct Armed {
    pub sock: Arc<TcpStream>,
    pub spec: BlockSpec,
    pub proto: u8,
}

/// Largest answer an append writes to a blocked reader itself. Larger ones (a reader that
/// keeps up with a bulk transfer) are left to the reader's own task, so that copying them
/// into the socket happens beside the appender's next request rather than after it.
const DIRECT_MAX: usize = 64 * 1024;

/// State shared by every connection, behind one mutex.
pub(crate) struct State {
    pub ks: Keyspace,
    /// Bytes the data set may be counted as.
    pub max_memory: usize,
    /// Clients blocked in XREAD, by (db, key): woken directly by XADD.
    pub waiters: HashMap<(usize, Bytes), Vec<Waiter>>,
    /// Blocked clients an append answered, with what their sockets did not take yet: their
    /// tasks send it before anything else.
    pub answered: HashMap<u64, Out>,
    /// Connected clients, for CLIENT LIST and INFO.
    pub clients: HashMap<u64, ClientInfo>,
    pub next_client_id: u64,
    pub started: Instant,
    pub total_connections: u64,
    pub total_commands: u64,
    pub rejected_connections: u64,
    /// The input buffers' budget, for INFO.
    pub budget: Arc<super::Budget>,
    pub port: u16,
}

/// What CLIENT LIST shows of a connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientInfo {
    pub addr: String,
    pub name: Option<Bytes>,
    pub db: usize,
    pub proto: u8,
    pub created: Option<Instant>,
}

impl State {
    pub fn new(max_memory: usize, port: u16, budget: Arc<super::Budget>) -> Self {
        Self {
            ks: Keyspace::new(),
            max_memory,
            waiters: HashMap::new(),
            answered: HashMap::new(),
            clients: HashMap::new(),
            next_client_id: 1,
            started: Instant::now(),
            total_connections: 0,
            total_commands: 0,
            rejected_connections: 0,
            budget,
            port,
        }
    }

    /// Wakes every client blocked on a key, answering those that are armed. Returns whether
    /// some of them must still answer themselves.
    fn wake(&mut self, db: usize, key: &Bytes, now: u64) -> bool {
        let Some(list) = self.waiters.remove(&(db, key.clone())) else {
            return false;
        };
        let mut left = false;
        for waiter in list {
            let sent = match &waiter.armed {
                Some(armed) => self.answer(waiter.id, armed, now),
                None => false,
            };
            left |= !sent;
            waiter.notify.notify_one();
        }
        left
    }

    /// Answers an armed waiter: builds its reply and, when that is small, writes what the
    /// socket takes without waiting. The rest (all of a large reply) is kept in `answered`
    /// for its task. Returns whether the reply went out whole.
    fn answer(&mut self, id: u64, armed: &Armed, now: u64) -> bool {
        let mut out = Out::new();
        out.proto = armed.proto;
        match xread_reply(&mut self.ks, &mut out, now, &armed.spec) {
            Ok(true) => {}
            // Nothing to say after all, or an error: the waiter's task finds out itself.
            Ok(false) | Err(_) => return false,
        }
        if out.len() <= DIRECT_MAX {
            loop {
                let written = {
                    let slices = out.slices();
                    if slices.is_empty() {
                        break;
                    }
                    armed.sock.try_write_vectored(&slices)
                };
                match written {
                    Ok(n) if n > 0 => out.advance(n),
                    // A full socket, or a failing one: its task writes the rest, or fails.
                    _ => break,
                }
            }
        }
        self.unblock(id, &armed.spec);
        let whole = out.is_empty();
        self.answered.insert(id, out);
        whole
    }

    /// Registers a blocked client on its keys.
    pub fn block(
        &mut self,
        client: u64,
        notify: &Arc<Notify>,
        spec: &BlockSpec,
        armed: Option<&Arc<Armed>>,
    ) {
        for (key, _) in &spec.keys {
            let list = self.waiters.entry((spec.db, key.clone())).or_default();
            match list.iter_mut().find(|w| w.id == client) {
                Some(w) => w.armed = armed.cloned(),
                None => list.push(Waiter {
                    id: client,
                    notify: notify.clone(),
                    armed: armed.cloned(),
                }),
            }
        }
    }

    /// Arms a client that is still blocked on its keys, now that its connection has sent
    /// everything before the blocked read. A client already woken stays as it is.
    pub fn arm(&mut self, client: u64, spec: &BlockSpec, armed: &Arc<Armed>) {
        for (key, _) in &spec.keys {
            if let Some(list) = self.waiters.get_mut(&(spec.db, key.clone()))
                && let Some(w) = list.iter_mut().find(|w| w.id == client)
            {
                w.armed = Some(armed.clone());
            }
        }
    }

    /// Removes a client from the waiter lists of its keys.
    pub fn unblock(&mut self, client: u64, spec: &BlockSpec) {
        for (key, _) in &spec.keys {
            let k = (spec.db, key.clone());
            if let Some(list) = self.waiters.get_mut(&k) {
                list.retain(|w| w.id != client);
                if list.is_empty() {
                    self.waiters.remove(&k);
                }
            }
        }
    }
}

/// One connection's session.
pub(crate) struct Client {
    pub id: u64,
    pub db: usize,
    pub authenticated: bool,
    pub name: Option<Bytes>,
    /// Woken when a stream this client waits on grows.
    pub notify: Arc<Notify>,
    /// Whether this client's last requests woke blocked clients.
    pub woke: bool,
}

/// The server's configuration as commands see it.
pub(crate) struct Config<'a> {
    /// The password's hash; `None` when no password is set.
    pub password: Option<&'a blake3::Hash>,
}

struct Ctx<'a> {
    st: &'a mut State,
    cl: &'a mut Client,
    out: &'a mut Out,
    cfg: &'a Config<'a>,
    now: u64,
}

type Handler = fn(&mut Ctx<'_>, &[Bytes]) -> CmdResult;

/// May add data: refused when the data set is full.
const DENYOOM: u8 = 1;
/// Allowed before authentication.
const NOAUTH_OK: u8 = 2;

struct Spec {
    name: &'static str,
    /// Redis's arity: n exactly, or -n for at least n (the name counts).
    arity: i32,
    flags: u8,
    handler: Handler,
}

const fn spec(name: &'static str, arity: i32, flags: u8, handler: Handler) -> Spec {
    Spec {
        name,
        arity,
        flags,
        handler,
    }
}

/// Every command, the busiest first.
static COMMANDS: &[Spec] = &[
    spec("xadd", -5, DENYOOM, xadd),
    spec("xread", -4, 0, xread),
    spec("get", 2, 0, get),
    spec("pexpire", -3, 0, pexpire),
    spec("xrange", -4, 0, xrange),
    spec("xrevrange", -4, 0, xrevrange),
    spec("type", 2, 0, type_),
    spec("hmget", -3, 0, hmget),
    spec("set", -3, DENYOOM, set),
    spec("del", -2, 0, del),
    spec("unlink", -2, 0, del),
    spec("hsetnx", 4, DENYOOM, hsetnx),
    spec("hincrby", 4, DENYOOM, hincrby),
    spec("hset", -4, DENYOOM, hset),
    spec("hmset", -4, DENYOOM, hmset),
    spec("ping", -1, 0, ping),
    spec("echo", 2, 0, echo),
    spec("auth", -2, NOAUTH_OK, auth),
    spec("hello", -1, NOAUTH_OK, hello),
    spec("select", 2, 0, select),
    spec("client", -2, 0, client),
    spec("quit", -1, NOAUTH_OK, quit),
    spec("expire", -3, 0, expire),
    spec("pexpireat", -3, 0, pexpireat),
    spec("expireat", -3, 0, expireat),
    spec("ttl", 2, 0, ttl),
    spec("pttl", 2, 0, pttl),
    spec("persist", 2, 0, persist),
    spec("exists", -2, 0, exists),
    spec("hget", 3, 0, hget),
    spec("hgetall", 2, 0, hgetall),
    spec("hkeys", 2, 0, hkeys),
    spec("hvals", 2, 0, hvals),
    spec("hdel", -3, 0, hdel),
    spec("hlen", 2, 0, hlen),
    spec("hexists", 3, 0, hexists),
    spec("rpush", -3, DENYOOM, rpush),
    spec("lpush", -3, DENYOOM, lpush),
    spec("rpop", 2, 0, rpop),
    spec("lpop", 2, 0, lpop),
    spec("llen", 2, 0, llen),
    spec("lrange", 4, 0, lrange),
    spec("xlen", 2, 0, xlen),
    spec("xdel", -3, 0, xdel),
    spec("xtrim", -4, 0, xtrim),
    spec("xinfo", -2, 0, xinfo),
    spec("scan", -2, 0, scan),
    spec("keys", 2, 0, keys),
    spec("dbsize", 1, 0, dbsize),
    spec("flushall", -1, 0, flushall),
    spec("flushdb", -1, 0, flushdb),
    spec("info", -1, 0, info),
    spec("memory", -2, 0, memory),
    spec("config", -2, 0, config),
    spec("command", -1, 0, command),
    spec("time", 1, 0, time),
];

fn lookup(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Redis's "unknown command" message, arguments quoted and cut at 128 bytes.
fn unknown_command(args: &[Bytes]) -> String {
    let name = String::from_utf8_lossy(&args[0][..args[0].len().min(128)]).into_owned();
    let mut rest = String::new();
    for a in &args[1..] {
        if rest.len() >= 128 {
            break;
        }
        let room = 128 - rest.len();
        let shown = String::from_utf8_lossy(&a[..a.len().min(room)]).into_owned();
        rest.push_str(&format!("'{shown}' "));
    }
    format!("ERR unknown command '{name}', with args beginning with: {rest}")
}

fn arity_ok(arity: i32, n: usize) -> bool {
    if arity >= 0 {
        n == arity as usize
    } else {
        n >= arity.unsigned_abs() as usize
    }
}

fn wrong_args(name: &str) -> Reply {
    format!("ERR wrong number of arguments for '{name}' command").into()
}

/// Bytes a write with these arguments may add to the data set, at most.
fn estimate(args: &[Bytes]) -> usize {
    db::KEY_OVERHEAD
        + db::EXPIRE_OVERHEAD
        + stream::ENTRY_OVERHEAD
        + stream::STREAM_OVERHEAD
        + args
            .iter()
            .map(|a| a.len() + db::HASH_FIELD_OVERHEAD)
            .sum::<usize>()
}

/// Runs one request.
pub(crate) fn execute(
    st: &mut State,
    cl: &mut Client,
    out: &mut Out,
    cfg: &Config<'_>,
    args: &[Bytes],
    now: u64,
) -> Flow {
    st.total_commands += 1;
    let Some(spec) = lookup(&args[0]) else {
        out.error(&unknown_command(args));
        return Flow::Continue;
    };
    if !arity_ok(spec.arity, args.len()) {
        out.error(&wrong_args(spec.name));
        return Flow::Continue;
    }
    if !cl.authenticated && spec.flags & NOAUTH_OK == 0 {
        out.error(NOAUTH);
        return Flow::Continue;
    }
    if spec.flags & DENYOOM != 0 && st.ks.used().saturating_add(estimate(args)) > st.max_memory {
        out.error(OOM);
        return Flow::Continue;
    }
    let mut ctx = Ctx {
        st,
        cl,
        out,
        cfg,
        now,
    };
    match (spec.handler)(&mut ctx, args) {
        Ok(flow) => flow,
        Err(msg) => {
            ctx.out.error(&msg);
            Flow::Continue
        }
    }
}

/// An integer as Redis's `string2ll` reads it: no sign but `-`, no spaces, no leading zeros.
pub(crate) fn parse_i64(s: &[u8]) -> Option<i64> {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    if digits.is_empty()
        || digits.len() > 20
        || !digits.iter().all(u8::is_ascii_digit)
        || (digits[0] == b'0' && (digits.len() > 1 || s.len() > 1))
    {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn int_arg(s: &[u8]) -> Result<i64, Reply> {
    parse_i64(s).ok_or(Cow::Borrowed(NOT_INT))
}

fn is(arg: &[u8], word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

fn bulk_id(out: &mut Out, id: StreamId) {
    out.bulk(id.to_string().as_bytes());
}

// ---- connection ----

fn ping(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    match args.len() {
        1 => c.out.simple("PONG"),
        2 => c.out.bulk(&args[1]),
        _ => return Err(wrong_args("ping")),
    }
    Ok(Flow::Continue)
}

fn echo(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    c.out.bulk(&args[1]);
    Ok(Flow::Continue)
}

fn quit(c: &mut Ctx<'_>, _: &[Bytes]) -> CmdResult {
    c.out.ok();
    Ok(Flow::Close)
}

fn time(c: &mut Ctx<'_>, _: &[Bytes]) -> CmdResult {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    c.out.array(2);
    c.out.bulk(now.as_secs().to_string().as_bytes());
    c.out.bulk(now.subsec_micros().to_string().as_bytes());
    Ok(Flow::Continue)
}

/// Checks a user and password in constant time (both sides hashed first, so not even the
/// length leaks).
fn check_password(cfg: &Config<'_>, user: &[u8], password: &[u8]) -> bool {
    if user != b"default" {
        return false;
    }
    match cfg.password {
        None => true,
        Some(want) => blake3::hash(password) == *want,
    }
}

fn auth(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let (user, password) = match args.len() {
        2 => (&b"default"[..], &args[1]),
        3 => (&args[1][..], &args[2]),
        _ => return Err(SYNTAX.into()),
    };
    if args.len() == 2 && c.cfg.password.is_none() {
        return Err("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?".into());
    }
    if check_password(c.cfg, user, password) {
        c.cl.authenticated = true;
        c.out.ok();
        Ok(Flow::Continue)
    } else {
        Err(WRONGPASS.into())
    }
}

fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&ch| (b'!'..=b'~').contains(&ch))
}

fn hello(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let mut proto = c.out.proto;
    let mut i = 1;
    if args.len() > 1 {
        let v = parse_i64(&args[1]).ok_or(Cow::Borrowed(
            "ERR Protocol version is not an integer or out of range",
        ))?;
        if !(2..=3).contains(&v) {
            return Err("NOPROTO unsupported protocol version".into());
        }
        proto = v as u8;
        i = 2;
    }
    let mut name = None;
    let mut creds = None;
    while i < args.len() {
        let more = args.len() - i - 1;
        if is(&args[i], "AUTH") && more >= 2 {
            creds = Some((args[i + 1].clone(), args[i + 2].clone()));
            i += 3;
        } else if is(&args[i], "SETNAME") && more >= 1 {
            name = Some(args[i + 1].clone());
            i += 2;
        } else {
            return Err(format!(
                "ERR Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(&args[i])
            )
            .into());
        }
    }
    if let Some((user, password)) = creds {
        if !check_password(c.cfg, &user, &password) {
            return Err(WRONGPASS.into());
        }
        c.cl.authenticated = true;
    }
    if !c.cl.authenticated {
        return Err("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time".into());
    }
    if let Some(n) = name {
        if !valid_client_name(&n) {
            return Err(
                "ERR Client names cannot contain spaces, newlines or special characters.".into(),
            );
        }
        c.cl.name = (!n.is_empty()).then_some(n);
    }
    c.out.proto = proto;
    if let Some(info) = c.st.clients.get_mut(&c.cl.id) {
        info.proto = proto;
        info.name = c.cl.name.clone();
    }
    let o = &mut *c.out;
    o.map(7);
    o.bulk(b"server");
    o.bulk(b"redis");
    o.bulk(b"version");
    o.bulk(REDIS_VERSION.as_bytes());
    o.bulk(b"proto");
    o.int(i64::from(proto));
    o.bulk(b"id");
    o.int(c.cl.id as i64);
    o.bulk(b"mode");
    o.bulk(b"standalone");
    o.bulk(b"role");
    o.bulk(b"master");
    o.bulk(b"modules");
    o.array(0);
    Ok(Flow::Continue)
}

fn select(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let n = int_arg(&args[1])?;
    if !(0..db::DATABASES as i64).contains(&n) {
        return Err("ERR DB index is out of range".into());
    }
    c.cl.db = n as usize;
    if let Some(info) = c.st.clients.get_mut(&c.cl.id) {
        info.db = c.cl.db;
    }
    c.out.ok();
    Ok(Flow::Continue)
}

fn client(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let sub = String::from_utf8_lossy(&args[1]).to_ascii_lowercase();
    let want = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(wrong_args(&format!("client|{sub}")))
        }
    };
    match sub.as_str() {
        "id" => {
            want(2)?;
            c.out.int(c.cl.id as i64);
        }
        "getname" => {
            want(2)?;
            match &c.cl.name {
                Some(n) => c.out.bulk(n),
                None => c.out.null(),
            }
        }
        "setname" => {
            want(3)?;
            if !valid_client_name(&args[2]) {
                return Err(
                    "ERR Client names cannot contain spaces, newlines or special characters."
                        .into(),
                );
            }
            c.cl.name = (!args[2].is_empty()).then(|| args[2].clone());
            if let Some(info) = c.st.clients.get_mut(&c.cl.id) {
                info.name = c.cl.name.clone();
            }
            c.out.ok();
        }
        "setinfo" => {
            want(4)?;
            if !(is(&args[2], "LIB-NAME") || is(&args[2], "LIB-VER")) {
                return Err(format!(
                    "ERR Unrecognized option '{}'",
                    String::from_utf8_lossy(&args[2])
                )
                .into());
            }
            c.out.ok();
        }
        "info" => {
            want(2)?;
            let line = client_line(c.cl.id, c.st.clients.get(&c.cl.id));
            c.out.verbatim(&line);
        }
        "list" => {
            let mut ids: Vec<_> = c.st.clients.keys().copied().collect();
            ids.sort_unstable();
            let text: String = ids
                .iter()
                .map(|id| client_line(*id, c.st.clients.get(id)))
                .collect();
            c.out.verbatim(&text);
        }
        "no-evict" | "no-touch" => {
            want(3)?;
            c.out.ok();
        }
        _ => {
            return Err(format!(
                "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                String::from_utf8_lossy(&args[1])
            )
            .into());
        }
    }
    Ok(Flow::Continue)
}

fn client_line(id: u64, info: Option<&ClientInfo>) -> String {
    let info = info.cloned().unwrap_or_default();
    let age = info.created.map_or(0, |t| t.elapsed().as_secs());
    format!(
        "id={id} addr={} name={} age={age} db={} resp={} user=default\n",
        info.addr,
        info.name
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default(),
        info.db,
        info.proto.max(2),
    )
}

// ---- keys ----

fn type_(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let t =
        c.st.ks
            .get(c.cl.db, &args[1], c.now)
            .map_or("none", |e| e.value.type_name());
    c.out.simple(t);
    Ok(Flow::Continue)
}

fn del(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let n = args[1..]
        .iter()
        .filter(|k| c.st.ks.delete(c.cl.db, k, c.now))
        .count();
    c.out.int(n as i64);
    Ok(Flow::Continue)
}

fn exists(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let n = args[1..]
        .iter()
        .filter(|k| c.st.ks.get(c.cl.db, k, c.now).is_some())
        .count();
    c.out.int(n as i64);
    Ok(Flow::Continue)
}

/// Shared by the EXPIRE family: `when` is the absolute deadline in ms, or `None` on overflow.
fn expire_generic(c: &mut Ctx<'_>, args: &[Bytes], when: Option<i64>, name: &str) -> CmdResult {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for a in &args[3..] {
        if is(a, "NX") {
            nx = true;
        } else if is(a, "XX") {
            xx = true;
        } else if is(a, "GT") {
            gt = true;
        } else if is(a, "LT") {
            lt = true;
        } else {
            return Err(format!("ERR Unsupported option {}", String::from_utf8_lossy(a)).into());
        }
    }
    if nx && (xx || gt || lt) {
        return Err("ERR NX and XX, GT or LT options at the same time are not compatible".into());
    }
    if gt && lt {
        return Err("ERR GT and LT options at the same time are not compatible".into());
    }
    let Some(when) = when else {
        return Err(format!("ERR invalid expire time in '{name}' command").into());
    };
    let db = c.cl.db;
    let Some(entry) = c.st.ks.get(db, &args[1], c.now) else {
        c.out.int(0);
        return Ok(Flow::Continue);
    };
    let current = entry.expires();
    let allowed = match current {
        None => !(xx || gt),
        Some(t) => !nx && (!gt || when > t as i64) && (!lt || when < t as i64),
    };
    if !allowed {
        c.out.int(0);
    } else if when <= c.now as i64 {
        c.st.ks.delete(db, &args[1], c.now);
        c.out.int(1);
    } else {
        c.st.ks.set_expiry(db, &args[1], Some(when as u64), c.now);
        c.out.int(1);
    }
    Ok(Flow::Continue)
}

fn pexpire(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let ms = int_arg(&args[2])?;
    let when = ms.checked_add(c.now as i64);
    expire_generic(c, args, when, "pexpire")
}

fn expire(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let s = int_arg(&args[2])?;
    let when = s
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(c.now as i64));
    expire_generic(c, args, when, "expire")
}

fn pexpireat(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let when = int_arg(&args[2])?;
    expire_generic(c, args, Some(when), "pexpireat")
}

fn expireat(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let when = int_arg(&args[2])?.checked_mul(1000);
    expire_generic(c, args, when, "expireat")
}

fn ttl_generic(c: &mut Ctx<'_>, args: &[Bytes], ms: bool) -> CmdResult {
    let reply = match c.st.ks.get(c.cl.db, &args[1], c.now) {
        None => -2,
        Some(e) => match e.expires() {
            None => -1,
            Some(t) => {
                let left = t.saturating_sub(c.now) as i64;
                if ms { left } else { (left + 500) / 1000 }
            }
        },
    };
    c.out.int(reply);
    Ok(Flow::Continue)
}

fn ttl(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    ttl_generic(c, args, false)
}

fn pttl(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    ttl_generic(c, args, true)
}

fn persist(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let had =
        c.st.ks
            .get(c.cl.db, &args[1], c.now)
            .is_some_and(|e| e.expires().is_some());
    if had {
        c.st.ks.set_expiry(c.cl.db, &args[1], None, c.now);
    }
    c.out.int(i64::from(had));
    Ok(Flow::Continue)
}

fn scan(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let cursor = stream::parse_u64(&args[1]).ok_or(Cow::Borrowed("ERR invalid cursor"))?;
    let (mut pattern, mut count, mut kind) = (None, 10usize, None);
    let mut i = 2;
    while i < args.len() {
        if i + 1 >= args.len() {
            return Err(SYNTAX.into());
        }
        if is(&args[i], "MATCH") {
            pattern = Some(args[i + 1].clone());
        } else if is(&args[i], "COUNT") {
            let n = int_arg(&args[i + 1])?;
            if n < 1 {
                return Err(SYNTAX.into());
            }
            count = usize::try_from(n).unwrap_or(usize::MAX);
        } else if is(&args[i], "TYPE") {
            kind = Some(String::from_utf8_lossy(&args[i + 1]).to_ascii_lowercase());
        } else {
            return Err(SYNTAX.into());
        }
        i += 2;
    }
    let (next, found) = c.st.ks.scan(c.cl.db, cursor, count, c.now);
    let keys: Vec<Bytes> = found
        .into_iter()
        .filter(|(k, e)| {
            pattern.as_ref().is_none_or(|p| glob::matches(p, k))
                && kind.as_ref().is_none_or(|t| t == e.value.type_name())
        })
        .map(|(k, _)| k.clone())
        .collect();
    c.out.array(2);
    c.out.bulk(next.to_string().as_bytes());
    c.out.array(keys.len());
    for k in &keys {
        c.out.bulk(k);
    }
    Ok(Flow::Continue)
}

fn keys(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let found: Vec<Bytes> =
        c.st.ks
            .keys(c.cl.db, c.now)
            .filter(|(k, _)| glob::matches(&args[1], k))
            .map(|(k, _)| k.clone())
            .collect();
    c.out.array(found.len());
    for k in &found {
        c.out.bulk(k);
    }
    Ok(Flow::Continue)
}

fn dbsize(c: &mut Ctx<'_>, _: &[Bytes]) -> CmdResult {
    let n = c.st.ks.keys(c.cl.db, c.now).count();
    c.out.int(n as i64);
    Ok(Flow::Continue)
}

fn flush_mode(args: &[Bytes]) -> Result<(), Reply> {
    match args.len() {
        1 => Ok(()),
        2 if is(&args[1], "ASYNC") || is(&args[1], "SYNC") => Ok(()),
        _ => Err(SYNTAX.into()),
    }
}

fn flushall(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    flush_mode(args)?;
    for db in 0..db::DATABASES {
        c.st.ks.flush(db);
    }
    c.out.ok();
    Ok(Flow::Continue)
}

fn flushdb(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    flush_mode(args)?;
    c.st.ks.flush(c.cl.db);
    c.out.ok();
    Ok(Flow::Continue)
}

// ---- strings ----

fn get(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    match c.st.ks.get(c.cl.db, &args[1], c.now).map(|e| &e.value) {
        None => c.out.null(),
        Some(Value::Str(v)) => c.out.bulk_shared(v),
        Some(_) => return Err(WRONGTYPE.into()),
    }
    Ok(Flow::Continue)
}

/// Values below this size are copied out of the request buffer when stored, so that a small
/// value does not keep a whole read buffer alive.
const COPY_BELOW: usize = 64 * 1024;

/// The value to store: small ones get their own allocation, large ones keep the request's.
fn own(b: &Bytes) -> Bytes {
    if b.len() < COPY_BELOW {
        Bytes::copy_from_slice(b)
    } else {
        b.clone()
    }
}

fn set(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let (mut nx, mut xx, mut get, mut keep_ttl) = (false, false, false, false);
    let mut expires: Option<u64> = None;
    let mut i = 3;
    let invalid = || Cow::Borrowed("ERR invalid expire time in 'set' command");
    while i < args.len() {
        let a = &args[i];
        let has_next = i + 1 < args.len();
        if is(a, "NX") && !xx {
            nx = true;
        } else if is(a, "XX") && !nx {
            xx = true;
        } else if is(a, "GET") {
            get = true;
        } else if is(a, "KEEPTTL") && expires.is_none() {
            keep_ttl = true;
        } else if (is(a, "EX") || is(a, "PX") || is(a, "EXAT") || is(a, "PXAT"))
            && has_next
            && expires.is_none()
            && !keep_ttl
        {
            let n = int_arg(&args[i + 1])?;
            if n <= 0 {
                return Err(invalid());
            }
            let ms = if is(a, "EX") || is(a, "EXAT") {
                n.checked_mul(1000).ok_or_else(invalid)?
            } else {
                n
            };
            let at = if is(a, "EX") || is(a, "PX") {
                ms.checked_add(c.now as i64).ok_or_else(invalid)?
            } else {
                ms
            };
            expires = Some(at as u64);
            i += 1;
        } else {
            return Err(SYNTAX.into());
        }
        i += 1;
    }
    let db = c.cl.db;
    let old = match c.st.ks.get(db, &args[1], c.now).map(|e| &e.value) {
        None => None,
        Some(Value::Str(v)) => Some(Some(v.clone())),
        Some(_) if get => return Err(WRONGTYPE.into()),
        Some(_) => Some(None),
    };
    let exists = old.is_some();
    let write = !(nx && exists || xx && !exists);
    if write {
        if expires.is_some_and(|t| t <= c.now) {
            c.st.ks.delete(db, &args[1], c.now);
        } else {
            c.st.ks.set(
                db,
                own(&args[1]),
                Value::Str(own(&args[2])),
                expires,
                keep_ttl,
            );
        }
    }
    if get {
        match old.flatten() {
            Some(v) => c.out.bulk_shared(&v),
            None => c.out.null(),
        }
    } else if write {
        c.out.ok();
    } else {
        c.out.null();
    }
    Ok(Flow::Continue)
}

// ---- hashes ----

/// The value of kind `T` at a key for reading: `None` if absent.
fn read<'a, T: Kind>(c: &'a mut Ctx<'_>, key: &Bytes) -> Result<Option<&'a T>, Reply> {
    match c.st.ks.get(c.cl.db, key, c.now).map(|e| &e.value) {
        None => Ok(None),
        Some(v) => T::of(v).map(Some).ok_or(Cow::Borrowed(WRONGTYPE)),
    }
}

/// Changes the value of kind `T` at a key, creating it if needed; an emptied value is
/// removed.
fn write<T: Collection, R>(
    c: &mut Ctx<'_>,
    key: &Bytes,
    f: impl FnOnce(&mut T) -> R,
) -> Result<R, Reply> {
    let db = c.cl.db;
    if read::<T>(c, key)?.is_none() {
        c.st.ks.set(db, own(key), T::default().wrap(), None, false);
    }
    let (r, empty) =
        c.st.ks
            .update(db, key, c.now, |v| match T::of_mut(v) {
                Some(t) => {
                    let r = f(t);
                    (Some(r), t.is_empty())
                }
                None => (None, false),
            })
            .unwrap_or((None, false));
    if empty {
        c.st.ks.delete(db, key, c.now);
    }
    r.ok_or(Cow::Borrowed(WRONGTYPE))
}

fn hset_pairs(c: &mut Ctx<'_>, args: &[Bytes], name: &str) -> Result<i64, Reply> {
    if !args.len().is_multiple_of(2) {
        return Err(wrong_args(name));
    }
    write::<Hash, _>(c, &args[1], |h| {
        args[2..]
            .chunks(2)
            .filter(|p| h.set(own(&p[0]), own(&p[1])))
            .count() as i64
    })
}

fn hset(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let n = hset_pairs(c, args, "hset")?;
    c.out.int(n);
    Ok(Flow::Continue)
}

fn hmset(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    hset_pairs(c, args, "hmset")?;
    c.out.ok();
    Ok(Flow::Continue)
}

fn hsetnx(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    if read::<Hash>(c, &args[1])?.is_some_and(|h| h.fields.contains_key(&args[2])) {
        c.out.int(0);
        return Ok(Flow::Continue);
    }
    write::<Hash, _>(c, &args[1], |h| h.set(own(&args[2]), own(&args[3])))?;
    c.out.int(1);
    Ok(Flow::Continue)
}

fn hincrby(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let incr = int_arg(&args[3])?;
    let current = match read::<Hash>(c, &args[1])?.and_then(|h| h.fields.get(&args[2])) {
        None => 0,
        Some(v) => parse_i64(v).ok_or(Cow::Borrowed("ERR hash value is not an integer"))?,
    };
    let new = current
        .checked_add(incr)
        .ok_or(Cow::Borrowed("ERR increment or decrement would overflow"))?;
    write::<Hash, _>(c, &args[1], |h| {
        h.set(own(&args[2]), Bytes::from(new.to_string()))
    })?;
    c.out.int(new);
    Ok(Flow::Continue)
}

fn hget(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let v = read::<Hash>(c, &args[1])?.and_then(|h| h.fields.get(&args[2]).cloned());
    match v {
        Some(v) => c.out.bulk_shared(&v),
        None => c.out.null(),
    }
    Ok(Flow::Continue)
}

fn hmget(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let values: Vec<Option<Bytes>> = match read::<Hash>(c, &args[1])? {
        None => vec![None; args.len() - 2],
        Some(h) => args[2..].iter().map(|f| h.fields.get(f).cloned()).collect(),
    };
    c.out.array(values.len());
    for v in values {
        match v {
            Some(v) => c.out.bulk_shared(&v),
            None => c.out.null(),
        }
    }
    Ok(Flow::Continue)
}

fn hash_pairs(c: &mut Ctx<'_>, key: &Bytes) -> Result<Vec<(Bytes, Bytes)>, Reply> {
    Ok(read::<Hash>(c, key)?
        .map(|h| {
            h.fields
                .iter()
                .map(|(f, v)| (f.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default())
}

fn hgetall(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let pairs = hash_pairs(c, &args[1])?;
    c.out.map(pairs.len());
    for (f, v) in &pairs {
        c.out.bulk(f);
        c.out.bulk_shared(v);
    }
    Ok(Flow::Continue)
}

fn hkeys(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let pairs = hash_pairs(c, &args[1])?;
    c.out.array(pairs.len());
    for (f, _) in &pairs {
        c.out.bulk(f);
    }
    Ok(Flow::Continue)
}

fn hvals(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let pairs = hash_pairs(c, &args[1])?;
    c.out.array(pairs.len());
    for (_, v) in &pairs {
        c.out.bulk_shared(v);
    }
    Ok(Flow::Continue)
}

fn hdel(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    if read::<Hash>(c, &args[1])?.is_none() {
        c.out.int(0);
        return Ok(Flow::Continue);
    }
    let n = write::<Hash, _>(c, &args[1], |h| {
        args[2..].iter().filter(|f| h.remove(f)).count()
    })?;
    c.out.int(n as i64);
    Ok(Flow::Continue)
}

fn hlen(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let n = read::<Hash>(c, &args[1])?.map_or(0, |h| h.fields.len());
    c.out.int(n as i64);
    Ok(Flow::Continue)
}

fn hexists(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let has = read::<Hash>(c, &args[1])?.is_some_and(|h| h.fields.contains_key(&args[2]));
    c.out.int(i64::from(has));
    Ok(Flow::Continue)
}

// ---- lists ----

fn push(c: &mut Ctx<'_>, args: &[Bytes], front: bool) -> CmdResult {
    let n = write::<List, _>(c, &args[1], |l| {
        for item in &args[2..] {
            l.push(own(item), front);
        }
        l.items.len()
    })?;
    c.out.int(n as i64);
    Ok(Flow::Continue)
}

fn rpush(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    push(c, args, false)
}

fn lpush(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    push(c, args, true)
}

fn pop(c: &mut Ctx<'_>, args: &[Bytes], front: bool) -> CmdResult {
    if read::<List>(c, &args[1])?.is_none() {
        c.out.null();
        return Ok(Flow::Continue);
    }
    match write::<List, _>(c, &args[1], |l| l.pop(front))? {
        Some(v) => c.out.bulk_shared(&v),
        None => c.out.null(),
    }
    Ok(Flow::Continue)
}

fn rpop(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    pop(c, args, false)
}

fn lpop(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    pop(c, args, true)
}

fn llen(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let n = read::<List>(c, &args[1])?.map_or(0, |l| l.items.len());
    c.out.int(n as i64);
    Ok(Flow::Continue)
}

fn lrange(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let (start, stop) = (int_arg(&args[2])?, int_arg(&args[3])?);
    let items: Vec<Bytes> = match read::<List>(c, &args[1])? {
        None => Vec::new(),
        Some(l) => {
            let len = l.items.len() as i64;
            let norm = |i: i64| if i < 0 { (len + i).max(0) } else { i };
            let (start, stop) = (norm(start), norm(stop).min(len - 1));
            if start > stop || start >= len {
                Vec::new()
            } else {
                l.items
                    .range(start as usize..=stop as usize)
                    .cloned()
                    .collect()
            }
        }
    };
    c.out.array(items.len());
    for item in &items {
        c.out.bulk_shared(item);
    }
    Ok(Flow::Continue)
}

// ---- streams ----

/// A trim as XADD and XTRIM spell it: `MAXLEN|MINID [=|~] threshold [LIMIT count]`.
struct TrimArgs {
    trim: Trim,
    limit: usize,
}

/// Parses a trim starting at `args[*i]` (the MAXLEN/MINID word); leaves `*i` after it.
fn parse_trim(args: &[Bytes], i: &mut usize) -> Result<TrimArgs, Reply> {
    let maxlen = is(&args[*i], "MAXLEN");
    *i += 1;
    let mut approx = false;
    if let Some(a) = args.get(*i) {
        if &a[..] == b"~" {
            approx = true;
            *i += 1;
        } else if &a[..] == b"=" {
            *i += 1;
        }
    }
    let threshold = args.get(*i).ok_or(Cow::Borrowed(SYNTAX))?;
    *i += 1;
    let trim = if maxlen {
        let n = int_arg(threshold)?;
        if n < 0 {
            return Err("ERR The MAXLEN argument must be >= 0.".into());
        }
        Trim::MaxLen(n as u64)
    } else {
        Trim::MinId(stream::parse_exact_id(threshold, 0, false)?)
    };
    let mut limit = 0;
    if args.get(*i).is_some_and(|a| is(a, "LIMIT")) {
        let n = int_arg(args.get(*i + 1).ok_or(Cow::Borrowed(SYNTAX))?)?;
        if n < 0 {
            return Err("ERR The LIMIT argument must be >= 0.".into());
        }
        if !approx {
            return Err(
                "ERR syntax error, LIMIT cannot be used without the special ~ option".into(),
            );
        }
        limit = n as usize;
        *i += 2;
    }
    Ok(TrimArgs { trim, limit })
}

fn xadd(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let mut i = 2;
    let mut nomkstream = false;
    let mut trim = None;
    let id = loop {
        let a = args.get(i).ok_or(Cow::Borrowed(SYNTAX))?;
        if is(a, "NOMKSTREAM") {
            nomkstream = true;
            i += 1;
        } else if is(a, "MAXLEN") || is(a, "MINID") {
            trim = Some(parse_trim(args, &mut i)?);
        } else if &a[..] == b"*" {
            i += 1;
            break NewId::Auto;
        } else {
            i += 1;
            break match stream::parse_id(a, 0, true, true)? {
                IdArg::Exact(id) => NewId::Exact(id),
                IdArg::AutoSeq(ms) => NewId::AutoSeq(ms),
            };
        }
    };
    let fields = &args[i..];
    if fields.is_empty() || !fields.len().is_multiple_of(2) {
        return Err(wrong_args("xadd"));
    }
    if id == NewId::Exact(StreamId::MIN) {
        return Err(AppendError::Zero.to_string().into());
    }
    let db = c.cl.db;
    let key = &args[1];
    let exists = match c.st.ks.get(db, key, c.now).map(|e| &e.value) {
        None => false,
        Some(Value::Stream(_)) => true,
        Some(_) => return Err(WRONGTYPE.into()),
    };
    if !exists {
        if nomkstream {
            c.out.null();
            return Ok(Flow::Continue);
        }
        c.st.ks
            .set(db, own(key), Value::Stream(Stream::new()), None, false);
    }
    let fields: stream::Fields = fields.iter().map(own).collect();
    let now = c.now;
    let added = c.st.ks.update(db, key, now, |v| {
        let Value::Stream(s) = v else {
            return Err(WRONGTYPE.to_string());
        };
        let id = s.resolve_new_id(id, now).map_err(|e| e.to_string())?;
        s.append(id, fields);
        if let Some(t) = &trim {
            s.trim(t.trim, t.limit);
        }
        Ok(id)
    });
    match added {
        Some(Ok(id)) => {
            bulk_id(c.out, id);
            c.cl.woke |= c.st.wake(db, key, now);
            Ok(Flow::Continue)
        }
        Some(Err(e)) => {
            if !exists {
                // Nothing was added to the stream made for it: as in Redis, no key remains.
                c.st.ks.delete(db, key, now);
            }
            Err(e.into())
        }
        None => Err(WRONGTYPE.into()),
    }
}

fn write_entries(out: &mut Out, entries: &[(StreamId, &stream::Fields)]) {
    out.array(entries.len());
    for (id, fields) in entries {
        out.array(2);
        bulk_id(out, *id);
        out.array(fields.len());
        for f in fields.iter() {
            out.bulk_shared(f);
        }
    }
}

fn range_generic(c: &mut Ctx<'_>, args: &[Bytes], rev: bool) -> CmdResult {
    let (lo_arg, hi_arg) = if rev {
        (&args[3], &args[2])
    } else {
        (&args[2], &args[3])
    };
    let bound = |a: &Bytes, missing: u64| -> Result<(StreamId, bool), Reply> {
        match a.strip_prefix(b"(") {
            Some(rest) => Ok((stream::parse_exact_id(rest, missing, true)?, true)),
            None => Ok((stream::parse_exact_id(a, missing, false)?, false)),
        }
    };
    let (mut lo, lo_ex) = bound(lo_arg, 0)?;
    let (mut hi, hi_ex) = bound(hi_arg, u64::MAX)?;
    if lo_ex {
        lo = lo
            .next()
            .ok_or(Cow::Borrowed("ERR invalid start ID for the interval"))?;
    }
    if hi_ex {
        hi = hi
            .prev()
            .ok_or(Cow::Borrowed("ERR invalid end ID for the interval"))?;
    }
    let mut count = None;
    let mut i = 4;
    while i < args.len() {
        if is(&args[i], "COUNT") && i + 1 < args.len() {
            count = Some(int_arg(&args[i + 1])?.max(0) as usize);
            i += 2;
        } else {
            return Err(SYNTAX.into());
        }
    }
    let out = &mut *c.out;
    let db = c.cl.db;
    match c.st.ks.get(db, &args[1], c.now).map(|e| &e.value) {
        None => out.array(0),
        Some(Value::Stream(s)) => {
            if count == Some(0) {
                out.array(0);
            } else {
                write_entries(out, &s.range(lo, hi, rev, count));
            }
        }
        Some(_) => return Err(WRONGTYPE.into()),
    }
    Ok(Flow::Continue)
}

fn xrange(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    range_generic(c, args, false)
}

fn xrevrange(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    range_generic(c, args, true)
}

fn xlen(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let n = read::<Stream>(c, &args[1])?.map_or(0, Stream::len);
    c.out.int(n as i64);
    Ok(Flow::Continue)
}

fn xdel(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let ids = args[2..]
        .iter()
        .map(|a| stream::parse_exact_id(a, 0, true))
        .collect::<Result<Vec<_>, _>>()?;
    if read::<Stream>(c, &args[1])?.is_none() {
        c.out.int(0);
        return Ok(Flow::Continue);
    }
    let n = c.st.ks.update(c.cl.db, &args[1], c.now, |v| match v {
        Value::Stream(s) => s.delete(&ids).0,
        _ => 0,
    });
    c.out.int(n.unwrap_or(0) as i64);
    Ok(Flow::Continue)
}

fn xtrim(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let mut i = 2;
    if !(is(&args[i], "MAXLEN") || is(&args[i], "MINID")) {
        return Err(SYNTAX.into());
    }
    let t = parse_trim(args, &mut i)?;
    if i != args.len() {
        return Err(SYNTAX.into());
    }
    if read::<Stream>(c, &args[1])?.is_none() {
        c.out.int(0);
        return Ok(Flow::Continue);
    }
    let n = c.st.ks.update(c.cl.db, &args[1], c.now, |v| match v {
        Value::Stream(s) => s.trim(t.trim, t.limit).0,
        _ => 0,
    });
    c.out.int(n.unwrap_or(0) as i64);
    Ok(Flow::Continue)
}

fn xinfo(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    if is(&args[1], "HELP") {
        let lines = [
            "XINFO <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
            "STREAM <key> [FULL [COUNT <count>]",
            "    Show information about the stream.",
            "HELP",
            "    Print this help.",
        ];
        c.out.array(lines.len());
        for l in lines {
            c.out.simple(l);
        }
        return Ok(Flow::Continue);
    }
    if !is(&args[1], "STREAM") {
        return Err(format!(
            "ERR unknown subcommand '{}'. Try XINFO HELP.",
            String::from_utf8_lossy(&args[1])
        )
        .into());
    }
    if args.len() < 3 {
        return Err(wrong_args("xinfo|stream"));
    }
    let out_proto = c.out.proto;
    let s = read::<Stream>(c, &args[2])?.ok_or(Cow::Borrowed("ERR no such key"))?;
    let first = s.first().map(|(id, f)| (*id, f.clone()));
    let last = s.last().map(|(id, f)| (*id, f.clone()));
    let (len, last_id, max_deleted, added) =
        (s.len(), s.last_id(), s.max_deleted(), s.entries_added());
    let first_recorded = first.as_ref().map_or(StreamId::MIN, |(id, _)| *id);
    let o = &mut *c.out;
    o.proto = out_proto;
    o.map(10);
    o.bulk(b"length");
    o.int(len as i64);
    o.bulk(b"radix-tree-keys");
    o.int(len.div_ceil(100) as i64);
    o.bulk(b"radix-tree-nodes");
    o.int(len.div_ceil(100) as i64 + 1);
    o.bulk(b"last-generated-id");
    bulk_id(o, last_id);
    o.bulk(b"max-deleted-entry-id");
    bulk_id(o, max_deleted);
    o.bulk(b"entries-added");
    o.int(added as i64);
    o.bulk(b"recorded-first-entry-id");
    bulk_id(o, first_recorded);
    o.bulk(b"groups");
    o.int(0);
    for (name, entry) in [(&b"first-entry"[..], first), (b"last-entry", last)] {
        o.bulk(name);
        match entry {
            None => o.null(),
            Some((id, fields)) => {
                o.array(2);
                bulk_id(o, id);
                o.array(fields.len());
                for f in fields.iter() {
                    o.bulk_shared(f);
                }
            }
        }
    }
    Ok(Flow::Continue)
}

/// Where an XREAD starts in one stream.
enum ReadFrom {
    After(StreamId),
    /// `+`: the last entry.
    Last,
}

fn xread(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let mut count = None;
    let mut block = None;
    let mut i = 1;
    let streams_at = loop {
        let Some(a) = args.get(i) else {
            return Err(SYNTAX.into());
        };
        if is(a, "STREAMS") {
            break i + 1;
        } else if is(a, "COUNT") && i + 1 < args.len() {
            let n = int_arg(&args[i + 1])?;
            count = (n > 0).then_some(n as usize);
            i += 2;
        } else if is(a, "BLOCK") && i + 1 < args.len() {
            let ms = parse_i64(&args[i + 1]).ok_or(Cow::Borrowed(
                "ERR timeout is not an integer or out of range",
            ))?;
            if ms < 0 {
                return Err("ERR timeout is negative".into());
            }
            block = Some(ms as u64);
            i += 2;
        } else {
            return Err(SYNTAX.into());
        }
    };
    let rest = &args[streams_at..];
    if rest.is_empty() || !rest.len().is_multiple_of(2) {
        return Err("ERR Unbalanced 'xread' list of streams: for each stream key an ID or '$' must be specified.".into());
    }
    let (keys, ids) = rest.split_at(rest.len() / 2);
    let mut from = Vec::with_capacity(keys.len());
    for (key, id) in keys.iter().zip(ids) {
        let f = match &id[..] {
            b"$" => ReadFrom::After(read::<Stream>(c, key)?.map_or(StreamId::MIN, Stream::last_id)),
            b"+" => ReadFrom::Last,
            b">" => return Err("ERR The > ID can be specified only when calling XREADGROUP using the GROUP <group> <consumer> option.".into()),
            _ => ReadFrom::After(stream::parse_exact_id(id, 0, false)?),
        };
        from.push(f);
    }
    // `+` reads from just before the last entry, so that only it comes back; on an empty
    // stream it waits like `$`.
    let mut resolved = Vec::with_capacity(keys.len());
    for (key, f) in keys.iter().zip(&from) {
        let after = match f {
            ReadFrom::After(id) => *id,
            ReadFrom::Last => match read::<Stream>(c, key)? {
                Some(s) => match s.last() {
                    Some((id, _)) => id.prev().unwrap_or(StreamId::MIN),
                    None => s.last_id(),
                },
                None => StreamId::MIN,
            },
        };
        resolved.push((key.clone(), after));
    }
    let spec = BlockSpec {
        db: c.cl.db,
        keys: resolved,
        count,
        deadline: block
            .filter(|ms| *ms > 0)
            .map(|ms| Instant::now() + Duration::from_millis(ms)),
    };
    if xread_reply(&mut c.st.ks, c.out, c.now, &spec)? {
        return Ok(Flow::Continue);
    }
    if block.is_none() {
        c.out.null_array();
        return Ok(Flow::Continue);
    }
    // Not armed yet: replies to earlier requests may still be waiting to be written.
    c.st.block(c.cl.id, &c.cl.notify, &spec, None);
    Ok(Flow::Block(spec))
}

/// Writes the entries after each stream's ID, if any; returns whether it wrote a reply.
fn xread_reply(
    ks: &mut Keyspace,
    out: &mut Out,
    now: u64,
    spec: &BlockSpec,
) -> Result<bool, Reply> {
    let db = spec.db;
    let mut found = Vec::new();
    for (n, (key, after)) in spec.keys.iter().enumerate() {
        let Some(s) = (match ks.get(db, key, now).map(|e| &e.value) {
            None => None,
            Some(Value::Stream(s)) => Some(s),
            Some(_) => return Err(WRONGTYPE.into()),
        }) else {
            continue;
        };
        let Some(start) = after.next() else {
            continue;
        };
        if s.last().is_some_and(|(last, _)| *last >= start) {
            found.push(n);
        }
    }
    if found.is_empty() {
        return Ok(false);
    }
    if out.proto >= 3 {
        out.map(found.len());
    } else {
        out.array(found.len());
    }
    for n in found {
        let (key, after) = &spec.keys[n];
        let Some(Value::Stream(s)) = ks.get(db, key, now).map(|e| &e.value) else {
            continue;
        };
        let start = after.next().unwrap_or(StreamId::MAX);
        let entries = s.range(start, StreamId::MAX, false, spec.count);
        if out.proto < 3 {
            out.array(2);
        }
        out.bulk(key);
        write_entries(out, &entries);
    }
    Ok(true)
}

/// Retries a blocked XREAD after a wake-up or its deadline; `timed_out` gives up if nothing
/// is there. Returns whether the client is done waiting. An append that answered the client
/// already left the rest of its answer, to be sent first. A client that waits on is armed
/// again with `armed`.
pub(crate) fn retry_block(
    st: &mut State,
    cl: &mut Client,
    out: &mut Out,
    spec: &BlockSpec,
    armed: Option<&Arc<Armed>>,
    now: u64,
    timed_out: bool,
) -> bool {
    if let Some(mut rest) = st.answered.remove(&cl.id) {
        out.append(&mut rest);
        return true;
    }
    let done = match xread_reply(&mut st.ks, out, now, spec) {
        Ok(true) => true,
        Ok(false) if timed_out => {
            out.null_array();
            true
        }
        Ok(false) => false,
        Err(e) => {
            out.error(&e);
            true
        }
    };
    if done {
        st.unblock(cl.id, spec);
    } else {
        st.block(cl.id, &cl.notify, spec, armed);
    }
    done
}

// ---- server ----

fn info(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let wanted: Vec<String> = args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let all = wanted.is_empty()
        || wanted
            .iter()
            .any(|w| w == "all" || w == "everything" || w == "default");
    let show = |s: &str| all || wanted.iter().any(|w| w == s);
    let st = &*c.st;
    let mut text = String::new();
    let uptime = st.started.elapsed().as_secs();
    if show("server") {
        text.push_str(&format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\ntube_version:{}\r\n\
             server_name:tube-relay\r\nos:{}\r\narch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\n\
             uptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::process::id(),
            st.port,
            uptime / 86400,
        ));
    }
    if show("clients") {
        let blocked: usize = {
            let mut ids: Vec<u64> = st.waiters.values().flatten().map(|w| w.id).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len()
        };
        text.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\nblocked_clients:{blocked}\r\n\
             total_input_buffers:{}\r\n\r\n",
            st.clients.len(),
            super::MAX_CLIENTS,
            st.budget.used(),
        ));
    }
    if show("memory") {
        let used = st.ks.used();
        text.push_str(&format!(
            "# Memory\r\nused_memory:{used}\r\nused_memory_human:{}\r\nused_memory_dataset:{used}\r\n\
             maxmemory:{}\r\nmaxmemory_human:{}\r\nmaxmemory_policy:noeviction\r\n\r\n",
            human(used),
            st.max_memory,
            human(st.max_memory),
        ));
    }
    if show("stats") {
        text.push_str(&format!(
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
             rejected_connections:{}\r\nexpired_keys:{}\r\n\r\n",
            st.total_connections, st.total_commands, st.rejected_connections, st.ks.expired_keys,
        ));
    }
    if show("keyspace") {
        text.push_str("# Keyspace\r\n");
        for db in 0..db::DATABASES {
            let n = st.ks.len(db);
            if n > 0 {
                text.push_str(&format!(
                    "db{db}:keys={n},expires={},avg_ttl=0\r\n",
                    st.ks.expiring_len(db)
                ));
            }
        }
        text.push_str("\r\n");
    }
    c.out.verbatim(text.trim_end_matches("\r\n"));
    Ok(Flow::Continue)
}

fn human(n: usize) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2}G", n / (1024.0 * 1024.0 * 1024.0))
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.2}M", n / (1024.0 * 1024.0))
    } else if n >= 1024.0 {
        format!("{:.2}K", n / 1024.0)
    } else {
        format!("{n}B")
    }
}

fn memory(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    if is(&args[1], "USAGE") {
        if args.len() < 3 {
            return Err(wrong_args("memory|usage"));
        }
        match c.st.ks.usage(c.cl.db, &args[2], c.now) {
            Some(n) => c.out.int(n as i64),
            None => c.out.null(),
        }
        return Ok(Flow::Continue);
    }
    Err(format!(
        "ERR unknown subcommand '{}'. Try MEMORY HELP.",
        String::from_utf8_lossy(&args[1])
    )
    .into())
}

fn config(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    if is(&args[1], "GET") {
        if args.len() < 3 {
            return Err(wrong_args("config|get"));
        }
        let params = [
            ("maxmemory", c.st.max_memory.to_string()),
            ("maxmemory-policy", "noeviction".to_string()),
            ("databases", db::DATABASES.to_string()),
            ("maxclients", super::MAX_CLIENTS.to_string()),
            ("save", String::new()),
            ("appendonly", "no".to_string()),
            ("port", c.st.port.to_string()),
            ("proto-max-bulk-len", super::wire::MAX_BULK.to_string()),
            ("timeout", "0".to_string()),
        ];
        let found: Vec<_> = params
            .iter()
            .filter(|(name, _)| {
                args[2..]
                    .iter()
                    .any(|p| glob::matches(&p.to_ascii_lowercase(), name.as_bytes()))
            })
            .collect();
        c.out.map(found.len());
        for (name, value) in found {
            c.out.bulk(name.as_bytes());
            c.out.bulk(value.as_bytes());
        }
        return Ok(Flow::Continue);
    }
    if is(&args[1], "RESETSTAT") {
        c.out.ok();
        return Ok(Flow::Continue);
    }
    if is(&args[1], "SET") {
        return Err("ERR CONFIG SET is not supported by the tube relay".into());
    }
    Err(format!(
        "ERR unknown subcommand '{}'. Try CONFIG HELP.",
        String::from_utf8_lossy(&args[1])
    )
    .into())
}

fn command_info(out: &mut Out, s: &Spec) {
    let (first, last) = if s.flags & NOAUTH_OK != 0 || s.arity.abs() < 2 {
        (0, 0)
    } else {
        (1, 1)
    };
    out.array(10);
    out.bulk(s.name.as_bytes());
    out.int(i64::from(s.arity));
    out.array(0);
    out.int(first);
    out.int(last);
    out.int(i64::from(first != 0));
    for _ in 0..4 {
        out.array(0);
    }
}

fn command(c: &mut Ctx<'_>, args: &[Bytes]) -> CmdResult {
    let Some(sub) = args.get(1) else {
        c.out.array(COMMANDS.len());
        for s in COMMANDS {
            command_info(c.out, s);
        }
        return Ok(Flow::Continue);
    };
    if is(sub, "COUNT") {
        c.out.int(COMMANDS.len() as i64);
    } else if is(sub, "DOCS") {
        // redis-cli asks for these at start for its hints: none is a harmless answer.
        c.out.map(0);
    } else if is(sub, "INFO") {
        c.out.array(args.len() - 2);
        for name in &args[2..] {
            match lookup(name) {
                Some(s) => command_info(c.out, s),
                None => c.out.null(),
            }
        }
    } else if is(sub, "LIST") {
        c.out.array(COMMANDS.len());
        for s in COMMANDS {
            c.out.bulk(s.name.as_bytes());
        }
    } else {
        return Err(format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            String::from_utf8_lossy(sub)
        )
        .into());
    }
    Ok(Flow::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs commands against one client and returns each reply as text.
    struct Harness {
        st: State,
        cl: Client,
        now: u64,
        password: Option<blake3::Hash>,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                st: State::new(1 << 30, 6379, Arc::new(super::super::Budget::new(1 << 20))),
                cl: Client {
                    id: 1,
                    db: 0,
                    authenticated: true,
                    name: None,
                    notify: Arc::new(Notify::new()),
                    woke: false,
                },
                now: 1_000_000,
                password: None,
            }
        }

        fn run(&mut self, line: &str) -> String {
            let args = super::super::wire::split_args(line.as_bytes()).unwrap();
            let mut out = Out::new();
            let cfg = Config {
                password: self.password.as_ref(),
            };
            let flow = execute(&mut self.st, &mut self.cl, &mut out, &cfg, &args, self.now);
            if matches!(flow, Flow::Block(_)) {
                return "<blocked>".into();
            }
            let bytes: Vec<u8> = out.slices().iter().flat_map(|s| s.to_vec()).collect();
            String::from_utf8_lossy(&bytes)
                .replace("\r\n", " ")
                .trim_end()
                .to_string()
        }
    }

    #[test]
    fn errors_are_worded_like_redis() {
        let mut h = Harness::new();
        assert_eq!(
            h.run("foo a b"),
            "-ERR unknown command 'foo', with args beginning with: 'a' 'b'"
        );
        assert_eq!(
            h.run("foo"),
            "-ERR unknown command 'foo', with args beginning with:"
        );
        assert_eq!(
            h.run("XADD s"),
            "-ERR wrong number of arguments for 'xadd' command"
        );
        assert_eq!(
            h.run("XADD s * f"),
            "-ERR wrong number of arguments for 'xadd' command"
        );
        h.run("SET str v");
        assert_eq!(h.run("XADD str * f v"), format!("-{WRONGTYPE}"));
        assert_eq!(h.run("HGET str f"), format!("-{WRONGTYPE}"));
        assert_eq!(h.run("SELECT 16"), "-ERR DB index is out of range");
        assert_eq!(
            h.run("CLIENT FOO"),
            "-ERR unknown subcommand 'FOO'. Try CLIENT HELP."
        );
    }

    #[test]
    fn an_append_says_whether_it_woke_a_blocked_reader() {
        let mut h = Harness::new();
        h.run("XADD s 1-1 f v");
        assert!(!h.cl.woke, "nobody waits yet");
        assert_eq!(h.run("XREAD BLOCK 0 STREAMS s $"), "<blocked>");
        h.run("XADD other 1-1 f v");
        assert!(!h.cl.woke, "the reader waits on another stream");
        h.run("XADD s 1-2 f v");
        assert!(h.cl.woke);
        h.cl.woke = false;
        h.run("XADD s 1-3 f v");
        assert!(!h.cl.woke, "a waiter is woken once");
    }

    #[test]
    fn xadd_ids_follow_redis() {
        let mut h = Harness::new();
        assert_eq!(
            h.run("XADD s 0-0 f v"),
            "-ERR The ID specified in XADD must be greater than 0-0"
        );
        assert_eq!(h.run("TYPE s"), "+none");
        assert_eq!(h.run("XADD s 1-1 f v"), "$3 1-1");
        assert_eq!(
            h.run("XADD s 1-1 f v"),
            "-ERR The ID specified in XADD is equal or smaller than the target stream top item"
        );
        assert_eq!(h.run("XADD s 1-* f v"), "$3 1-2");
        assert_eq!(h.run("XADD s 5 f v"), "$3 5-0");
        assert_eq!(h.run("XADD s * f v"), "$9 1000000-0");
        assert_eq!(h.run("XADD s NOMKSTREAM * f v"), "$9 1000000-1");
        assert_eq!(h.run("XADD missing NOMKSTREAM * f v"), "$-1");
        assert_eq!(h.run("XADD s MAXLEN 2 * f v"), "$9 1000000-2");
        assert_eq!(h.run("XLEN s"), ":2");
        assert_eq!(
            h.run("XADD s MAXLEN = 1 LIMIT 5 * f v"),
            "-ERR syntax error, LIMIT cannot be used without the special ~ option"
        );
        assert_eq!(
            h.run("XADD s x-1 f v"),
            "-ERR Invalid stream ID specified as stream command argument"
        );
    }

    #[test]
    fn stream_keeps_last_id_after_trim_and_exists_empty() {
        let mut h = Harness::new();
        h.run("XADD s 5-5 f v");
        assert_eq!(h.run("XTRIM s MAXLEN 0"), ":1");
        assert_eq!(h.run("TYPE s"), "+stream");
        assert_eq!(h.run("XLEN s"), ":0");
        assert!(
            h.run("XADD s 5-5 f v")
                .starts_with("-ERR The ID specified in XADD is equal")
        );
        let info = h.run("XINFO STREAM s");
        assert!(info.contains("last-generated-id $3 5-5"), "{info}");
        assert!(info.contains("max-deleted-entry-id $3 5-5"), "{info}");
        assert!(info.contains("entries-added :1"), "{info}");
        assert!(info.contains("first-entry $-1"), "{info}");
    }

    #[test]
    fn ranges_handle_exclusive_bounds_and_counts() {
        let mut h = Harness::new();
        for i in 1..=5 {
            h.run(&format!("XADD s {i}-0 f v{i}"));
        }
        assert_eq!(
            h.run("XRANGE s (2 4 COUNT 5"),
            "*2 *2 $3 3-0 *2 $1 f $2 v3 *2 $3 4-0 *2 $1 f $2 v4"
        );
        assert_eq!(
            h.run("XREVRANGE s + - COUNT 1"),
            "*1 *2 $3 5-0 *2 $1 f $2 v5"
        );
        assert_eq!(h.run("XRANGE s - + COUNT 0"), "*0");
        assert_eq!(
            h.run("XRANGE s (- +"),
            "-ERR Invalid stream ID specified as stream command argument"
        );
        assert_eq!(
            h.run("XRANGE s (18446744073709551615-18446744073709551615 +"),
            "-ERR invalid start ID for the interval"
        );
        assert_eq!(h.run("XRANGE nothing - +"), "*0");
        assert_eq!(
            h.run("XREAD COUNT 1 STREAMS s 4"),
            "*1 *2 $1 s *1 *2 $3 5-0 *2 $1 f $2 v5"
        );
        assert_eq!(
            h.run("XREAD STREAMS s +"),
            "*1 *2 $1 s *1 *2 $3 5-0 *2 $1 f $2 v5"
        );
        assert_eq!(h.run("XREAD STREAMS s $"), "*-1");
        assert_eq!(h.run("XREAD BLOCK 10 STREAMS s $"), "<blocked>");
        assert_eq!(h.run("XREAD BLOCK 10 STREAMS absent 0-0"), "<blocked>");
        assert_eq!(
            h.run("XREAD STREAMS s t u"),
            "-ERR Unbalanced 'xread' list of streams: for each stream key an ID or '$' must be specified."
        );
        assert_eq!(h.run("XDEL s 5-0 9-9"), ":1");
        assert_eq!(
            h.run("XREVRANGE s + - COUNT 1"),
            "*1 *2 $3 4-0 *2 $1 f $2 v4"
        );
    }

    #[test]
    fn set_options_and_expiry() {
        let mut h = Harness::new();
        assert_eq!(h.run("SET k v NX PX 1000"), "+OK");
        assert_eq!(h.run("SET k w NX"), "$-1");
        assert_eq!(h.run("PTTL k"), ":1000");
        assert_eq!(h.run("TTL k"), ":1");
        assert_eq!(h.run("SET k w XX KEEPTTL GET"), "$1 v");
        assert_eq!(h.run("PTTL k"), ":1000");
        assert_eq!(
            h.run("SET k v PX 0"),
            "-ERR invalid expire time in 'set' command"
        );
        assert_eq!(h.run("SET k v EX 1 PX 1"), "-ERR syntax error");
        h.now += 1000;
        assert_eq!(h.run("GET k"), "$-1");
        assert_eq!(h.run("PTTL k"), ":-2");
        h.run("SET k v");
        assert_eq!(h.run("PTTL k"), ":-1");
        assert_eq!(h.run("PEXPIRE k 500 XX"), ":0");
        assert_eq!(h.run("PEXPIRE k 500"), ":1");
        assert_eq!(h.run("PEXPIRE k 100 GT"), ":0");
        assert_eq!(h.run("PEXPIRE k 100 LT"), ":1");
        assert_eq!(h.run("PERSIST k"), ":1");
        assert_eq!(h.run("PEXPIRE k 0"), ":1");
        assert_eq!(h.run("EXISTS k"), ":0");
        assert_eq!(h.run("PEXPIRE k 10"), ":0");
    }

    #[test]
    fn hashes_behave_like_redis() {
        let mut h = Harness::new();
        assert_eq!(h.run("HSETNX m proto 1"), ":1");
        assert_eq!(h.run("HSETNX m proto 2"), ":0");
        assert_eq!(h.run("HINCRBY m session 1"), ":1");
        assert_eq!(
            h.run("HINCRBY m proto 9223372036854775807"),
            "-ERR increment or decrement would overflow"
        );
        assert_eq!(h.run("HSET m session 7 x y"), ":1");
        assert_eq!(h.run("HMGET m proto session nope"), "*3 $1 1 $1 7 $-1");
        assert_eq!(h.run("HINCRBY m x 1"), "-ERR hash value is not an integer");
        assert_eq!(
            h.run("HSET m a"),
            "-ERR wrong number of arguments for 'hset' command"
        );
        assert_eq!(h.run("HDEL m proto session x"), ":3");
        assert_eq!(h.run("EXISTS m"), ":0");
        assert_eq!(h.run("HMGET m a"), "*1 $-1");
    }

    #[test]
    fn auth_and_oom() {
        let mut h = Harness::new();
        assert_eq!(
            h.run("AUTH x"),
            "-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"
        );
        h.password = Some(blake3::hash(b"secret"));
        h.cl.authenticated = false;
        assert_eq!(h.run("GET k"), format!("-{NOAUTH}"));
        assert_eq!(
            h.run("nosuch"),
            "-ERR unknown command 'nosuch', with args beginning with:"
        );
        assert_eq!(h.run("AUTH wrong"), format!("-{WRONGPASS}"));
        assert_eq!(h.run("AUTH other secret"), format!("-{WRONGPASS}"));
        assert!(h.run("HELLO 3").starts_with("-NOAUTH HELLO must be called"));
        assert!(h.run("HELLO 3 AUTH default secret").starts_with("%7 "));
        assert_eq!(h.run("PING"), "+PONG");
        h.st.max_memory = 2000;
        assert_eq!(
            h.run("SET big 0123456789012345678901234567890123456789"),
            "+OK"
        );
        let big = "x".repeat(3000);
        assert_eq!(h.run(&format!("XADD s * f {big}")), format!("-{OOM}"));
        assert_eq!(h.run("DEL big"), ":1");
        assert_eq!(h.st.ks.used(), 0);
    }

    #[test]
    fn lists_are_typed_and_ranged() {
        let mut h = Harness::new();
        assert_eq!(h.run("RPUSH l b c"), ":2");
        assert_eq!(h.run("LPUSH l a"), ":3");
        assert_eq!(h.run("TYPE l"), "+list");
        assert_eq!(h.run("LRANGE l 0 -1"), "*3 $1 a $1 b $1 c");
        assert_eq!(h.run("LRANGE l -2 10"), "*2 $1 b $1 c");
        assert_eq!(h.run("GET l"), format!("-{WRONGTYPE}"));
        assert_eq!(h.run("LPOP l"), "$1 a");
        assert_eq!(h.run("RPOP l"), "$1 c");
        assert_eq!(h.run("RPOP l"), "$1 b");
        assert_eq!(h.run("EXISTS l"), ":0");
        assert_eq!(h.st.ks.used(), 0);
    }

    #[test]
    fn scan_match_and_type() {
        let mut h = Harness::new();
        h.run("SET tube:{a}:writer v");
        h.run("XADD tube:{a}:stream 1-1 f v");
        h.run("HSET tube:{a}:meta proto 1");
        h.run("SET other v");
        let mut found = Vec::new();
        let mut cursor = "0".to_string();
        loop {
            let args = vec![
                Bytes::from_static(b"SCAN"),
                Bytes::from(cursor.clone()),
                Bytes::from_static(b"MATCH"),
                Bytes::from_static(b"tube:\\{a\\}:*"),
                Bytes::from_static(b"COUNT"),
                Bytes::from_static(b"1"),
            ];
            let mut out = Out::new();
            let cfg = Config { password: None };
            execute(&mut h.st, &mut h.cl, &mut out, &cfg, &args, h.now);
            let text: Vec<u8> = out.slices().iter().flat_map(|s| s.to_vec()).collect();
            let text = String::from_utf8(text).unwrap();
            let parts: Vec<&str> = text.split("\r\n").collect();
            cursor = parts[2].to_string();
            found.extend(
                parts
                    .iter()
                    .filter(|p| p.starts_with("tube:"))
                    .map(|p| p.to_string()),
            );
            if cursor == "0" {
                break;
            }
        }
        found.sort();
        assert_eq!(
            found,
            ["tube:{a}:meta", "tube:{a}:stream", "tube:{a}:writer"]
        );
        assert_eq!(
            h.run("SCAN 0 TYPE stream COUNT 100"),
            "*2 $1 0 *1 $15 tube:{a}:stream"
        );
        assert_eq!(h.run("KEYS *writer"), "*1 $15 tube:{a}:writer");
        assert_eq!(h.run("DBSIZE"), ":4");
    }
}
