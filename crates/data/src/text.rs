//! Text corpora and tokenizers.
//!
//! A corpus is every `.txt` (or `.txt.gz`) file of a folder, in name order, joined
//! with blank lines. A [`Tokenizer`] turns it into token ids: bytes (256 ids, any
//! text), the corpus's own characters, or a Hugging Face `tokenizer.json` (BPE,
//! WordPiece, …) through the `tokenizers` crate. A [`TokenWindows`] cuts the ids into
//! fixed windows for next-token training.

use std::path::{Path, PathBuf};

use crate::DataError;

/// Turns text into token ids.
pub enum Tokenizer {
    /// UTF-8 bytes: 256 ids, nothing unknown.
    Bytes,
    /// The characters of a corpus, in code-point order.
    Chars(Vec<char>),
    /// A Hugging Face tokenizer from its `tokenizer.json`.
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// The characters of `text` as a vocabulary.
    pub fn chars_of(text: &str) -> Tokenizer {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Tokenizer::Chars(chars)
    }

    /// A Hugging Face tokenizer saved as `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tokenizer, DataError> {
        if !path.is_file() {
            return Err(DataError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such tokenizer file"),
            });
        }
        tokenizers::Tokenizer::from_file(path)
            .map(|t| Tokenizer::HuggingFace(Box::new(t)))
            .map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                format: "Hugging Face tokenizer.json",
                reason: e.to_string(),
            })
    }

    /// Ids this tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Chars(chars) => chars.len(),
            Tokenizer::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    /// The ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Chars(chars) => text
                .chars()
                .map(|c| {
                    chars
                        .binary_search(&c)
                        .map(|i| i as u32)
                        .map_err(|_| DataError::Inconsistent(format!("character {c:?} is not in the vocabulary")))
                })
                .collect(),
            Tokenizer::HuggingFace(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::Inconsistent(format!("the tokenizer failed: {e}"))),
        }
    }
}

/// Every `.txt` / `.txt.gz` file in `dir`, in name order, joined by blank lines.
pub fn read_corpus(dir: &Path) -> Result<String, DataError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.ends_with(".txt") || name.ends_with(".txt.gz")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::Missing {
            dir: dir.to_path_buf(),
            name: "text files (*.txt)".into(),
            hint: " (get Shakespeare with `hetero data fetch shakespeare`)".into(),
        });
    }
    let mut text = String::new();
    for path in files {
        let raw = std::fs::read(&path).map_err(io(&path))?;
        let bytes = if crate::gzip::is_gzip(&raw) {
            crate::gzip::gunzip(&path, "UTF-8 text", &raw[..])?
        } else {
            raw
        };
        let part = String::from_utf8(bytes).map_err(|e| DataError::Format {
            path: path.clone(),
            format: "UTF-8 text",
            reason: e.to_string(),
        })?;
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(&part);
    }
    Ok(text)
}

/// Token ids cut into windows of `context + 1`: a window's first `context` ids are
/// the input, its last `context` ids the next-token targets.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenWindows {
    /// The ids.
    pub ids: Vec<u32>,
    /// Tokens per input.
    pub context: usize,
}

impl TokenWindows {
    /// Windows (non-overlapping inputs; the last id of each is the next's first).
    pub fn len(&self) -> usize {
        self.ids.len().saturating_sub(1) / self.context.max(1)
    }

    /// Whether there is no window.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Window `i`: (input, targets).
    pub fn window(&self, i: usize) -> (&[u32], &[u32]) {
        let start = i * self.context;
        (
            &self.ids[start..start + self.context],
            &self.ids[start + 1..start + 1 + self.context],
        )
    }

    /// The first `n` windows only.
    pub fn truncate(&mut self, n: usize) {
        self.ids.truncate(n * self.context + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_and_char_tokenizers() {
        let b = Tokenizer::Bytes;
        assert_eq!(b.encode("hé").unwrap(), vec![104, 195, 169]);
        let c = Tokenizer::chars_of("to be or not");
        assert_eq!(c.vocab_size(), 7);
        assert_eq!(c.encode("be").unwrap(), vec![1, 2]);
        assert!(
            c.encode("x")
                .unwrap_err()
                .to_string()
                .contains("'x' is not in the vocabulary")
        );
    }

    #[test]
    fn hugging_face_tokenizer_files_load_and_bad_ones_are_named() {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::Whitespace;
        let dir = tempfile::tempdir().unwrap();
        let vocab = [("[UNK]", 0), ("to", 1), ("be", 2), ("or", 3), ("not", 4)]
            .into_iter()
            .map(|(w, i)| (w.to_string(), i))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut t = tokenizers::Tokenizer::new(model);
        t.with_pre_tokenizer(Some(Whitespace {}));
        let path = dir.path().join("tokenizer.json");
        t.save(&path, false).unwrap();
        let loaded = Tokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.vocab_size(), 5);
        assert_eq!(
            loaded.encode("to be or not to be, maybe").unwrap(),
            vec![1, 2, 3, 4, 1, 2, 0, 0]
        );

        std::fs::write(&path, "{\"not\": \"a tokenizer\"}").unwrap();
        let err = Tokenizer::from_file(&path).err().unwrap().to_string();
        assert!(
            err.contains("tokenizer.json is not a valid Hugging Face tokenizer.json"),
            "{err}"
        );
        let err = Tokenizer::from_file(&dir.path().join("missing.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }

    #[test]
    fn corpus_and_windows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.txt"), "second").unwrap();
        std::fs::write(dir.path().join("a.txt"), "first").unwrap();
        std::fs::write(dir.path().join("notes.md"), "ignored").unwrap();
        assert_eq!(read_corpus(dir.path()).unwrap(), "first\n\nsecond");
        let empty = tempfile::tempdir().unwrap();
        assert!(
            read_corpus(empty.path())
                .unwrap_err()
                .to_string()
                .contains("hetero data fetch shakespeare")
        );

        let w = TokenWindows {
            ids: (0..10).collect(),
            context: 4,
        };
        assert_eq!(w.len(), 2);
        assert_eq!(w.window(1), (&[4, 5, 6, 7][..], &[5, 6, 7, 8][..]));
    }
}
