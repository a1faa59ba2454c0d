//! Who may call what: the role each public RPC needs and the rate-limit class it counts
//! against. A method missing here is refused, so a new RPC is closed until it is listed (a
//! unit test checks the table against the protos).

use super::store::Role;

/// Rate-limit class of an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Searches, gets and lists.
    Search,
    /// Writes: knowledge bases and documents.
    Ingest,
    /// AdminService.
    Admin,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 3] = [Class::Search, Class::Ingest, Class::Admin];

    /// Name used in configuration, metrics and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Search => "search",
            Class::Ingest => "ingest",
            Class::Admin => "admin",
        }
    }
}

/// What one RPC needs.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Full gRPC path, e.g. `/smartdb.v1.SearchService/Search`.
    pub path: &'static str,
    /// Weakest role allowed.
    pub role: Role,
    /// Rate-limit class.
    pub class: Class,
    /// Audit action recorded when called (with its outcome), if audited.
    pub audit: Option<&'static str>,
}

const fn p(path: &'static str, role: Role, class: Class, audit: Option<&'static str>) -> Policy {
    Policy {
        path,
        role,
        class,
        audit,
    }
}

const ADMIN_CALL: Option<&str> = Some("admin.call");

/// Every public RPC.
pub const POLICIES: &[Policy] = &[
    p(
        "/smartdb.v1.KnowledgeBaseService/CreateKnowledgeBase",
        Role::Writer,
        Class::Ingest,
        None,
    ),
    p(
        "/smartdb.v1.KnowledgeBaseService/GetKnowledgeBase",
        Role::Reader,
        Class::Search,
        None,
    ),
    p(
        "/smartdb.v1.KnowledgeBaseService/ListKnowledgeBases",
        Role::Reader,
        Class::Search,
        None,
    ),
    p(
        "/smartdb.v1.KnowledgeBaseService/DeleteKnowledgeBase",
        Role::Writer,
        Class::Ingest,
        Some("knowledge_base.deleted"),
    ),
    p(
        "/smartdb.v1.KnowledgeBaseService/ReindexKnowledgeBase",
        Role::Admin,
        Class::Ingest,
        Some("knowledge_base.reindexed"),
    ),
    p(
        "/smartdb.v1.DocumentService/UploadDocument",
        Role::Writer,
        Class::Ingest,
        None,
    ),
    p(
        "/smartdb.v1.DocumentService/IngestText",
        Role::Writer,
        Class::Ingest,
        None,
    ),
    p(
        "/smartdb.v1.DocumentService/GetDocument",
        Role::Reader,
        Class::Search,
        None,
    ),
    p(
        "/smartdb.v1.DocumentService/ListDocuments",
        Role::Reader,
        Class::Search,
        None,
    ),
    p(
        "/smartdb.v1.DocumentService/DeleteDocument",
        Role::Writer,
        Class::Ingest,
        Some("document.deleted"),
    ),
    p(
        "/smartdb.v1.DocumentService/RetryDocument",
        Role::Writer,
        Class::Ingest,
        None,
    ),
    p(
        "/smartdb.v1.SearchService/Search",
        Role::Reader,
        Class::Search,
        None,
    ),
    p(
        "/smartdb.v1.AdminService/GetClusterStatus",
        Role::Admin,
        Class::Admin,
        ADMIN_CALL,
    ),
    p(
        "/smartdb.v1.AdminService/GetMetrics",
        Role::Admin,
        Class::Admin,
        ADMIN_CALL,
    ),
    p(
        "/smartdb.v1.AdminService/CreateTenant",
        Role::Admin,
        Class::Admin,
        Some("tenant.created"),
    ),
    p(
        "/smartdb.v1.AdminService/ListTenants",
        Role::Admin,
        Class::Admin,
        ADMIN_CALL,
    ),
    p(
        "/smartdb.v1.AdminService/CreateApiKey",
        Role::Admin,
        Class::Admin,
        Some("key.created"),
    ),
    p(
        "/smartdb.v1.AdminService/ListApiKeys",
        Role::Admin,
        Class::Admin,
        ADMIN_CALL,
    ),
    p(
        "/smartdb.v1.AdminService/RevokeApiKey",
        Role::Admin,
        Class::Admin,
        Some("key.revoked"),
    ),
    p(
        "/smartdb.v1.AdminService/ListAuditEvents",
        Role::Admin,
        Class::Admin,
        ADMIN_CALL,
    ),
];

/// The policy of the RPC at `path`, if it is public.
pub fn of(path: &str) -> Option<&'static Policy> {
    POLICIES.iter().find(|p| p.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every method of every public service in the protos has a policy, and nothing else does.
    #[test]
    fn every_public_rpc_has_a_policy() {
        let set = prost_types::FileDescriptorSet::decode(smartdb_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let public = [
            smartdb_proto::names::KNOWLEDGE_BASE,
            smartdb_proto::names::DOCUMENT,
            smartdb_proto::names::SEARCH,
            smartdb_proto::names::ADMIN,
        ];
        let mut paths = Vec::new();
        for file in &set.file {
            for service in &file.service {
                let full = format!("{}.{}", file.package(), service.name());
                if public.contains(&full.as_str()) {
                    for method in &service.method {
                        paths.push(format!("/{full}/{}", method.name()));
                    }
                }
            }
        }
        paths.sort();
        let mut listed: Vec<String> = POLICIES.iter().map(|p| p.path.to_owned()).collect();
        listed.sort();
        assert_eq!(paths, listed);
    }

    #[test]
    fn readers_only_read_and_admin_needs_admin() {
        for policy in POLICIES {
            if policy.role == Role::Reader {
                assert_eq!(policy.class, Class::Search, "{}", policy.path);
            }
            if policy.class == Class::Admin {
                assert_eq!(policy.role, Role::Admin, "{}", policy.path);
            }
        }
        assert!(of("/smartdb.v1.IndexService/Upsert").is_none());
    }
}
