//! The alert conditions of `deploy/prometheus/smartdb-rules.yaml`, evaluated in the gateway
//! for clusters without Prometheus, and shown by `GetClusterStatus`. Same names, severities and
//! thresholds; a condition over a window is judged on the last 5 minutes and fires as soon as
//! it holds (no `for` delay: there is no alert state to keep between calls).

use smartdb_proto::v1 as pb;

use crate::cluster_metrics::{Snapshot, Window};

/// Share of a service's calls failing on its side above which it alerts.
pub const ERROR_RATIO: f64 = 0.05;
/// Calls per second below which the error ratio means too little to alert on.
pub const MIN_REQUEST_RATE: f64 = 0.1;
/// p99 latency target of quick calls, in seconds.
pub const LATENCY_P99: f64 = 1.0;
/// Methods that take as long as their input (or never end): no latency target.
const SLOW_METHODS: &[&str] = &["UploadDocument", "IngestText", "Watch"];
/// Age of the oldest waiting ingest job above which it alerts, in seconds.
pub const BACKLOG_AGE: f64 = 600.0;
/// Share of the memory limit above which it alerts.
pub const MEMORY_RATIO: f64 = 0.9;

/// What the alerts look at.
pub struct Inputs<'a> {
    /// Health of every replica, as `GetClusterStatus` checked it just now.
    pub services: &'a [pb::ServiceStatus],
    /// Every replica's metrics, read just now.
    pub now: &'a Snapshot,
    /// The last 5 minutes.
    pub recent: &'a Window,
    /// The hour before those 5 minutes, if the gateway has readings that old.
    pub hour_before: Option<&'a Window>,
}

fn alert(name: &str, severity: &str, service: &str, summary: String) -> pb::Alert {
    pb::Alert {
        name: name.to_owned(),
        severity: severity.to_owned(),
        service: service.to_owned(),
        summary,
    }
}

/// The alerts that fire, most severe first.
pub fn evaluate(inputs: &Inputs<'_>) -> Vec<pb::Alert> {
    let mut alerts = Vec::new();
    for s in inputs.services {
        if s.health == pb::ServiceHealth::Unreachable as i32 {
            alerts.push(alert(
                "SmartdbServiceDown",
                "critical",
                &s.name,
                format!("{} is down ({}): {}", s.name, s.address, s.detail),
            ));
        } else if s.health == pb::ServiceHealth::NotServing as i32 {
            alerts.push(alert(
                "SmartdbServiceUnhealthy",
                "critical",
                &s.name,
                format!("{} at {} is not ready", s.name, s.address),
            ));
        }
    }
    let recent = inputs.recent;
    let mut services: Vec<&str> = recent.rpcs.keys().map(|(s, _, _)| s.as_str()).collect();
    services.dedup();
    for service in services {
        let (errors, requests) = recent
            .rpcs
            .iter()
            .filter(|((s, _, _), _)| s == service)
            .fold((0.0, 0.0), |(e, r), (_, c)| (e + c.errors, r + c.requests));
        let ratio = errors / requests.max(1.0);
        if ratio > ERROR_RATIO && recent.request_rate(service) > MIN_REQUEST_RATE {
            alerts.push(alert(
                "SmartdbHighErrorRate",
                "critical",
                service,
                format!(
                    "{service}: {:.1} % of calls failed on its side in the last 5 minutes ({errors} of {requests})",
                    ratio * 100.0
                ),
            ));
        }
    }
    for ((service, grpc, method), counts) in &recent.rpcs {
        if counts.requests == 0.0 || SLOW_METHODS.contains(&method.as_str()) {
            continue;
        }
        let p99 = counts.quantile(0.99);
        if p99 > LATENCY_P99 {
            alerts.push(alert(
                "SmartdbLatencyHigh",
                "warning",
                service,
                format!("{service}: p99 of {grpc}/{method} is {p99:.2} s, above its 1 s target"),
            ));
        }
    }
    for ((service, cache, level), (hits, lookups)) in &recent.caches {
        // The search cache is judged on whole lookups, the embedding cache per level (as the
        // rules do).
        let name = match (cache.as_str(), level.as_str()) {
            ("search results", "any") => "SmartdbSearchCacheMissSpike",
            ("embeddings", _) => "SmartdbEmbedCacheMissSpike",
            _ => continue,
        };
        let miss = 1.0 - hits / lookups.max(1.0);
        let before = inputs.hour_before.and_then(|w| {
            let (hits, lookups) = w
                .caches
                .get(&(service.clone(), cache.clone(), level.clone()))?;
            (*lookups > 0.0).then(|| 1.0 - hits / lookups)
        });
        let rate = lookups / recent.seconds.max(1.0);
        if let Some(before) = before
            && miss > 0.5
            && miss > 2.0 * before
            && rate > 1.0
        {
            alerts.push(alert(
                name,
                "warning",
                service,
                format!(
                    "{service}: {:.0} % of {cache} lookups ({level}) miss, against {:.0} % in the hour before",
                    miss * 100.0,
                    before * 100.0
                ),
            ));
        }
    }
    for ((service, addr), reading) in &inputs.now.replicas {
        if let Some(&(_, age)) = reading.queues.get("ingest jobs")
            && age > BACKLOG_AGE
        {
            alerts.push(alert(
                "SmartdbIngestBacklogOld",
                "warning",
                service,
                format!("{service} ({addr}): the oldest waiting document has waited {age:.0} s"),
            ));
        }
        for (guarded, state) in &reading.breakers {
            let state = if *state >= 1.0 { "open" } else { "half-open" };
            alerts.push(alert(
                "SmartdbCircuitBreakerOpen",
                "warning",
                service,
                format!("{service} ({addr}): breaker to {guarded} is {state}"),
            ));
        }
        for model in &reading.model_breakers {
            alerts.push(alert(
                "SmartdbRemoteModelBreakerOpen",
                "warning",
                service,
                format!("{service} ({addr}): the endpoint of model {model} is failing"),
            ));
        }
        if let (Some(used), Some(limit)) = reading.memory
            && limit > 0.0
            && used / limit > MEMORY_RATIO
        {
            alerts.push(alert(
                "SmartdbMemoryNearLimit",
                "warning",
                service,
                format!(
                    "{service} ({addr}) uses {:.0} % of its memory limit",
                    used / limit * 100.0
                ),
            ));
        }
    }
    alerts.sort_by(|a, b| {
        (a.severity != "critical", &a.name, &a.service, &a.summary).cmp(&(
            b.severity != "critical",
            &b.name,
            &b.service,
            &b.summary,
        ))
    });
    alerts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_metrics::{Reading, RpcCounts};
    use std::collections::HashMap;

    fn status(name: &str, health: pb::ServiceHealth) -> pb::ServiceStatus {
        pb::ServiceStatus {
            name: name.into(),
            address: "127.0.0.1:1".into(),
            health: health as i32,
            detail: "connection refused".into(),
            latency_ms: 0,
        }
    }

    fn names(alerts: &[pb::Alert]) -> Vec<(&str, &str)> {
        alerts
            .iter()
            .map(|a| (a.name.as_str(), a.service.as_str()))
            .collect()
    }

    #[test]
    fn a_quiet_healthy_cluster_has_no_alerts() {
        let services = [status("search-svc", pb::ServiceHealth::Serving)];
        let alerts = evaluate(&Inputs {
            services: &services,
            now: &Snapshot::default(),
            recent: &Window::default(),
            hour_before: None,
        });
        assert!(alerts.is_empty(), "{alerts:?}");
    }

    #[test]
    fn each_condition_fires_past_its_threshold_only() {
        let services = [
            status("search-svc", pb::ServiceHealth::Unreachable),
            status("ingest-svc", pb::ServiceHealth::NotServing),
            status("embed-svc", pb::ServiceHealth::Serving),
        ];
        let mut recent = Window {
            seconds: 300.0,
            ..Window::default()
        };
        let calls = |requests: f64, errors: f64, slow: f64| RpcCounts {
            requests,
            errors,
            rejected: 0.0,
            buckets: vec![
                (0.01, requests - slow),
                (2.5, requests),
                (f64::INFINITY, requests),
            ],
        };
        let key = |s: &str, m: &str| (s.to_owned(), "smartdb.v1.X".to_owned(), m.to_owned());
        // 6 % failing at 1 call/s: fires. 4 %: does not. 6 % at 0.05 calls/s: does not.
        recent
            .rpcs
            .insert(key("gateway", "Search"), calls(300.0, 18.0, 0.0));
        recent
            .rpcs
            .insert(key("search-svc", "Search"), calls(300.0, 12.0, 0.0));
        recent
            .rpcs
            .insert(key("ingest-svc", "GetDocument"), calls(15.0, 1.0, 0.0));
        // p99 in the 2.5 s bucket: fires, but not for IngestText.
        recent
            .rpcs
            .insert(key("embed-svc", "Embed"), calls(100.0, 0.0, 5.0));
        recent
            .rpcs
            .insert(key("ingest-svc", "IngestText"), calls(100.0, 0.0, 5.0));
        // Search misses: 80 % now against 20 % before, at 2 lookups/s.
        let any = (
            "search-svc".to_owned(),
            "search results".to_owned(),
            "any".to_owned(),
        );
        recent.caches.insert(any.clone(), (120.0, 600.0));
        let mut hour_before = Window {
            seconds: 3600.0,
            ..Window::default()
        };
        hour_before.caches.insert(any, (800.0, 1000.0));
        let mut reading = Reading::parse(
            "# TYPE ingest_job_backlog_age_seconds gauge\ningest_job_backlog_age_seconds 601\n\
             # TYPE client_breaker_open gauge\nclient_breaker_open{downstream=\"embed-svc\",endpoint=\"e\"} 0.5\n",
        );
        reading.memory = (Some(95.0), Some(100.0));
        let calm = Reading {
            memory: (Some(50.0), Some(100.0)),
            ..Reading::default()
        };
        let now = Snapshot {
            replicas: HashMap::from([
                (("ingest-svc".to_owned(), "a".to_owned()), reading),
                (("search-svc".to_owned(), "b".to_owned()), calm),
            ]),
            ..Snapshot::default()
        };
        let alerts = evaluate(&Inputs {
            services: &services,
            now: &now,
            recent: &recent,
            hour_before: Some(&hour_before),
        });
        assert_eq!(
            names(&alerts),
            vec![
                ("SmartdbHighErrorRate", "gateway"),
                ("SmartdbServiceDown", "search-svc"),
                ("SmartdbServiceUnhealthy", "ingest-svc"),
                ("SmartdbCircuitBreakerOpen", "ingest-svc"),
                ("SmartdbIngestBacklogOld", "ingest-svc"),
                ("SmartdbLatencyHigh", "embed-svc"),
                ("SmartdbMemoryNearLimit", "ingest-svc"),
                ("SmartdbSearchCacheMissSpike", "search-svc"),
            ]
        );
        assert!(alerts[0].summary.contains("6.0 %"), "{:?}", alerts[0]);
        // Without the hour before, a miss ratio alone says nothing.
        let alerts = evaluate(&Inputs {
            services: &[],
            now: &Snapshot::default(),
            recent: &recent,
            hour_before: None,
        });
        assert!(!names(&alerts).contains(&("SmartdbSearchCacheMissSpike", "search-svc")));
    }
}
