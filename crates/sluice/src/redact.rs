//! Keeping secrets in: the upstream keys sluice holds never leave the process.
//!
//! sluice sends each upstream its key, and an upstream may echo it back: a 401 body that says
//! `invalid key: Bearer sk-...`, a model that repeats its prompt headers. Everything an upstream
//! says reaches a client and the transcript through the relay, so the relay passes it through a
//! [`Redactor`] first:
//! - every configured upstream key is replaced wherever it occurs (chunks and error messages);
//! - in error messages, anything shaped like a credential is replaced too: the value after
//!   `Bearer` / `Basic`, an `Authorization`, `api-key` or `x-api-key` field, and OpenAI-style
//!   `sk-...` tokens, whether or not sluice knows them.
//!
//! Redaction changes only the secret's characters, so a JSON chunk stays valid JSON.

use std::borrow::Cow;
use std::sync::OnceLock;

use memchr::memmem;
use regex::Regex;

/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Secrets shorter than this are not searched for in chunks: a key of a few characters would
/// match ordinary text. (They are still redacted from error messages.)
const MIN_CHUNK_SECRET: usize = 8;

/// Replaces known secrets, and anything credential-shaped in error messages.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Vec<memmem::Finder<'static>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// Credential-shaped text: a scheme and its token, a key-ish field and its value, `sk-` tokens.
fn credential_pattern() -> Option<&'static Regex> {
    static PATTERN: OnceLock<Option<Regex>> = OnceLock::new();
    PATTERN
        .get_or_init(|| {
            Regex::new(
                r#"(?ix)
                (?P<scheme>\b(?:bearer|basic|token)\s+)[A-Za-z0-9._~+/=\-]{4,}
              | (?P<field>\b(?:authorization|x-api-key|api[-_]?key|access[-_]?token)["']?\s*[:=]\s*["']?(?:(?:bearer|basic|token)\s+)?)[^\s"',;}]{4,}
              | \bsk-[A-Za-z0-9_\-]{8,}
            "#,
            )
            .ok()
        })
        .as_ref()
}

impl Redactor {
    /// A redactor for `secrets` (empty ones are skipped).
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .map(|s| s.as_ref().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        // Longest first, so a key that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self {
            secrets: secrets
                .into_iter()
                .map(|s| memmem::Finder::new(s.as_bytes()).into_owned())
                .collect(),
        }
    }

    fn replace_known<'a>(&self, text: &'a str, min_len: usize) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for finder in &self.secrets {
            if finder.needle().len() < min_len || finder.find(out.as_bytes()).is_none() {
                continue;
            }
            let mut replaced = String::with_capacity(out.len());
            let mut rest = 0;
            for at in finder.find_iter(out.as_bytes()) {
                replaced.push_str(&out[rest..at]);
                replaced.push_str(REDACTED);
                rest = at + finder.needle().len();
            }
            replaced.push_str(&out[rest..]);
            out = Cow::Owned(replaced);
        }
        out
    }

    /// `chunk` with every known secret replaced (a chunk is model output: only exact secrets
    /// are touched, so ordinary text about "bearer tokens" stays as it is).
    pub fn chunk<'a>(&self, chunk: &'a str) -> Cow<'a, str> {
        self.replace_known(chunk, MIN_CHUNK_SECRET)
    }

    /// `message` with every known secret and anything credential-shaped replaced.
    pub fn message(&self, message: &str) -> String {
        let known = self.replace_known(message, 1);
        match credential_pattern() {
            Some(pattern) => pattern
                .replace_all(&known, |c: &regex::Captures<'_>| {
                    let keep = c
                        .name("scheme")
                        .or_else(|| c.name("field"))
                        .map_or("", |m| m.as_str());
                    format!("{keep}{REDACTED}")
                })
                .into_owned(),
            None => known.into_owned(),
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_secrets_are_replaced_everywhere() {
        let r = Redactor::new(["sk-live-0123456789", "", "short"]);
        let chunk = r#"{"choices":[{"delta":{"content":"key sk-live-0123456789 and sk-live-0123456789"}}]}"#;
        let out = r.chunk(chunk);
        assert!(!out.contains("sk-live"), "{out}");
        assert_eq!(out.matches(REDACTED).count(), 2);
        assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok());
        // Chunks without secrets are not copied; short secrets are left in chunks.
        assert!(matches!(r.chunk("a short answer"), Cow::Borrowed(_)));
        assert!(r.message("a short answer").contains(REDACTED));
    }

    #[test]
    fn credential_shaped_text_is_replaced_in_messages() {
        let r = Redactor::default();
        for (input, gone) in [
            ("invalid key: Bearer abc.def-ghi", "abc.def-ghi"),
            ("BEARER   tok_1234", "tok_1234"),
            ("got authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
            (r#"{"x-api-key": "k-1234567"}"#, "k-1234567"),
            ("api_key=abcd1234 rejected", "abcd1234"),
            ("unknown key sk-proj-ABCDEFGH12345678", "ABCDEFGH12345678"),
        ] {
            let out = r.message(input);
            assert!(!out.contains(gone), "{input:?} -> {out:?}");
            assert!(out.contains(REDACTED), "{input:?} -> {out:?}");
        }
        assert_eq!(r.message("model overloaded"), "model overloaded");
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcd", 3), "abc…");
        assert_eq!(truncate("세계", 4), "세…");
    }
}
