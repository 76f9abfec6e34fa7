//! A one-shot, shard-local event: set once, awaited by any number of tasks of the same shard.
//! Used for "stop requested", "peer gone" and "every peer finished".
//!
//! Every connection task of a broker may await the stop event, so a waiter costs O(1) to
//! register, to re-register and to drop (a slab slot), never a scan of all waiters.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

#[derive(Debug, Default)]
struct State {
    set: Cell<bool>,
    waiters: RefCell<Waiters>,
}

/// Cloning shares the event; a `'static` wait future keeps it alive.
#[derive(Debug, Default, Clone)]
pub(crate) struct LocalEvent {
    state: Rc<State>,
}

impl LocalEvent {
    pub(crate) fn is_set(&self) -> bool {
        self.state.set.get()
    }

    /// Sets the event and wakes every waiter; later calls do nothing.
    pub(crate) fn set(&self) {
        if self.state.set.replace(true) {
            return;
        }
        let waiters = std::mem::take(&mut *self.state.waiters.borrow_mut());
        for waker in waiters.slots.into_iter().flatten() {
            waker.wake();
        }
    }

    /// Completes once the event is set; does not borrow the event.
    pub(crate) fn wait(&self) -> Wait {
        Wait {
            state: self.state.clone(),
            slot: None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Wait {
    state: Rc<State>,
    slot: Option<usize>,
}

impl Future for Wait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.set.get() {
            self.slot = None;
            return Poll::Ready(());
        }
        let state = self.state.clone();
        let mut waiters = state.waiters.borrow_mut();
        match self.slot {
            Some(slot) => match &mut waiters.slots[slot] {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                entry => *entry = Some(cx.waker().clone()),
            },
            None => {
                let waker = Some(cx.waker().clone());
                let slot = match waiters.free.pop() {
                    Some(slot) => {
                        waiters.slots[slot] = waker;
                        slot
                    }
                    None => {
                        waiters.slots.push(waker);
                        waiters.slots.len() - 1
                    }
                };
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        // After `set` the slab was emptied and slots are meaningless.
        if let Some(slot) = self.slot.take() {
            if !self.state.set.get() {
                let mut waiters = self.state.waiters.borrow_mut();
                waiters.slots[slot] = None;
                waiters.free.push(slot);
            }
        }
    }
}
