//! A server-sent events parser that is robust to how bytes arrive.
//!
//! Upstreams send SSE over a byte stream that may be split anywhere: inside a line, inside a
//! CRLF, inside a multi-byte UTF-8 character. The parser buffers bytes until a line is complete
//! and only then decodes it, so none of those splits matter. It follows the WHATWG rules: lines
//! end in LF, CRLF or CR; lines starting with `:` are comments (keep-alives); `data` lines of one
//! event are joined with `\n`; an empty line dispatches the event.
//!
//! Nothing an upstream sends can make the parser buffer without bound: an event whose data is
//! longer than its cap (default [`DEFAULT_MAX_EVENT`]) is an error the moment the cap is passed,
//! however it is cut into lines, and so is a single line longer than that cap (plus the room of a
//! field name).

/// The default cap on one event's data, in bytes.
pub const DEFAULT_MAX_EVENT: usize = 1 << 20;

/// Room for a field name and separator on top of the event cap, for the line cap.
const LINE_OVERHEAD: usize = 64;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
    /// The `id:` field, if any.
    pub id: Option<String>,
}

/// Why the bytes are not a valid event stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line is not UTF-8.
    #[error("a line of the event stream is not valid UTF-8")]
    InvalidUtf8,
    /// A line is longer than the event cap allows.
    #[error("a line of the event stream is longer than {limit} bytes")]
    LineTooLong {
        /// The line cap.
        limit: usize,
    },
    /// One event's data is longer than the event cap.
    #[error("an event of the event stream is larger than the limit of {limit} bytes")]
    EventTooLarge {
        /// The event cap.
        limit: usize,
    },
}

/// Incremental SSE parser: feed it bytes as they arrive, take events as they complete.
#[derive(Debug)]
pub struct SseParser {
    max_event: usize,
    line: Vec<u8>,
    /// The previous push ended in CR: a LF at the start of the next one belongs to it.
    after_cr: bool,
    started: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    id: Option<String>,
    /// Whether anything of an undispatched event (or line) has been seen.
    partial: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_max_event(DEFAULT_MAX_EVENT)
    }
}

impl SseParser {
    /// A new parser with the default event cap.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new parser that fails on an event whose data is longer than `max_event` bytes.
    pub fn with_max_event(max_event: usize) -> Self {
        Self {
            max_event,
            line: Vec::new(),
            after_cr: false,
            started: false,
            event: None,
            data: String::new(),
            has_data: false,
            id: None,
            partial: false,
        }
    }

    /// Feeds `input` in pieces cut at `cuts` (clamped, in order); returns every event. Splitting
    /// must never change the events: the tests and the fuzz target check it with this.
    pub(crate) fn push_in_pieces(
        mut self,
        input: &[u8],
        cuts: &[usize],
    ) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, input.len());
            self.push(&input[start..cut], &mut out)?;
            start = cut;
        }
        self.push(&input[start..], &mut out)?;
        Ok(out)
    }

    /// Feeds `bytes`; appends every event they complete to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        // memchr looks for the line ends a word at a time, not a byte at a time.
        while let Some(end) = memchr::memchr2(b'\n', b'\r', bytes) {
            let input = bytes;
            let terminator = bytes[end];
            bytes = &bytes[end + 1..];
            if terminator == b'\r' {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
            if self.line.is_empty() {
                // The whole line is in this read (the usual case): read where it is, without
                // copying it into the line buffer first.
                let line = &input[..end];
                self.check_line(line.len())?;
                self.process_line(line, out)?;
                continue;
            }
            self.extend_line(&input[..end])?;
            // The line's buffer is handed back and reused: no allocation per line.
            let mut line = std::mem::take(&mut self.line);
            let processed = self.process_line(&line, out);
            line.clear();
            self.line = line;
            processed?;
        }
        self.extend_line(bytes)?;
        if !self.line.is_empty() {
            self.partial = true;
        }
        Ok(())
    }

    /// Whether the bytes so far end inside an event (a stream cut here was truncated).
    pub fn in_event(&self) -> bool {
        self.partial || !self.line.is_empty()
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        self.check_line(self.line.len() + bytes.len())?;
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// Whether a line of `len` bytes is within the line cap.
    fn check_line(&self, len: usize) -> Result<(), SseError> {
        let limit = self.max_event.saturating_add(LINE_OVERHEAD);
        if len > limit {
            return Err(SseError::LineTooLong { limit });
        }
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut line = std::str::from_utf8(line).map_err(|_| SseError::InvalidUtf8)?;
        if !self.started {
            self.started = true;
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: self.event.take(),
                    data: std::mem::take(&mut self.data),
                    id: self.id.clone(),
                });
            }
            self.event = None;
            self.data.clear();
            self.has_data = false;
            self.partial = false;
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(()); // a comment: keep-alive
        }
        self.partial = true;
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                let joined = self.data.len() + usize::from(self.has_data) + value.len();
                if joined > self.max_event {
                    return Err(SseError::EventTooLarge {
                        limit: self.max_event,
                    });
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_string()),
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            _ => {} // "retry" and unknown fields are ignored, as the spec says
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_in_pieces(input: &[u8], cuts: &[usize]) -> Result<Vec<SseEvent>, SseError> {
        SseParser::new().push_in_pieces(input, cuts)
    }

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn basic_events_comments_and_fields() {
        let input = b": keep-alive\n\nid: 1\ndata: {\"a\":1}\n\nevent: error\ndata: x\ndata: y\n\n";
        let events = parse_in_pieces(input, &[]).expect("valid");
        assert_eq!(data(&events), vec!["{\"a\":1}", "x\ny"]);
        assert_eq!(events[0].id.as_deref(), Some("1"));
        assert_eq!(events[1].event.as_deref(), Some("error"));
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        let input = b"data: a\r\n\r\ndata: b\r\rdata: c\n\n";
        assert_eq!(
            data(&parse_in_pieces(input, &[]).expect("valid")),
            vec!["a", "b", "c"]
        );
        // A CRLF split across two reads is still one line ending.
        let events = parse_in_pieces(b"data: a\r\n\r\n", &[8]).expect("valid");
        assert_eq!(data(&events), vec!["a"]);
    }

    #[test]
    fn utf8_split_inside_a_character() {
        let input = "data: 세계 🙂\n\n".as_bytes();
        for cut in 0..input.len() {
            let events = parse_in_pieces(input, &[cut]).expect("valid");
            assert_eq!(data(&events), vec!["세계 🙂"]);
        }
    }

    #[test]
    fn invalid_utf8_and_overlong_lines_are_errors() {
        assert_eq!(
            parse_in_pieces(b"data: \xff\xfe\n\n", &[]),
            Err(SseError::InvalidUtf8)
        );
        let mut parser = SseParser::with_max_event(100);
        let big = vec![b'a'; 100 + LINE_OVERHEAD + 1];
        assert_eq!(
            parser.push(&big, &mut Vec::new()),
            Err(SseError::LineTooLong {
                limit: 100 + LINE_OVERHEAD
            })
        );
        // The same line whole in one read, its end included, is refused all the same.
        let mut whole = big.clone();
        whole.extend_from_slice(b"\n\n");
        assert_eq!(
            SseParser::with_max_event(100).push(&whole, &mut Vec::new()),
            Err(SseError::LineTooLong {
                limit: 100 + LINE_OVERHEAD
            })
        );
    }

    #[test]
    fn an_event_cut_into_many_small_lines_is_capped() {
        // 100 lines of 10 bytes: every line is short, the event is not.
        let mut parser = SseParser::with_max_event(500);
        let mut out = Vec::new();
        let line = b"data: 0123456789\n";
        let mut failed_at = None;
        for i in 0..100 {
            if let Err(e) = parser.push(line, &mut out) {
                assert_eq!(e, SseError::EventTooLarge { limit: 500 });
                failed_at = Some(i);
                break;
            }
        }
        // 45 lines join to 45*10 + 44 = 494 bytes; the 46th would make 505.
        assert_eq!(failed_at, Some(45));
        assert!(out.is_empty());
        assert!(parser.data.len() <= 500, "nothing is buffered past the cap");
        // Exactly at the cap is fine.
        let mut parser = SseParser::with_max_event(10);
        parser
            .push(b"data: 0123456789\n\n", &mut out)
            .expect("an event of exactly the cap");
        assert_eq!(data(&out), vec!["0123456789"]);
    }

    #[test]
    fn knows_when_it_is_inside_an_event() {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        parser.push(b"data: a\n", &mut out).expect("valid");
        assert!(parser.in_event());
        parser.push(b"\n", &mut out).expect("valid");
        assert!(!parser.in_event());
        parser.push(b": ping\n\n", &mut out).expect("valid");
        assert!(!parser.in_event());
        assert_eq!(out.len(), 1);
    }

    proptest! {
        /// However the bytes are cut, the events are the same as parsing them whole.
        #[test]
        fn splits_never_change_the_events(
            payloads in proptest::collection::vec("[a-z0-9 {}\":,세🙂]{0,12}", 1..8),
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut text = String::new();
            for (i, p) in payloads.iter().enumerate() {
                text.push_str(&format!(": ka{nl}id: {i}{nl}data: {p}{nl}{nl}"));
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let whole = parse_in_pieces(text.as_bytes(), &[]).expect("valid");
            let pieces = parse_in_pieces(text.as_bytes(), &cuts).expect("valid");
            prop_assert_eq!(&whole, &pieces);
            prop_assert_eq!(data(&whole), payloads.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        }
    }
}
