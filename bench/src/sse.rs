//! An incremental `text/event-stream` parser: feed body chunks, get back each event's data.

/// Incremental SSE parser that yields the `data` payload of every complete event.
///
/// Only `data:` fields matter to an MCP client reading POST responses; `id:`, `event:`,
/// `retry:` and comment lines are skipped. Events with empty data (such as priming events)
/// are not yielded.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Creates an empty parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk of the body and calls `on_event` with each completed event's data.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(&str)) {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let mut line = &self.buf[start..end];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            if line.is_empty() {
                if self.has_data && !self.data.is_empty() {
                    on_event(&self.data);
                }
                self.data.clear();
                self.has_data = false;
            } else if let Some(value) = line.strip_prefix(b"data") {
                let value = match value {
                    [b':', b' ', rest @ ..] => rest,
                    [b':', rest @ ..] => rest,
                    [] => &[][..],
                    _ => {
                        // A field merely starting with "data" (such as "datax") is unknown.
                        start = end + 1;
                        continue;
                    }
                };
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
                self.has_data = true;
            }
            start = end + 1;
        }
        self.buf.drain(..start);
    }

    /// Ends the stream, dispatching a final event that lacked its terminating blank line.
    pub fn finish(&mut self, mut on_event: impl FnMut(&str)) {
        if !self.buf.is_empty() {
            self.feed(b"\n", |_| {});
        }
        if self.has_data && !self.data.is_empty() {
            on_event(&self.data);
        }
        self.data.clear();
        self.has_data = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(chunks: &[&str]) -> Vec<String> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk.as_bytes(), |d| out.push(d.to_owned()));
        }
        parser.finish(|d| out.push(d.to_owned()));
        out
    }

    #[test]
    fn skips_priming_and_joins_split_chunks() {
        let events = collect(&[
            "id: 0\nretry: 3000\ndata: \n\n",
            "event: message\nid: 1\nda",
            "ta: {\"a\":1}\r\n\r\n",
        ]);
        assert_eq!(events, vec!["{\"a\":1}".to_owned()]);
    }

    #[test]
    fn multi_line_data_and_unterminated_final_event() {
        let events = collect(&[": comment\ndata:x\ndata: y\n\ndata: z"]);
        assert_eq!(events, vec!["x\ny".to_owned(), "z".to_owned()]);
    }
}
