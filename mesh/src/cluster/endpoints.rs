//! The etcd members this node may talk to: one connection at a time, to a member that has a
//! leader behind it, moving on to the next member when one fails.
//!
//! The crate's own client balances over all endpoints but keeps sending calls to a dead one;
//! here each connection goes to one member, checked with a linearizable read (which only a
//! member of a working quorum answers), and a failed member is skipped.

use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions};
use parking_lot::Mutex;

use super::config::EtcdTls;

/// How long one member may take to connect and answer the check.
const TRY_FOR: Duration = Duration::from_secs(1);

/// The pause after every member has been tried once without an answer.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// No member of etcd answered, each tried at least once and for the whole failover window:
/// etcd itself is lost.
#[derive(Debug, thiserror::Error)]
#[error("no etcd member answered ({tries} tries of {members} members): {last}")]
pub struct Unreachable {
    tries: usize,
    members: usize,
    /// The last member's error.
    last: String,
}

/// The etcd endpoints from `[mesh] etcd`, and the one in use.
pub struct Endpoints {
    list: Vec<String>,
    tls: Option<EtcdTls>,
    /// Index of the member last connected to.
    current: Mutex<Option<usize>>,
}

impl Endpoints {
    pub fn new(list: Vec<String>, tls: Option<EtcdTls>) -> Self {
        Endpoints {
            list,
            tls,
            current: Mutex::new(None),
        }
    }

    /// The member in use, if any.
    pub fn current(&self) -> Option<String> {
        let current = *self.current.lock();
        current.map(|i| self.list[i].clone())
    }

    /// A client of one member that answers a linearizable read of `probe`, trying the members
    /// in turn (after the one last used, which `why` says failed), each at least once and
    /// round again until `window` has passed.
    pub async fn connect(
        &self,
        probe: &str,
        window: Duration,
        why: Option<&str>,
    ) -> Result<Client, Unreachable> {
        let deadline = Instant::now() + window;
        let previous = *self.current.lock();
        let start = previous.map_or(0, |i| i + 1);
        let mut last = String::from("no etcd endpoint is configured");
        let mut tries = 0;
        for attempt in 0.. {
            if self.list.is_empty() {
                break;
            }
            tries += 1;
            let i = (start + attempt) % self.list.len();
            let endpoint = &self.list[i];
            match tokio::time::timeout(TRY_FOR, self.try_one(endpoint, probe)).await {
                Ok(Ok(client)) => {
                    *self.current.lock() = Some(i);
                    if let Some(from) = previous.filter(|p| *p != i) {
                        tracing::info!(
                            from = %self.list[from],
                            to = %endpoint,
                            error = why.unwrap_or(""),
                            "Switched etcd endpoint"
                        );
                    }
                    return Ok(client);
                }
                Ok(Err(e)) => last = format!("{endpoint}: {e:#}"),
                Err(_) => last = format!("{endpoint}: no answer within {TRY_FOR:?}"),
            }
            tracing::debug!(error = %last, "etcd member not usable");
            if attempt + 1 >= self.list.len() && Instant::now() >= deadline {
                break;
            }
            if (attempt + 1) % self.list.len() == 0 {
                tokio::time::sleep(ROUND_PAUSE).await;
            }
        }
        Err(Unreachable {
            tries,
            members: self.list.len(),
            last,
        })
    }

    async fn try_one(&self, endpoint: &str, probe: &str) -> anyhow::Result<Client> {
        let mut options = ConnectOptions::new()
            // A member cut off from the others fails calls and ends watches instead of
            // answering from a stale copy or holding them open.
            .with_require_leader(true)
            .with_connect_timeout(TRY_FOR)
            // A member that vanishes without closing the connection is noticed too.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.options()?);
        }
        let mut client = Client::connect([endpoint], Some(options)).await?;
        client
            .get(probe, Some(GetOptions::new().with_count_only()))
            .await?;
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback port nothing listens on.
    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("http://127.0.0.1:{port}")
    }

    async fn refused(etcd: &Endpoints, window: Duration) -> Unreachable {
        match etcd.connect("/p/nodes/", window, None).await {
            Ok(_) => panic!("connected to a closed port"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn with_no_member_answering_each_is_tried_once_and_the_last_error_named() {
        let (one, two) = (closed_port(), closed_port());
        let etcd = Endpoints::new(vec![one, two.clone()], None);
        let e = refused(&etcd, Duration::ZERO).await;
        assert_eq!((e.tries, e.members), (2, 2));
        assert!(e.last.starts_with(&two), "{e}");
        assert_eq!(etcd.current(), None);
    }

    #[tokio::test]
    async fn members_are_tried_again_until_the_window_ends() {
        let etcd = Endpoints::new(vec![closed_port()], None);
        let start = Instant::now();
        let e = refused(&etcd, Duration::from_millis(500)).await;
        assert!(start.elapsed() >= Duration::from_millis(500));
        assert!(e.tries >= 2, "{e}");
    }

    #[tokio::test]
    async fn no_endpoint_is_unreachable_not_a_panic() {
        let etcd = Endpoints::new(vec![], None);
        let e = refused(&etcd, Duration::ZERO).await;
        assert_eq!(e.tries, 0);
        assert!(
            e.to_string().contains("no etcd endpoint is configured"),
            "{e}"
        );
    }
}
