//! Work a request leaves running after its response: the
//! stale-while-revalidate refresh and refresh-ahead.
//!
//! `cachegate serve` keeps running between requests, so that work is simply
//! spawned. Lambda freezes the execution environment once an invocation is
//! complete, and an invocation is complete when the runtime *and every
//! registered extension* have asked for the next event. cachegate registers
//! an internal extension (the `lambda-extension` crate, in the same process)
//! for INVOKE events: it waits until the runtime has posted the invocation's
//! response and the work that invocation started has ended, and only then
//! asks for the next event. The client has its answer; the refresh runs
//! after it, inside the invocation's deadline, billed as Lambda's
//! `PostRuntimeExtensionsDuration`. Where the extension cannot register,
//! nothing may run after a response, and the request that wins a refresh
//! waits for it ([`Background::Inline`]).

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

/// How this process runs work after a response.
#[derive(Debug, Clone)]
pub enum Background {
    /// Spawned and left to run (`cachegate serve`).
    Spawned,
    /// Spawned and tracked: the Lambda extension holds the invocation open
    /// until the tracked work has ended.
    AfterResponse(TaskTracker),
    /// Nothing may outlive the response (Lambda without the extension).
    Inline,
}

impl Background {
    /// Whether work can run after the response; otherwise the caller does
    /// it before answering, or not at all.
    pub fn available(&self) -> bool {
        !matches!(self, Background::Inline)
    }

    /// Run `work` after the response. `false` (and `work` dropped) when
    /// that is not [`available`](Self::available).
    pub fn spawn<F>(&self, work: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self {
            Background::Spawned => {
                tokio::spawn(work);
                true
            }
            Background::AfterResponse(tracker) => {
                tracker.spawn(work);
                true
            }
            Background::Inline => false,
        }
    }
}

/// Kept clear of an invocation's deadline: Lambda ends an invocation whose
/// extension is still busy at the deadline as timed out.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// The two ends of the after-response hand-over: the runtime layer reports
/// each invocation whose response has been posted ([`Finished`]), the
/// extension waits for it and then for the work it left ([`Waiter`]).
pub fn after_response() -> (TaskTracker, Finished, Waiter) {
    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::unbounded_channel();
    (
        tracker.clone(),
        Finished(tx),
        Waiter {
            tracker,
            finished: rx,
        },
    )
}

/// Reports invocations whose response the runtime has posted.
#[derive(Clone)]
pub struct Finished(mpsc::UnboundedSender<String>);

impl Finished {
    pub fn report(&self, request_id: &str) {
        // The waiter lives as long as the process's extension; if it has
        // gone, there is nothing left to tell.
        let _ = self.0.send(request_id.to_owned());
    }
}

/// What one INVOKE event's wait came to, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// The response was posted and the work it left has ended.
    Done,
    /// The deadline came first; the work goes on if the environment is
    /// thawed again, and is bounded by its own timeouts.
    Deadline,
}

/// The extension's side: holds an invocation open until its response is
/// posted and the work it started has ended.
pub struct Waiter {
    tracker: TaskTracker,
    finished: mpsc::UnboundedReceiver<String>,
}

impl Waiter {
    /// Wait for invocation `request_id`, at most until `deadline` (less a
    /// margin). Reports of earlier invocations still queued are passed
    /// over: invocations run one at a time, and the extension may see an
    /// INVOKE event before or after the runtime has answered it.
    pub async fn wait(&mut self, request_id: &str, deadline: tokio::time::Instant) -> Waited {
        let until = deadline.checked_sub(DEADLINE_MARGIN).unwrap_or(deadline);
        let work = async {
            loop {
                match self.finished.recv().await {
                    Some(id) if id == request_id => break,
                    Some(_) => continue,
                    // The runtime has gone: nothing more will be started.
                    None => break,
                }
            }
            self.tracker.close();
            self.tracker.wait().await;
        };
        let waited = match tokio::time::timeout_at(until, work).await {
            Ok(()) => Waited::Done,
            Err(_) => Waited::Deadline,
        };
        self.tracker.reopen();
        waited
    }
}

/// No invocation outlives Lambda's longest function timeout.
const LONGEST_INVOCATION: Duration = Duration::from_secs(15 * 60);

/// A Lambda INVOKE event's deadline (milliseconds since the Unix epoch) on
/// tokio's clock. `0` means none was given (cargo-lambda's emulator sends
/// that); the longest invocation Lambda allows bounds the wait then.
pub fn deadline_from_epoch_ms(deadline_ms: u64) -> tokio::time::Instant {
    if deadline_ms == 0 {
        return tokio::time::Instant::now() + LONGEST_INVOCATION;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    tokio::time::Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::time::Instant;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[tokio::test]
    async fn waits_for_the_response_then_for_the_work_it_left() {
        let (tracker, finished, mut waiter) = after_response();
        let background = Background::AfterResponse(tracker);
        let refreshed = Arc::new(AtomicBool::new(false));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let flag = refreshed.clone();
        assert!(background.spawn(async move {
            let _ = released.await;
            flag.store(true, Ordering::SeqCst);
        }));
        let wait = tokio::spawn(async move {
            let waited = waiter.wait("req-1", far()).await;
            (waited, waiter)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !wait.is_finished(),
            "returned before the response was posted"
        );
        finished.report("req-1");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!wait.is_finished(), "returned while the refresh still ran");
        release.send(()).unwrap();
        let (waited, mut waiter) = wait.await.unwrap();
        assert_eq!(waited, Waited::Done);
        assert!(refreshed.load(Ordering::SeqCst));

        // The tracker is open again: the next invocation's work is tracked.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        background.spawn(async move {
            let _ = released.await;
        });
        finished.report("req-2");
        let second = tokio::spawn(async move { waiter.wait("req-2", far()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "the second invocation's work was not waited for"
        );
        release.send(()).unwrap();
        assert_eq!(second.await.unwrap(), Waited::Done);
    }

    #[tokio::test]
    async fn an_invocation_without_work_ends_with_its_response() {
        let (_tracker, finished, mut waiter) = after_response();
        // An earlier invocation's report, never claimed, is passed over.
        finished.report("old");
        finished.report("req-1");
        assert_eq!(waiter.wait("req-1", far()).await, Waited::Done);
    }

    #[tokio::test]
    async fn the_deadline_bounds_the_wait() {
        let (tracker, finished, mut waiter) = after_response();
        Background::AfterResponse(tracker).spawn(std::future::pending());
        finished.report("req-1");
        let deadline = Instant::now() + DEADLINE_MARGIN + Duration::from_millis(100);
        assert_eq!(waiter.wait("req-1", deadline).await, Waited::Deadline);
        assert!(Instant::now() < deadline, "waited into the margin");
        // And a response never reported (an event the runtime could not
        // read) does not hold the environment past it either.
        let deadline = Instant::now() + DEADLINE_MARGIN + Duration::from_millis(100);
        assert_eq!(waiter.wait("never", deadline).await, Waited::Deadline);
        assert!(Instant::now() < deadline, "waited into the margin");
    }

    #[test]
    fn deadlines_read_from_the_event() {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let left = deadline_from_epoch_ms(now_ms + 3_000) - Instant::now();
            assert!(left <= Duration::from_secs(3) && left > Duration::from_secs(2));
            assert!(deadline_from_epoch_ms(now_ms - 1_000) <= Instant::now());
            let none = deadline_from_epoch_ms(0) - Instant::now();
            assert!(none > Duration::from_secs(14 * 60), "{none:?}");
        });
    }

    #[test]
    fn inline_runs_nothing_after_the_response() {
        let inline = Background::Inline;
        assert!(!inline.available());
        assert!(!inline.spawn(async { panic!("ran") }));
    }
}
