//! What plugins remember, kept in the host: a key-value store and counters per plugin, and the
//! answer store of the cache slot, scoped by tenant.

use parking_lot::Mutex;
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use super::bindings::{imports::flatmesh::policy::answers::Neighbour, Answer};

fn expiry(ttl_ms: u64) -> Option<Instant> {
    (ttl_ms > 0).then(|| Instant::now() + Duration::from_millis(ttl_ms))
}

fn expired(at: Option<Instant>) -> bool {
    at.is_some_and(|t| t <= Instant::now())
}

/// The host state of one plugin slot; it outlives reloads of the plugin.
pub struct PluginState {
    /// The slot and file, for logs.
    pub name: String,
    pub kv: Kv,
    pub counters: Counters,
}

impl PluginState {
    pub fn new(name: String, kv_cap_bytes: usize) -> Arc<Self> {
        Arc::new(PluginState {
            name,
            kv: Kv::new(kv_cap_bytes),
            counters: Counters::default(),
        })
    }
}

/// Keys with values and optional expiry, capped in total bytes.
pub struct Kv {
    cap: usize,
    inner: Mutex<KvInner>,
}

#[derive(Default)]
struct KvInner {
    bytes: usize,
    entries: HashMap<String, (Vec<u8>, Option<Instant>)>,
}

impl KvInner {
    fn remove(&mut self, key: &str) {
        if let Some((v, _)) = self.entries.remove(key) {
            self.bytes -= key.len() + v.len();
        }
    }

    fn purge_expired(&mut self) {
        let dead: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, (_, at))| expired(*at))
            .map(|(k, _)| k.clone())
            .collect();
        for k in dead {
            self.remove(&k);
        }
    }
}

impl Kv {
    pub fn new(cap: usize) -> Self {
        Kv {
            cap,
            inner: Mutex::default(),
        }
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut kv = self.inner.lock();
        match kv.entries.get(key) {
            Some((_, at)) if expired(*at) => {
                kv.remove(key);
                None
            }
            Some((v, _)) => Some(v.clone()),
            None => None,
        }
    }

    pub fn set(&self, key: String, value: Vec<u8>, ttl_ms: u64) -> Result<(), String> {
        let mut kv = self.inner.lock();
        let size = key.len() + value.len();
        // What the store would hold with this entry in place of the old one (which stays if
        // the new one does not fit).
        let after = |kv: &KvInner| {
            kv.bytes + size - kv.entries.get(&key).map_or(0, |(v, _)| key.len() + v.len())
        };
        if after(&kv) > self.cap {
            kv.purge_expired();
        }
        if after(&kv) > self.cap {
            return Err(format!(
                "the key-value store is full ({} of {} bytes used; this entry needs {size})",
                kv.bytes, self.cap
            ));
        }
        kv.remove(&key);
        kv.bytes += size;
        kv.entries.insert(key, (value, expiry(ttl_ms)));
        Ok(())
    }

    pub fn delete(&self, key: &str) {
        self.inner.lock().remove(key);
    }
}

/// Named counters over sliding windows, kept in one-second buckets for up to an hour.
#[derive(Default)]
pub struct Counters {
    inner: Mutex<HashMap<String, VecDeque<(u64, u64)>>>,
}

/// Buckets older than this are dropped; longer windows see at most this much.
const MAX_WINDOW_S: u64 = 3600;
/// More names than this and new names are not counted (a plugin must not exhaust the host).
const MAX_COUNTERS: usize = 10_000;
/// Longest counter name, answer key or namespace.
const MAX_NAME: usize = 512;

fn now_s() -> u64 {
    crate::util::now_ms() / 1000
}

impl Counters {
    pub fn add(&self, name: &str, amount: u64, window_ms: u64) -> u64 {
        let now = now_s();
        let mut all = self.inner.lock();
        if !all.contains_key(name) && (all.len() >= MAX_COUNTERS || name.len() > MAX_NAME) {
            return 0;
        }
        let buckets = all.entry(name.to_string()).or_default();
        while buckets
            .front()
            .is_some_and(|(s, _)| *s + MAX_WINDOW_S <= now)
        {
            buckets.pop_front();
        }
        match buckets.back_mut() {
            Some((s, n)) if *s == now => *n = n.saturating_add(amount),
            _ => buckets.push_back((now, amount)),
        }
        sum(buckets, now, window_ms)
    }

    pub fn sum(&self, name: &str, window_ms: u64) -> u64 {
        self.inner
            .lock()
            .get(name)
            .map_or(0, |b| sum(b, now_s(), window_ms))
    }
}

fn sum(buckets: &VecDeque<(u64, u64)>, now: u64, window_ms: u64) -> u64 {
    let window_s = window_ms.div_ceil(1000).max(1);
    buckets
        .iter()
        .rev()
        .take_while(|(s, _)| *s + window_s > now)
        .map(|(_, n)| n)
        .fold(0u64, |a, n| a.saturating_add(*n))
}

/// Most answers kept, all tenants together; the oldest go first.
const MAX_ANSWERS: usize = 10_000;
/// Most bytes of answers and vectors kept, all tenants together.
const MAX_ANSWER_STORE_BYTES: usize = 256 << 20;
/// Longest answer text.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Longest vector.
const MAX_DIMS: usize = 8192;

fn stored_size(answer: &Answer, vector: Option<&[f32]>) -> usize {
    answer.text.len() + answer.finish_reason.len() + vector.map_or(0, |v| v.len() * 4)
}
/// An answer kept without a TTL of its own lives this long.
const DEFAULT_ANSWER_TTL_MS: u64 = 3_600_000;

/// The response store of the cache slot, shared by every version of the cache plugin.
/// Entries are keyed by tenant first: a plugin names namespaces and keys, the host adds the
/// calling tenant, so no tenant can read another's answers.
#[derive(Clone, Default)]
pub struct Answers {
    inner: Arc<Mutex<AnswersInner>>,
}

#[derive(Default)]
struct AnswersInner {
    seq: u64,
    /// (tenant, namespace) → key → entry
    spaces: HashMap<(String, String), HashMap<String, Stored>>,
    /// Insertion order, oldest first: seq → (tenant, namespace, key).
    order: BTreeMap<u64, (String, String, String)>,
    bytes: usize,
}

struct Stored {
    answer: Answer,
    vector: Option<Vec<f32>>,
    expires: Instant,
    seq: u64,
}

impl AnswersInner {
    fn evict_oldest(&mut self) {
        if let Some((_, (tenant, namespace, key))) = self.order.pop_first() {
            if let Some(old) = self
                .spaces
                .get_mut(&(tenant, namespace))
                .and_then(|m| m.remove(&key))
            {
                self.bytes -= stored_size(&old.answer, old.vector.as_deref());
            }
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

impl Answers {
    pub fn get(&self, tenant: &str, namespace: &str, key: &str) -> Option<Answer> {
        let inner = self.inner.lock();
        let s = inner
            .spaces
            .get(&(tenant.to_string(), namespace.to_string()))?
            .get(key)?;
        (s.expires > Instant::now()).then(|| s.answer.clone())
    }

    pub fn put(
        &self,
        tenant: &str,
        namespace: String,
        key: String,
        answer: Answer,
        vector: Option<Vec<f32>>,
        ttl_ms: u64,
    ) -> Result<(), String> {
        if vector
            .as_ref()
            .is_some_and(|v| v.len() > MAX_DIMS || v.iter().any(|x| !x.is_finite()))
        {
            return Err(format!(
                "the vector must have at most {MAX_DIMS} finite numbers"
            ));
        }
        if key.len() > MAX_NAME || namespace.len() > MAX_NAME {
            return Err(format!("keys and namespaces are at most {MAX_NAME} bytes"));
        }
        if answer.text.len() > MAX_ANSWER_BYTES {
            return Err(format!("an answer is at most {MAX_ANSWER_BYTES} bytes"));
        }
        let size = stored_size(&answer, vector.as_deref());
        let ttl = if ttl_ms == 0 {
            DEFAULT_ANSWER_TTL_MS
        } else {
            ttl_ms
        };
        let mut inner = self.inner.lock();
        inner.seq += 1;
        let seq = inner.seq;
        let space = (tenant.to_string(), namespace);
        let stored = Stored {
            answer,
            vector,
            expires: Instant::now() + Duration::from_millis(ttl),
            seq,
        };
        let old = inner
            .spaces
            .entry(space.clone())
            .or_default()
            .insert(key.clone(), stored);
        if let Some(old) = old {
            inner.order.remove(&old.seq);
            inner.bytes -= stored_size(&old.answer, old.vector.as_deref());
        }
        inner.bytes += size;
        inner.order.insert(seq, (space.0, space.1, key));
        while inner.order.len() > MAX_ANSWERS || inner.bytes > MAX_ANSWER_STORE_BYTES {
            inner.evict_oldest();
        }
        Ok(())
    }

    pub fn nearest(
        &self,
        tenant: &str,
        namespace: &str,
        vector: &[f32],
        threshold: f32,
    ) -> Option<Neighbour> {
        let inner = self.inner.lock();
        let now = Instant::now();
        let space = inner
            .spaces
            .get(&(tenant.to_string(), namespace.to_string()))?;
        space
            .iter()
            .filter(|(_, s)| s.expires > now)
            .filter_map(|(k, s)| {
                let v = s.vector.as_ref().filter(|v| v.len() == vector.len())?;
                Some((k, s, cosine(vector, v)))
            })
            .filter(|(_, _, sim)| *sim >= threshold)
            .max_by(|a, b| a.2.total_cmp(&b.2))
            .map(|(k, s, similarity)| Neighbour {
                key: k.clone(),
                answer: s.answer.clone(),
                similarity,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> Answer {
        Answer {
            text: text.into(),
            finish_reason: "stop".into(),
            completion_tokens: 1,
        }
    }

    #[test]
    fn answers_never_cross_tenants() {
        let a = Answers::default();
        a.put(
            "t1",
            "m".into(),
            "k".into(),
            answer("one"),
            Some(vec![1.0, 0.0]),
            0,
        )
        .unwrap();
        assert_eq!(a.get("t1", "m", "k").unwrap().text, "one");
        assert!(a.get("t2", "m", "k").is_none());
        assert!(a.nearest("t2", "m", &[1.0, 0.0], 0.5).is_none());
        let near = a.nearest("t1", "m", &[0.9, 0.1], 0.9).unwrap();
        assert_eq!(near.answer.text, "one");
        assert!(near.similarity > 0.99);
        assert!(a.nearest("t1", "m", &[0.0, 1.0], 0.5).is_none());
    }

    #[test]
    fn the_oldest_answers_leave_first() {
        let a = Answers::default();
        for i in 0..MAX_ANSWERS + 5 {
            a.put("t", "m".into(), format!("k{i}"), answer("x"), None, 0)
                .unwrap();
        }
        a.put("t", "m".into(), "k5".into(), answer("again"), None, 0)
            .unwrap(); // replacing refreshes k5
        a.put("t", "m".into(), "new".into(), answer("y"), None, 0)
            .unwrap();
        assert!(a.get("t", "m", "k4").is_none());
        assert!(a.get("t", "m", "k6").is_none());
        assert_eq!(a.get("t", "m", "k5").unwrap().text, "again");
        assert!(a.get("t", "m", "k7").is_some());
    }

    #[test]
    fn kv_is_capped_and_expires() {
        let kv = Kv::new(10);
        kv.set("a".into(), vec![0; 5], 0).unwrap();
        assert!(kv.set("b".into(), vec![0; 5], 0).is_err());
        kv.set("a".into(), vec![0; 9], 0).unwrap(); // replacing frees the old value
        assert!(kv.set("a".into(), vec![0; 10], 0).is_err());
        assert_eq!(
            kv.get("a").map(|v| v.len()),
            Some(9),
            "a failed set keeps the old value"
        );
        kv.delete("a");
        kv.set("c".into(), vec![1], 1).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(kv.get("c"), None);
    }

    #[test]
    fn counters_sum_their_window() {
        let c = Counters::default();
        assert_eq!(c.add("t", 5, 60_000), 5);
        assert_eq!(c.add("t", 7, 60_000), 12);
        assert_eq!(c.sum("t", 60_000), 12);
        assert_eq!(c.sum("other", 60_000), 0);
    }
}
