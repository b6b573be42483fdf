//! The kernel command line: space-separated `key=value` words.

/// A parsed view over the command line string (lives in LoaderData memory,
/// which the kernel never frees).
#[derive(Clone, Copy)]
pub struct Cmdline {
    text: &'static str,
}

impl Cmdline {
    pub const EMPTY: Cmdline = Cmdline { text: "" };

    pub fn new(text: &'static str) -> Cmdline {
        Cmdline { text }
    }

    pub fn as_str(&self) -> &'static str {
        self.text
    }

    /// Every `(key, value)` pair; a word without `=` has an empty value.
    pub fn words(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        self.text
            .split(|c: char| c == ' ' || c == '\t' || c == '\n' || c == '\0')
            .filter(|w| !w.is_empty())
            .map(|w| match w.find('=') {
                Some(i) => (&w[..i], &w[i + 1..]),
                None => (w, ""),
            })
    }

    /// Value of the last `key=` word.
    pub fn get(&self, key: &str) -> Option<&'static str> {
        self.words().filter(|(k, _)| *k == key).map(|(_, v)| v).last()
    }
}
