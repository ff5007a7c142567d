//! A reader that bounds a feed's lines: none longer than [`MAX_LINE_BYTES`], none past the line cap.

use std::fmt;
use std::io::{self, Read};

use super::MAX_LINE_BYTES;

/// Fails the read when a line runs past [`MAX_LINE_BYTES`], so no line is ever held whole beyond
/// that, and when the input goes on past line `max_lines`: it hands out every byte up to the end of
/// that line first, so the lines before it are all read.
pub(super) struct LineLimit<R> {
    inner: R,
    line: u64,
    run: usize,
    max_lines: u64,
    /// Bytes past the last line were read and not handed out.
    held_back: bool,
}

/// Why [`LineLimit`] ended the read.
#[derive(Debug)]
pub(super) enum Overrun {
    LineTooLong(u64),
    TooManyLines,
}

impl fmt::Display for Overrun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Overrun::LineTooLong(line) => write!(f, "line {line} is too long"),
            Overrun::TooManyLines => f.write_str("the feed has too many lines"),
        }
    }
}

impl std::error::Error for Overrun {}

impl<R> LineLimit<R> {
    pub(super) fn new(inner: R, max_lines: u64) -> Self {
        Self { inner, line: 1, run: 0, max_lines, held_back: false }
    }
}

impl<R: Read> Read for LineLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Past the last line, any byte at all (those held back, or new ones) is a line too many.
        let n = if self.held_back { 1 } else { self.inner.read(buf)? };
        if self.line > self.max_lines && n > 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, Overrun::TooManyLines));
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            if b == b'\n' {
                self.line += 1;
                self.run = 0;
                if self.line > self.max_lines && i + 1 < n {
                    // The bytes after are past the last line read: the next read says so.
                    self.held_back = true;
                    return Ok(i + 1);
                }
            } else {
                self.run += 1;
                if self.run > MAX_LINE_BYTES {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, Overrun::LineTooLong(self.line)));
                }
            }
        }
        Ok(n)
    }
}
