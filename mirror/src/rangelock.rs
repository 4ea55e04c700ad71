//! Range locks: an overlapping write (or resync chunk) waits until the one in flight has
//! completed on both nodes, so both apply overlapping writes in the same order. Two replicas
//! that differ silently are the worst failure this product can have.
//!
//! Waiters are served in arrival order per range: a request is granted only when it overlaps
//! neither a held range nor an earlier waiter, so a stream of small writes cannot starve a
//! large one and the order of overlapping requests is the order they arrived in.
//! Non-overlapping requests never wait for each other (the common case: a VM does not write
//! the same block twice at once).

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
struct Inner {
    next_ticket: u64,
    /// Granted and waiting requests in arrival order: (ticket, start, end, granted).
    entries: Vec<(u64, u64, u64, bool)>,
}

#[derive(Default)]
pub struct RangeLocks {
    inner: Mutex<Inner>,
    released: Notify,
}

pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    ticket: u64,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl RangeLocks {
    pub fn new() -> Arc<RangeLocks> {
        Arc::new(RangeLocks::default())
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this mutex leaves consistent data (plain Vec edits).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks `offset..offset+len` (an empty range locks one byte, so zero-length operations
    /// are ordered too).
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let range = (offset, offset.saturating_add(len.max(1)));
        let ticket = {
            let mut st = self.lock_inner();
            let t = st.next_ticket;
            st.next_ticket += 1;
            let granted = !st.entries.iter().any(|e| overlaps((e.1, e.2), range));
            st.entries.push((t, range.0, range.1, granted));
            if granted {
                return RangeGuard {
                    locks: self,
                    ticket: t,
                };
            }
            t
        };
        // Drop the ticket if this future is cancelled while waiting.
        let guard = RangeGuard {
            locks: self,
            ticket,
        };
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock_inner();
                let pos = st.entries.iter().position(|e| e.0 == ticket);
                if let Some(pos) = pos {
                    let blocked = st.entries[..pos]
                        .iter()
                        .any(|e| overlaps((e.1, e.2), range));
                    if !blocked {
                        st.entries[pos].3 = true;
                        return guard;
                    }
                }
            }
            notified.await;
        }
    }

    /// Number of granted or waiting requests (for tests and status).
    pub fn len(&self) -> usize {
        self.lock_inner().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.locks.lock_inner();
        st.entries.retain(|e| e.0 != self.ticket);
        drop(st);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_waits_disjoint_does_not() {
        let locks = RangeLocks::new();
        let g1 = locks.lock(0, 4096).await;
        // Disjoint: granted at once.
        let g2 = tokio::time::timeout(Duration::from_secs(1), locks.lock(4096, 4096))
            .await
            .expect("disjoint range must not wait");
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(100, 10).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "overlapping range must wait");
        drop(g1);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("waiter must be granted after release")
            .unwrap();
        drop(g2);
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn arrival_order_is_kept_for_overlaps() {
        let locks = RangeLocks::new();
        let g = locks.lock(0, 100).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5u64 {
            let (l, o) = (locks.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _g = l.lock(i * 10, 50).await;
                o.lock().unwrap().push(i);
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(g);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn cancelled_waiter_leaves_no_ticket() {
        let locks = RangeLocks::new();
        let g = locks.lock(0, 10).await;
        let r = tokio::time::timeout(Duration::from_millis(20), locks.lock(5, 10)).await;
        assert!(r.is_err());
        drop(g);
        assert!(locks.is_empty());
        let _again = tokio::time::timeout(Duration::from_secs(1), locks.lock(5, 10))
            .await
            .unwrap();
    }
}
