//! Descriptor bookkeeping for messages that carry [`FdIndex`]es.

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::messages::FdIndex;

/// Sender side: collects the descriptors to attach and hands out their indexes.
#[derive(Default)]
pub struct FdList<'a> {
    fds: Vec<BorrowedFd<'a>>,
}

impl<'a> FdList<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, fd: BorrowedFd<'a>) -> FdIndex {
        self.fds.push(fd);
        FdIndex((self.fds.len() - 1) as u32)
    }

    pub fn as_slice(&self) -> &[BorrowedFd<'a>] {
        &self.fds
    }
}

/// Receiver side: the descriptors that came with a message, each taken at most once.
pub struct ReceivedFds {
    fds: Vec<Option<OwnedFd>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdError {
    #[error("the message names file descriptor #{index} but only {count} came with it")]
    OutOfRange { index: u32, count: usize },
    #[error("file descriptor #{index} is named twice in the message")]
    Reused { index: u32 },
}

impl ReceivedFds {
    pub fn new(fds: Vec<OwnedFd>) -> Self {
        Self { fds: fds.into_iter().map(Some).collect() }
    }

    pub fn take(&mut self, index: FdIndex) -> Result<OwnedFd, FdError> {
        let count = self.fds.len();
        let slot = self.fds.get_mut(index.0 as usize).ok_or(FdError::OutOfRange { index: index.0, count })?;
        slot.take().ok_or(FdError::Reused { index: index.0 })
    }

    /// Descriptors nobody took (a child may warn about them; they are closed when dropped).
    pub fn unused(&self) -> usize {
        self.fds.iter().filter(|f| f.is_some()).count()
    }
}
