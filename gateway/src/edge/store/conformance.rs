//! The behaviour every [`EdgeStore`] must have. `edge_store_conformance!(make())` turns each
//! case into a `#[tokio::test]`, where `make()` returns `(guard, store)`: the guard keeps
//! whatever backs the store (a temp dir, a server) alive for the test.

use std::time::{Duration, SystemTime};

use super::{AuditFilter, AuditRecord, EdgeStore, KeyRecord, Role};
use crate::error::Error;

/// Expands to one test per conformance case.
#[macro_export]
macro_rules! edge_store_conformance {
    ($make:expr) => {
        $crate::edge_store_conformance!(@cases $make;
            tenants_are_unique_and_listed_in_pages,
            keys_round_trip_and_list_newest_first,
            revocation_is_kept_and_idempotent,
            audit_filters_pages_and_trims,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (_guard, store) = $make;
                $crate::edge::store::conformance::$case(&store).await;
            }
        )*
    };
}

fn key(id: &str, tenant: &str, role: Role, created: SystemTime) -> KeyRecord {
    KeyRecord {
        id: id.to_owned(),
        hash: vec![7; 32],
        tenant: tenant.to_owned(),
        role,
        label: format!("label of {id}"),
        create_time: created,
        expire_time: None,
        revoke_time: None,
    }
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

pub(crate) async fn tenants_are_unique_and_listed_in_pages(store: &dyn EdgeStore) {
    for name in ["delta", "alpha", "charlie", "bravo", "echo"] {
        let t = store.create_tenant(name, at(1)).await.unwrap();
        assert_eq!(t.name, name);
        assert_eq!(t.create_time, at(1));
    }
    assert!(matches!(
        store.create_tenant("alpha", at(2)).await,
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(
        store
            .get_tenant("alpha")
            .await
            .unwrap()
            .unwrap()
            .create_time,
        at(1),
        "a refused create changes nothing"
    );
    assert!(store.get_tenant("zulu").await.unwrap().is_none());
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = store.list_tenants(&token, 2).await.unwrap();
        assert!(page.items.len() <= 2);
        names.extend(page.items.into_iter().map(|t| t.name));
        if page.next.is_empty() {
            break;
        }
        token = page.next;
    }
    assert_eq!(names, ["alpha", "bravo", "charlie", "delta", "echo"]);
}

pub(crate) async fn keys_round_trip_and_list_newest_first(store: &dyn EdgeStore) {
    store.create_tenant("acme", at(0)).await.unwrap();
    store.create_tenant("globex", at(0)).await.unwrap();
    let mut first = key("00000000000000a1", "acme", Role::Reader, at(10));
    first.expire_time = Some(at(1000));
    store.insert_key(&first).await.unwrap();
    // Two keys in the same millisecond: the id breaks the tie.
    store
        .insert_key(&key("00000000000000b2", "globex", Role::Writer, at(20)))
        .await
        .unwrap();
    store
        .insert_key(&key("00000000000000c3", "acme", Role::Admin, at(20)))
        .await
        .unwrap();
    store
        .insert_key(&key("00000000000000d4", "acme", Role::Writer, at(30)))
        .await
        .unwrap();
    assert!(matches!(
        store.insert_key(&first).await,
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(
        store.get_key("00000000000000a1").await.unwrap(),
        Some(first)
    );
    assert!(store.get_key("ffffffffffffffff").await.unwrap().is_none());

    let list = |tenant: Option<&'static str>| async move {
        let mut ids = Vec::new();
        let mut token = String::new();
        loop {
            let page = store.list_keys(tenant, &token, 1).await.unwrap();
            ids.extend(page.items.into_iter().map(|k| k.id));
            if page.next.is_empty() {
                return ids;
            }
            token = page.next;
        }
    };
    assert_eq!(
        list(None).await,
        [
            "00000000000000d4",
            "00000000000000c3",
            "00000000000000b2",
            "00000000000000a1"
        ]
    );
    assert_eq!(
        list(Some("acme")).await,
        ["00000000000000d4", "00000000000000c3", "00000000000000a1"]
    );
    assert!(list(Some("nobody")).await.is_empty());
    assert!(matches!(
        store.list_keys(None, "garbage", 10).await,
        Err(Error::InvalidArgument { .. })
    ));
}

pub(crate) async fn revocation_is_kept_and_idempotent(store: &dyn EdgeStore) {
    store.create_tenant("acme", at(0)).await.unwrap();
    store
        .insert_key(&key("00000000000000e5", "acme", Role::Writer, at(1)))
        .await
        .unwrap();
    let revoked = store
        .revoke_key("00000000000000e5", at(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.revoke_time, Some(at(5)));
    let again = store
        .revoke_key("00000000000000e5", at(9))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again.revoke_time,
        Some(at(5)),
        "the first revocation counts"
    );
    assert_eq!(
        store
            .get_key("00000000000000e5")
            .await
            .unwrap()
            .unwrap()
            .revoke_time,
        Some(at(5))
    );
    assert!(
        store
            .revoke_key("ffffffffffffffff", at(5))
            .await
            .unwrap()
            .is_none()
    );
}

pub(crate) async fn audit_filters_pages_and_trims(store: &dyn EdgeStore) {
    let event = |i: u64, action: &str, tenant: &str| AuditRecord {
        time: Some(at(i)),
        action: action.to_owned(),
        outcome: "ok".to_owned(),
        key_id: format!("key{}", i % 2),
        tenant: tenant.to_owned(),
        peer: "127.0.0.1:1".to_owned(),
        method: "/smartdb.v1.AdminService/CreateApiKey".to_owned(),
        detail: format!("event {i}"),
    };
    let events: Vec<_> = (0..10)
        .map(|i| {
            event(
                i,
                if i % 3 == 0 {
                    "auth.failed"
                } else {
                    "admin.call"
                },
                if i < 5 { "acme" } else { "globex" },
            )
        })
        .collect();
    store.append_audit(&events[..4]).await.unwrap();
    store.append_audit(&events[4..]).await.unwrap();

    let all = |filter: AuditFilter| async move {
        let mut details = Vec::new();
        let mut token = String::new();
        loop {
            let page = store.list_audit(&filter, &token, 3).await.unwrap();
            details.extend(page.items.into_iter().map(|e| e.detail));
            if page.next.is_empty() {
                return details;
            }
            token = page.next;
        }
    };
    let newest_first: Vec<String> = (0..10).rev().map(|i| format!("event {i}")).collect();
    assert_eq!(all(AuditFilter::default()).await, newest_first);
    assert_eq!(
        all(AuditFilter {
            action: Some("auth.failed".into()),
            ..Default::default()
        })
        .await,
        ["event 9", "event 6", "event 3", "event 0"]
    );
    assert_eq!(
        all(AuditFilter {
            tenant: Some("acme".into()),
            key_id: Some("key1".into()),
            ..Default::default()
        })
        .await,
        ["event 3", "event 1"]
    );
    assert_eq!(
        all(AuditFilter {
            since: Some(at(8)),
            ..Default::default()
        })
        .await,
        ["event 9", "event 8"]
    );
    let page = store
        .list_audit(&AuditFilter::default(), "", 1)
        .await
        .unwrap();
    assert_eq!(page.items[0], events[9], "every field round-trips");

    // Older than event 2 goes by age; then only the newest 5 are kept.
    assert_eq!(store.trim_audit(at(2), 100).await.unwrap(), 2);
    assert_eq!(store.trim_audit(at(0), 5).await.unwrap(), 3);
    assert_eq!(all(AuditFilter::default()).await, &newest_first[..5]);
}
