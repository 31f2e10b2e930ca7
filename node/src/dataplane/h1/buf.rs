//! Per-worker buffer pool. A connection takes a buffer only once its socket is readable (or it
//! has bytes to write) and gives it back as soon as the bytes are consumed, so an idle
//! keep-alive or upgraded connection holds none. Each worker is a single-threaded runtime, so
//! the free list is a thread-local with no locks; its length is capped, so memory follows the
//! number of connections moving bytes at once, not the history of the worker.

use std::cell::RefCell;

/// Size of a pooled buffer: a whole TLS record, and most request heads.
pub const BUF_SIZE: usize = 16 * 1024;
/// Free buffers kept per worker (1 MiB); more are returned to the allocator.
const MAX_FREE: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A byte buffer with a read cursor: `bytes()` are filled and not yet consumed.
pub struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} of {})", self.end - self.start, self.data.len())
    }
}

impl Buf {
    /// A pooled buffer (a fresh one when the pool is empty).
    pub fn take() -> Buf {
        let data = FREE.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice());
        Buf { data, start: 0, end: 0 }
    }

    /// Unconsumed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Marks `n` bytes as consumed.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room to read into, moving unconsumed bytes to the front when the tail is full.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    /// Records `n` bytes written into `spare()`.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Appends `bytes`, growing past the pooled size when needed (large heads only).
    pub fn put(&mut self, bytes: &[u8]) {
        if self.spare().len() < bytes.len() {
            self.grow(self.len() + bytes.len());
        }
        self.data[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Makes room for at least `total` unconsumed bytes.
    pub fn grow(&mut self, total: usize) {
        if total <= self.data.len() - self.start {
            return;
        }
        let mut data = vec![0; total.max(self.data.len() * 2)].into_boxed_slice();
        data[..self.len()].copy_from_slice(self.bytes());
        self.end = self.len();
        self.start = 0;
        give_back(std::mem::replace(&mut self.data, data));
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.data));
    }
}

fn give_back(data: Box<[u8]>) {
    if data.len() != BUF_SIZE {
        return;
    }
    FREE.with(|f| {
        let mut free = f.borrow_mut();
        if free.len() < MAX_FREE {
            free.push(data);
        }
    });
}

/// Appends to a `Buf` with `write!`.
impl std::fmt::Write for Buf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.put(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Free buffers of this thread: shows a buffer went back to the pool.
    fn free_count() -> usize {
        FREE.with(|f| f.borrow().len())
    }

    #[test]
    fn buffers_go_back_to_the_pool_and_keep_their_bytes_when_grown() {
        let before = free_count();
        let mut b = Buf::take();
        b.put(b"hello ");
        b.consume(2);
        b.put(&vec![b'x'; BUF_SIZE]);
        assert_eq!(b.len(), 4 + BUF_SIZE);
        assert_eq!(&b.bytes()[..4], b"llo ");
        drop(b);
        // The pooled box came back when it was replaced; the grown one went to the allocator.
        assert_eq!(free_count(), before.max(1));
        let mut b = Buf::take();
        assert!(b.is_empty());
        b.spare()[..3].copy_from_slice(b"abc");
        b.filled(3);
        b.consume(3);
        assert!(b.is_empty());
        assert_eq!(b.spare().len(), BUF_SIZE);
    }
}
