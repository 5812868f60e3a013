//! The WebSocket wire format: the JSON messages the server sends, and the UTF-8 carry-over that
//! keeps every `stdout`/`stderr` message a valid string.
//!
//! CodeOcean validates each frame against a strict schema (no extra keys, `start` and `timeout`
//! without `data`, `exit` always with an integer) and silently drops frames that do not match,
//! so the shapes live in one enum and nowhere else.

use serde::Serialize;

/// One server → client message (a JSON text frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum ServerMessage {
    /// Sent first, as soon as the connection is upgraded.
    Start,
    Stdout(String),
    Stderr(String),
    /// Terminal: the execution ended with this exit code.
    Exit(u8),
    /// Terminal: the time limit or the runner's inactivity timeout fired.
    Timeout,
    /// Terminal: the execution failed for a reason other than its own exit.
    Error(String),
}

impl ServerMessage {
    /// The frame's JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a ServerMessage always serializes")
    }
}

/// Turns a byte stream that may split multi-byte characters at arbitrary points into valid UTF-8
/// strings: an incomplete sequence at the end of a chunk is kept for the next one; bytes that can
/// never become valid UTF-8 turn into U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    /// At most three bytes: the start of a character whose rest has not arrived yet.
    carry: Vec<u8>,
}

impl Utf8Decoder {
    /// Decodes `chunk` after whatever was carried over; the returned string may be empty.
    pub fn decode(&mut self, chunk: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(chunk);
        let complete = complete_prefix_len(&bytes);
        self.carry = bytes.split_off(complete);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whatever is still carried, replaced by U+FFFD: the output ended inside a character.
    pub fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.carry)).into_owned()
    }
}

/// Length of `bytes` without a trailing sequence that is a valid but incomplete start of a
/// character (so that the rest may still arrive). Invalid bytes are never held back.
fn complete_prefix_len(bytes: &[u8]) -> usize {
    let mut rest = bytes;
    let mut consumed = 0;
    loop {
        match std::str::from_utf8(rest) {
            Ok(_) => return bytes.len(),
            Err(error) => match error.error_len() {
                // Invalid bytes in the middle: skip them (they become U+FFFD) and go on.
                Some(invalid) => {
                    let skip = error.valid_up_to() + invalid;
                    consumed += skip;
                    rest = &rest[skip..];
                }
                // The input ended inside a character that may still complete.
                None => return consumed + error.valid_up_to(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_exactly_the_schema_shapes() {
        assert_eq!(ServerMessage::Start.to_json(), r#"{"type":"start"}"#);
        assert_eq!(ServerMessage::Timeout.to_json(), r#"{"type":"timeout"}"#);
        assert_eq!(ServerMessage::Exit(0).to_json(), r#"{"type":"exit","data":0}"#);
        assert_eq!(ServerMessage::Exit(255).to_json(), r#"{"type":"exit","data":255}"#);
        assert_eq!(
            ServerMessage::Stdout("a\"b\n".into()).to_json(),
            r#"{"type":"stdout","data":"a\"b\n"}"#
        );
        assert_eq!(ServerMessage::Stderr("x".into()).to_json(), r#"{"type":"stderr","data":"x"}"#);
        assert_eq!(
            ServerMessage::Error("the allocation was OOM Killed".into()).to_json(),
            r#"{"type":"error","data":"the allocation was OOM Killed"}"#
        );
    }

    #[test]
    fn an_emoji_split_across_chunks_arrives_whole() {
        let emoji = "🦀".as_bytes();
        let mut decoder = Utf8Decoder::default();
        assert_eq!(decoder.decode(&[b'a', emoji[0]]), "a");
        assert_eq!(decoder.decode(&emoji[1..3]), "");
        assert_eq!(decoder.decode(&[emoji[3], b'b']), "🦀b");
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut decoder = Utf8Decoder::default();
        assert_eq!(decoder.decode(b"a\xffb\xc3("), "a\u{fffd}b\u{fffd}(");
        // A lone continuation byte can never complete: replaced at once, not carried.
        assert_eq!(decoder.decode(b"\x80"), "\u{fffd}");
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn an_unfinished_character_at_the_end_is_flushed_as_replacement() {
        let mut decoder = Utf8Decoder::default();
        assert_eq!(decoder.decode("x€".as_bytes().split_last().unwrap().1), "x");
        assert_eq!(decoder.finish(), "\u{fffd}");
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn invalid_bytes_before_an_incomplete_tail_do_not_hide_it() {
        let euro = "€".as_bytes();
        let mut decoder = Utf8Decoder::default();
        assert_eq!(decoder.decode(&[0xff, euro[0], euro[1]]), "\u{fffd}");
        assert_eq!(decoder.decode(&euro[2..]), "€");
    }
}
