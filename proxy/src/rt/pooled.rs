//! Futures in blocks from the worker's free lists: what a session awaits for one command
//! (serving it, a login, COM_CHANGE_USER) lives in a block taken for the command and given
//! back after it, so that an idle session's task is not sized for its largest state, and
//! no command allocates once the worker has served as many at once before.
//!
//! Blocks come in size classes (powers of two); a future larger than the largest class, or
//! aligned beyond a block's alignment, gets an allocation of its own.

use std::alloc::{alloc, dealloc, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// The smallest class, as a power of two (256 bytes), and the number of classes (up to
/// 32 KiB).
const MIN_SHIFT: u32 = 8;
const CLASSES: usize = 8;
/// Every block's alignment.
const ALIGN: usize = 64;
/// Free blocks kept per class; more are given back to the allocator.
const KEEP: usize = 4096;

struct FreeLists([Vec<NonNull<u8>>; CLASSES]);

impl Drop for FreeLists {
    fn drop(&mut self) {
        for (class, list) in self.0.iter_mut().enumerate() {
            for p in list.drain(..) {
                // SAFETY: every block in list `class` was allocated with `block(class)`.
                unsafe { dealloc(p.as_ptr(), block(class)) };
            }
        }
    }
}

thread_local! {
    static FREE: RefCell<FreeLists> = RefCell::new(FreeLists(Default::default()));
}

fn block(class: usize) -> Layout {
    // The size is a power of two of at most 32 KiB and ALIGN a power of two: valid.
    Layout::from_size_align(1 << (MIN_SHIFT as usize + class), ALIGN)
        .unwrap_or_else(|_| Layout::new::<[u8; 0]>())
}

/// The class a value of `layout` fits in.
fn class_of(layout: Layout) -> Option<usize> {
    if layout.align() > ALIGN {
        return None;
    }
    let size = layout.size().max(1).next_power_of_two();
    let shift = size.trailing_zeros().max(MIN_SHIFT);
    let class = (shift - MIN_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

/// A future placed in a pooled block; see the module.
pub struct Pooled<F: Future> {
    ptr: NonNull<F>,
    /// Its class, or None for an allocation of its own.
    class: Option<usize>,
}

/// Places `future` in a block from this thread's free lists.
pub fn pooled<F: Future>(future: F) -> Pooled<F> {
    let layout = Layout::new::<F>();
    if layout.size() == 0 {
        // Nothing to store: a dangling, aligned pointer is a valid place for it.
        let ptr = NonNull::<F>::dangling();
        // SAFETY: writing a zero-sized value through an aligned dangling pointer is allowed.
        unsafe { ptr.as_ptr().write(future) };
        return Pooled { ptr, class: None };
    }
    let class = class_of(layout);
    let reused = class.and_then(|c| {
        FREE.try_with(|f| f.borrow_mut().0.get_mut(c).and_then(Vec::pop))
            .ok()
            .flatten()
    });
    let raw = match reused {
        Some(p) => p.as_ptr(),
        // SAFETY: the layout has a non-zero size.
        None => unsafe { alloc(class.map_or(layout, block)) },
    };
    let Some(block) = NonNull::new(raw) else {
        std::alloc::handle_alloc_error(class.map_or(layout, block));
    };
    let ptr = block.cast::<F>();
    // SAFETY: the block is at least `layout`'s size and alignment, and unused.
    unsafe { ptr.as_ptr().write(future) };
    Pooled { ptr, class }
}

impl<F: Future> Future for Pooled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future lives in its block, which never moves until `drop`; it is
        // reached only through this handle.
        unsafe { Pin::new_unchecked(&mut *self.ptr.as_ptr()) }.poll(cx)
    }
}

impl<F: Future> Drop for Pooled<F> {
    fn drop(&mut self) {
        let layout = Layout::new::<F>();
        // SAFETY: the future was written in `pooled` and is dropped once, here.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        if layout.size() == 0 {
            return;
        }
        let block = self.ptr.cast::<u8>();
        match self.class {
            Some(c) => {
                let kept = FREE
                    .try_with(|f| {
                        let mut f = f.borrow_mut();
                        match f.0.get_mut(c) {
                            Some(list) if list.len() < KEEP => {
                                list.push(block);
                                true
                            }
                            _ => false,
                        }
                    })
                    .unwrap_or(false);
                if !kept {
                    // SAFETY: allocated with this class's layout in `pooled`.
                    unsafe { dealloc(block.as_ptr(), self::block(c)) };
                }
            }
            // SAFETY: allocated with the future's own layout in `pooled`.
            None => unsafe { dealloc(block.as_ptr(), layout) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn ready<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        match f.as_mut().poll(&mut Context::from_waker(waker)) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("pending"),
        }
    }

    #[test]
    fn a_block_is_reused_and_the_future_dropped_once() {
        let dropped = Rc::new(());
        let first = {
            let d = dropped.clone();
            let big = [7u8; 3000];
            let f = pooled(async move {
                let _d = d;
                big.iter().map(|b| usize::from(*b)).sum::<usize>()
            });
            let at = f.ptr.cast::<u8>();
            assert_eq!(ready(f), 21_000);
            at
        };
        assert_eq!(Rc::strong_count(&dropped), 1, "the future was dropped");
        let arr = [1u8; 3000];
        let again = pooled(async move { arr.len() });
        assert_eq!(again.ptr.cast::<u8>(), first, "the same block");
        assert_eq!(ready(again), 3000);
    }

    #[test]
    fn sizes_map_to_classes_and_huge_ones_get_their_own() {
        assert_eq!(class_of(Layout::new::<[u8; 1]>()), Some(0));
        assert_eq!(class_of(Layout::new::<[u8; 256]>()), Some(0));
        assert_eq!(class_of(Layout::new::<[u8; 257]>()), Some(1));
        assert_eq!(class_of(Layout::new::<[u8; 32 * 1024]>()), Some(7));
        assert_eq!(class_of(Layout::new::<[u8; 32 * 1024 + 1]>()), None);
        let big = [3u8; 40_000];
        let huge = pooled(async move { big.len() });
        assert_eq!(huge.class, None);
        assert_eq!(ready(huge), 40_000);
        let unit = pooled(async {});
        ready(unit);
    }
}
