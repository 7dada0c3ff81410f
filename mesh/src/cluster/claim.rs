//! One load in the whole mesh: the node that places a cold model claims its load in etcd with
//! a transaction (the key must not exist), naming the node that loads it, tied to its own
//! lease; others that find the claim wait for that node's copy and forward to it. The claim is
//! given back once a copy is ready (or the load is over), and lost with its claimant's lease.

use parking_lot::Mutex;
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

/// This node's etcd handle for claims, and the claims it holds.
#[derive(Default)]
pub struct Claims {
    /// The session's client (none while etcd is lost) and the lease claims live under.
    session: Mutex<(Option<Client>, i64)>,
    /// The claims this node made, by key.
    held: Mutex<BTreeMap<String, Held>>,
}

/// A claim this node holds.
#[derive(Debug, Clone)]
pub struct Held {
    pub model: String,
    /// The node named to load it.
    pub loader: String,
    pub since: Instant,
}

/// The outcome of claiming a model's load for a node.
#[derive(Debug, PartialEq, Eq)]
pub enum Claimed {
    /// This node's claim went in: the node it named loads the model.
    Won,
    /// A claim was there already, naming the node that loads the model.
    Taken(String),
    /// etcd cannot be asked now: load here.
    Unknown,
}

impl Claims {
    /// A session's client and lease (claims made from now on live under it). The claims held
    /// under an earlier lease went with it; under the same lease (another etcd member took
    /// over) they are still held.
    pub fn connect(&self, client: Client, lease: i64) {
        let mut session = self.session.lock();
        if session.1 != lease {
            self.held.lock().clear();
        }
        *session = (Some(client), lease);
    }

    pub fn disconnect(&self) {
        self.session.lock().0 = None;
    }

    /// Claim the load of `model` under `key`, naming the node `loader` that loads it.
    pub async fn claim(&self, key: String, model: &str, loader: &str) -> Claimed {
        let (Some(mut client), lease) = self.session.lock().clone() else {
            return Claimed::Unknown;
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                loader,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let answer = tokio::time::timeout(Duration::from_secs(2), client.txn(txn)).await;
        let Ok(Ok(resp)) = answer else {
            return Claimed::Unknown;
        };
        if resp.succeeded() {
            let held = Held {
                model: model.to_string(),
                loader: loader.to_string(),
                since: Instant::now(),
            };
            self.held.lock().insert(key, held);
            return Claimed::Won;
        }
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).to_string()),
            _ => None,
        });
        match holder {
            Some(node) => Claimed::Taken(node),
            None => Claimed::Unknown,
        }
    }

    /// The claims this node holds, by key.
    pub fn held(&self) -> Vec<(String, Held)> {
        let held = self.held.lock();
        held.iter().map(|(k, h)| (k.clone(), h.clone())).collect()
    }

    /// Give back the claim under `key` (its copy is ready, or its load failed).
    pub async fn release(&self, client: &mut Client, key: String) -> anyhow::Result<()> {
        client.delete(key.clone(), None).await?;
        self.held.lock().remove(&key);
        Ok(())
    }
}
