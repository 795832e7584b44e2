//! The data set: sixteen databases of keys, their expiry, and the bytes they are counted as.
//!
//! Keys are ordered by (hash, name) in a `BTreeMap`. Lookups cost a few comparisons of
//! integers, and the order is stable while keys come and go, which is what SCAN's cursor
//! needs: the cursor is the hash to resume from, so a key present for a whole scan is always
//! returned, as Redis promises.

use super::stream::Stream;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::ops::Bound;

/// Number of databases (SELECT 0..15).
pub(crate) const DATABASES: usize = 16;
/// Bytes counted for a key besides its name: map node, entry, bookkeeping.
pub(crate) const KEY_OVERHEAD: usize = 96;
/// Bytes counted for a key's expiry besides its name (the expiry index holds a copy).
pub(crate) const EXPIRE_OVERHEAD: usize = 48;
/// Bytes counted for a hash field besides its name and value.
pub(crate) const HASH_FIELD_OVERHEAD: usize = 48;
/// Bytes counted for a string besides its bytes.
pub(crate) const STRING_OVERHEAD: usize = 16;

/// A key's position: its hash first, so that SCAN can resume from a number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    hash: u64,
    name: Bytes,
}

/// The hash SCAN orders keys by. Fixed keys make the order the same for every scan.
fn key_hash(name: &[u8]) -> u64 {
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    h.write(name);
    // 0 is the cursor that means "start" and "done": keep it for that.
    h.finish().max(1)
}

impl Key {
    pub fn new(name: Bytes) -> Self {
        Self {
            hash: key_hash(&name),
            name,
        }
    }
}

/// A hash value with its counted size.
#[derive(Debug, Default)]
pub(crate) struct Hash {
    pub fields: HashMap<Bytes, Bytes>,
    mem: usize,
}

impl Hash {
    /// Sets a field; returns whether it is new.
    pub fn set(&mut self, field: Bytes, value: Bytes) -> bool {
        match self.fields.get_mut(&field) {
            Some(old) => {
                self.mem = self.mem + value.len() - old.len();
                *old = value;
                false
            }
            None => {
                self.mem += field.len() + value.len() + HASH_FIELD_OVERHEAD;
                self.fields.insert(field, value);
                true
            }
        }
    }

    /// Removes a field; returns whether it was there.
    pub fn remove(&mut self, field: &[u8]) -> bool {
        match self.fields.remove_entry(field) {
            Some((f, v)) => {
                self.mem -= f.len() + v.len() + HASH_FIELD_OVERHEAD;
                true
            }
            None => false,
        }
    }

    pub fn mem(&self) -> usize {
        self.mem
    }
}

/// A list value with its counted size. tube never makes lists; they exist so that tools and
/// tests can put one where tube expects its own keys.
#[derive(Debug, Default)]
pub(crate) struct List {
    pub items: std::collections::VecDeque<Bytes>,
    mem: usize,
}

impl List {
    pub fn push(&mut self, item: Bytes, front: bool) {
        self.mem += item.len() + LIST_ITEM_OVERHEAD;
        if front {
            self.items.push_front(item);
        } else {
            self.items.push_back(item);
        }
    }

    pub fn pop(&mut self, front: bool) -> Option<Bytes> {
        let item = if front {
            self.items.pop_front()
        } else {
            self.items.pop_back()
        }?;
        self.mem -= item.len() + LIST_ITEM_OVERHEAD;
        Some(item)
    }
}

/// Bytes counted for a list item besides its bytes.
pub(crate) const LIST_ITEM_OVERHEAD: usize = 24;

/// A kind of value that commands read in place.
pub(crate) trait Kind {
    /// The value as this kind, `None` when it is another (WRONGTYPE to the client).
    fn of(value: &Value) -> Option<&Self>;
}

/// A kind of value that commands also change in place, creating it when the key is absent
/// and removing the key when it empties, as Redis does for hashes and lists.
pub(crate) trait Collection: Kind + Default {
    fn of_mut(value: &mut Value) -> Option<&mut Self>;
    fn wrap(self) -> Value;
    fn is_empty(&self) -> bool;
}

macro_rules! kind {
    ($variant:ident, $ty:ty) => {
        impl Kind for $ty {
            fn of(value: &Value) -> Option<&Self> {
                match value {
                    Value::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
    ($variant:ident, $ty:ty, $items:ident) => {
        kind!($variant, $ty);
        impl Collection for $ty {
            fn of_mut(value: &mut Value) -> Option<&mut Self> {
                match value {
                    Value::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(self) -> Value {
                Value::$variant(self)
            }
            fn is_empty(&self) -> bool {
                self.$items.is_empty()
            }
        }
    };
}

kind!(Hash, Hash, fields);
kind!(List, List, items);
kind!(Stream, Stream);

/// What a key holds.
#[derive(Debug)]
pub(crate) enum Value {
    Str(Bytes),
    Hash(Hash),
    List(List),
    Stream(Stream),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::Hash(_) => "hash",
            Value::List(_) => "list",
            Value::Stream(_) => "stream",
        }
    }

    fn mem(&self) -> usize {
        match self {
            Value::Str(b) => b.len() + STRING_OVERHEAD,
            Value::Hash(h) => h.mem(),
            Value::List(l) => l.mem,
            Value::Stream(s) => s.mem(),
        }
    }
}

/// A key's value and expiry.
#[derive(Debug)]
pub(crate) struct Entry {
    pub value: Value,
    /// Unix time in ms when the key goes, if it does.
    expires: Option<u64>,
}

impl Entry {
    pub fn expires(&self) -> Option<u64> {
        self.expires
    }
}

/// Bytes a key with this name and value is counted as.
fn counted(name: &[u8], entry: &Entry) -> usize {
    KEY_OVERHEAD
        + name.len()
        + entry.value.mem()
        + entry.expires.map_or(0, |_| EXPIRE_OVERHEAD + name.len())
}

/// One database.
#[derive(Debug, Default)]
pub(crate) struct Db {
    keys: BTreeMap<Key, Entry>,
    /// Keys with an expiry, by deadline: the active sweep takes them from the front.
    expiring: BTreeSet<(u64, Key)>,
}

/// All databases and the bytes they hold.
#[derive(Debug)]
pub(crate) struct Keyspace {
    dbs: Vec<Db>,
    /// Bytes counted for everything held.
    used: usize,
    /// Keys removed because they expired.
    pub expired_keys: u64,
}

impl Default for Keyspace {
    fn default() -> Self {
        Self::new()
    }
}

impl Keyspace {
    pub fn new() -> Self {
        Self {
            dbs: (0..DATABASES).map(|_| Db::default()).collect(),
            used: 0,
            expired_keys: 0,
        }
    }

    /// Bytes counted for the whole data set.
    pub fn used(&self) -> usize {
        self.used
    }

    pub fn len(&self, db: usize) -> usize {
        self.dbs[db].keys.len()
    }

    pub fn expiring_len(&self, db: usize) -> usize {
        self.dbs[db].expiring.len()
    }

    /// The live entry of a key; an expired one is removed first (lazy expiry).
    pub fn get(&mut self, db: usize, name: &Bytes, now: u64) -> Option<&Entry> {
        self.get_mut(db, name, now).map(|e| &*e)
    }

    /// Like [`Keyspace::get`], for a change that does not alter the counted size; use
    /// [`Keyspace::update`] for changes that do.
    pub fn get_mut(&mut self, db: usize, name: &Bytes, now: u64) -> Option<&mut Entry> {
        let key = Key::new(name.clone());
        let expired = self.dbs[db]
            .keys
            .get(&key)
            .is_some_and(|e| e.expires.is_some_and(|t| t <= now));
        if expired {
            self.remove_key(db, &key);
            self.expired_keys += 1;
            return None;
        }
        self.dbs[db].keys.get_mut(&key)
    }

    /// Changes a live key's value in place, keeping the count right; `None` if it is absent.
    pub fn update<R>(
        &mut self,
        db: usize,
        name: &Bytes,
        now: u64,
        f: impl FnOnce(&mut Value) -> R,
    ) -> Option<R> {
        let entry = self.get_mut(db, name, now)?;
        let before = counted(name, entry);
        let r = f(&mut entry.value);
        let after = counted(name, entry);
        self.used = self.used + after - before;
        Some(r)
    }

    /// Stores a value under a key, replacing anything there; `keep_ttl` keeps its expiry.
    pub fn set(
        &mut self,
        db: usize,
        name: Bytes,
        value: Value,
        expires: Option<u64>,
        keep_ttl: bool,
    ) {
        let key = Key::new(name);
        let old_expiry = self.dbs[db].keys.get(&key).and_then(|e| e.expires);
        let expires = if keep_ttl { old_expiry } else { expires };
        self.remove_key(db, &key);
        let entry = Entry { value, expires };
        self.used += counted(&key.name, &entry);
        if let Some(t) = expires {
            self.dbs[db].expiring.insert((t, key.clone()));
        }
        self.dbs[db].keys.insert(key, entry);
    }

    /// Removes a key (live or not); returns whether it was live.
    pub fn delete(&mut self, db: usize, name: &Bytes, now: u64) -> bool {
        let key = Key::new(name.clone());
        let live = self.dbs[db]
            .keys
            .get(&key)
            .is_some_and(|e| e.expires.is_none_or(|t| t > now));
        self.remove_key(db, &key);
        live
    }

    fn remove_key(&mut self, db: usize, key: &Key) {
        if let Some(entry) = self.dbs[db].keys.remove(key) {
            self.used -= counted(&key.name, &entry);
            if let Some(t) = entry.expires {
                self.dbs[db].expiring.remove(&(t, key.clone()));
            }
        }
    }

    /// Sets or clears a live key's expiry; returns false if the key is absent.
    pub fn set_expiry(&mut self, db: usize, name: &Bytes, when: Option<u64>, now: u64) -> bool {
        let key = Key::new(name.clone());
        let Some(entry) = self.get_mut(db, name, now) else {
            return false;
        };
        let before = counted(name, entry);
        let old = std::mem::replace(&mut entry.expires, when);
        let after = counted(name, entry);
        self.used = self.used + after - before;
        let d = &mut self.dbs[db];
        if let Some(t) = old {
            d.expiring.remove(&(t, key.clone()));
        }
        if let Some(t) = when {
            d.expiring.insert((t, key));
        }
        true
    }

    /// Removes up to `max` keys whose time has come; returns how many went.
    pub fn sweep(&mut self, now: u64, max: usize) -> usize {
        let mut n = 0;
        for db in 0..DATABASES {
            while n < max {
                let Some((t, key)) = self.dbs[db].expiring.first().cloned() else {
                    break;
                };
                if t > now {
                    break;
                }
                self.remove_key(db, &key);
                self.expired_keys += 1;
                n += 1;
            }
        }
        n
    }

    /// Empties one database.
    pub fn flush(&mut self, db: usize) {
        let d = std::mem::take(&mut self.dbs[db]);
        for (key, entry) in &d.keys {
            self.used -= counted(&key.name, entry);
        }
    }

    /// Up to about `count` keys from `cursor` on, and the cursor to continue from (0: done).
    /// Expired keys are skipped.
    pub fn scan(
        &self,
        db: usize,
        cursor: u64,
        count: usize,
        now: u64,
    ) -> (u64, Vec<(&Bytes, &Entry)>) {
        let start = Key {
            hash: cursor,
            name: Bytes::new(),
        };
        let mut out = Vec::new();
        let mut iter = self.dbs[db]
            .keys
            .range((Bound::Included(start), Bound::Unbounded));
        for (key, entry) in iter.by_ref() {
            if entry.expires.is_none_or(|t| t > now) {
                out.push((&key.name, entry));
            }
            if out.len() >= count {
                break;
            }
        }
        // Resume at the next key's hash; keys sharing the last hash may come twice, which
        // SCAN allows, but none is skipped.
        let next = iter.next().map_or(0, |(k, _)| k.hash);
        (next, out)
    }

    /// Every live key of a database.
    pub fn keys(&self, db: usize, now: u64) -> impl Iterator<Item = (&Bytes, &Entry)> {
        self.dbs[db]
            .keys
            .iter()
            .filter(move |(_, e)| e.expires.is_none_or(|t| t > now))
            .map(|(k, e)| (&k.name, e))
    }

    /// Bytes counted for a key, as MEMORY USAGE reports it.
    pub fn usage(&mut self, db: usize, name: &Bytes, now: u64) -> Option<usize> {
        let entry = self.get(db, name, now)?;
        Some(counted(name, entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn expired_keys_vanish_on_access_and_by_sweep() {
        let mut ks = Keyspace::new();
        ks.set(0, b("a"), Value::Str(b("1")), Some(100), false);
        ks.set(0, b("b"), Value::Str(b("2")), Some(200), false);
        ks.set(0, b("c"), Value::Str(b("3")), None, false);
        assert!(ks.get(0, &b("a"), 99).is_some());
        assert!(ks.get(0, &b("a"), 100).is_none());
        assert_eq!(ks.sweep(150, 10), 0);
        assert_eq!(ks.sweep(250, 10), 1);
        assert_eq!(ks.len(0), 1);
        assert_eq!(ks.expired_keys, 2);
        assert_eq!(ks.expiring_len(0), 0);
    }

    #[test]
    fn accounting_returns_to_zero() {
        let mut ks = Keyspace::new();
        ks.set(0, b("k"), Value::Str(b("value")), Some(5), false);
        ks.set(0, b("k"), Value::Str(b("other")), None, true);
        assert!(ks.set_expiry(0, &b("k"), None, 0));
        ks.set(1, b("h"), Value::Hash(Hash::default()), None, false);
        ks.update(1, &b("h"), 0, |v| {
            if let Value::Hash(h) = v {
                h.set(b("f"), b("v"));
                h.set(b("f"), b("longer"));
                h.set(b("g"), b("v"));
                h.remove(b"g");
            }
        });
        assert!(ks.used() > 0);
        assert!(ks.delete(0, &b("k"), 0));
        ks.flush(1);
        assert_eq!(ks.used(), 0);
    }

    #[test]
    fn scan_returns_every_key_present_throughout() {
        let mut ks = Keyspace::new();
        for i in 0..100 {
            ks.set(0, b(&format!("k{i}")), Value::Str(b("v")), None, false);
        }
        let mut seen = std::collections::HashSet::new();
        let mut cursor = 0;
        let mut rounds = 0;
        loop {
            let (next, keys) = ks.scan(0, cursor, 7, 0);
            seen.extend(keys.iter().map(|(k, _)| k.to_vec()));
            // Keys come and go during the scan.
            ks.set(
                0,
                b(&format!("new{rounds}")),
                Value::Str(b("v")),
                None,
                false,
            );
            ks.delete(0, &b(&format!("new{}", rounds.max(1) - 1)), 0);
            rounds += 1;
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for i in 0..100 {
            assert!(seen.contains(format!("k{i}").as_bytes()));
        }
    }
}
