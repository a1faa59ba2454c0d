//! smartdb's gRPC contracts (`smartdb.v1`): message types, client stubs and server traits,
//! generated at build time from `proto/smartdb/v1/*.proto`.

/// Package `smartdb.v1`: the public and internal services.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("smartdb.v1");
}

/// Encoded `FileDescriptorSet` of every smartdb proto file, for `grpc.reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/smartdb_descriptor.bin"));

/// Fully-qualified gRPC service names, as used by health checks and reflection.
pub mod names {
    /// `smartdb.v1.KnowledgeBaseService`.
    pub const KNOWLEDGE_BASE: &str = "smartdb.v1.KnowledgeBaseService";
    /// `smartdb.v1.DocumentService`.
    pub const DOCUMENT: &str = "smartdb.v1.DocumentService";
    /// `smartdb.v1.SearchService`.
    pub const SEARCH: &str = "smartdb.v1.SearchService";
    /// `smartdb.v1.AdminService`.
    pub const ADMIN: &str = "smartdb.v1.AdminService";
    /// `smartdb.v1.EmbedService`.
    pub const EMBED: &str = "smartdb.v1.EmbedService";
    /// `smartdb.v1.IndexService`.
    pub const INDEX: &str = "smartdb.v1.IndexService";
    /// `smartdb.v1.TelemetryService`.
    pub const TELEMETRY: &str = "smartdb.v1.TelemetryService";
}
