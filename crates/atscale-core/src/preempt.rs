//! Preemptable work: a future raced against its context.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::context::Context;
use crate::error::{Cancelled, DeadlineExceeded, Interrupted};

pin_project! {
    /// Future returned by [`Context::run`]: the work's output, or why it was
    /// interrupted.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct Preemptable<F> {
        #[pin]
        work: F,
        #[pin]
        cancelled: WaitForCancellationFutureOwned,
        #[pin]
        timer: Option<Sleep>,
        cx: Context,
    }
}

impl<F> Preemptable<F> {
    pub(crate) fn new(cx: Context, work: F) -> Self {
        Preemptable {
            work,
            cancelled: cx.token().clone().cancelled_owned(),
            timer: cx.deadline().map(|d| tokio::time::sleep_until(d.instant())),
            cx,
        }
    }

    /// The context the work runs under.
    pub fn context(&self) -> &Context {
        &self.cx
    }
}

impl<F: Future> Future for Preemptable<F> {
    type Output = Result<F::Output, Interrupted>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Interruption wins over work that is ready in the same poll: once a
        // context is cancelled, nothing more should be reported as done under it.
        if this.cancelled.poll(cx).is_ready() {
            return Poll::Ready(Err(Interrupted::Cancelled(Cancelled::new())));
        }
        if let Some(timer) = this.timer.as_pin_mut()
            && timer.poll(cx).is_ready()
        {
            let deadline = this.cx.deadline().expect("a timer implies a deadline");
            return Poll::Ready(Err(Interrupted::DeadlineExceeded(DeadlineExceeded::at(
                deadline,
                Instant::now(),
            ))));
        }
        let output = ready!(this.work.poll(cx));
        Poll::Ready(Ok(output))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{Context, Kind, Origin};

    #[tokio::test(start_paused = true)]
    async fn finishes_when_work_is_faster() {
        let cx = Context::new().with_budget(Duration::from_secs(1), Origin::Local);
        let out = cx
            .run(async {
                tokio::time::sleep(Duration::from_millis(999)).await;
                7
            })
            .await;
        assert_eq!(out.unwrap(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_interrupts_and_reports_budget_and_elapsed() {
        let cx = Context::new().with_budget(Duration::from_millis(250), Origin::GrpcTimeout);
        let err = cx.run(std::future::pending::<()>()).await.unwrap_err();
        let Interrupted::DeadlineExceeded(e) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(e.budget(), Duration::from_millis(250));
        assert_eq!(e.elapsed(), Duration::from_millis(250));
        assert!(e.is_inherited());
        assert_eq!(Kind::of(&err), Kind::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_interrupts_and_drops_the_work() {
        let cx = Context::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let run = cx.run(async move {
            let _keep = tx;
            std::future::pending::<()>().await
        });
        cx.cancel();
        assert!(matches!(run.await, Err(Interrupted::Cancelled(_))));
        // the work was dropped, so its sender is gone
        assert!(rx.await.is_err());
    }

    use crate::Interrupted;
}
