//! Ids shared between services: ingest-svc computes point ids, search-svc stores them, and both
//! must agree on the scheme.

use uuid::Uuid;

const POINT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5d0c_1f3e_8a47_4b62_9c1d_2e7f_a4b3_6c58);

/// Deterministic point id of a chunk: a retried ingest overwrites its points instead of
/// duplicating them, and a delete can name every point exactly.
pub fn point_id(document_id: &str, chunk_index: u32) -> Uuid {
    Uuid::new_v5(
        &POINT_ID_NAMESPACE,
        format!("{document_id}/{chunk_index}").as_bytes(),
    )
}
