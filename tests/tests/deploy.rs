//! deploy/ against the real binaries: the metric names the alert rules and the dashboard use are
//! ones the services export, the Kubernetes probes ask for health services the binaries serve,
//! and the compose file, the manifests and the Dockerfile only use flags, environment variables
//! and ports that `smartdb serve <service>` accepts. (Rendering and schema validation of the
//! manifests and the promtool rule tests are in deploy/check.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{Cluster, create_kb, health, http_get, ingest_text, search, smartdb_bin};
use serde_yaml_ng::Value;
use tonic_health::pb::health_check_response::ServingStatus;

/// The services `smartdb serve` runs, with the name `smartdb up` gives each in cluster.json.
const SERVICES: [(&str, &str); 4] = [
    ("gateway", "gateway"),
    ("search", "search-svc"),
    ("ingest", "ingest-svc"),
    ("embed", "embed-svc"),
];

/// Variables a service reads itself rather than through a flag (so `--help` does not list
/// them), with the source file that reads each: the test checks that it really does.
const DIRECT_ENV: [(&str, &str); 6] = [
    ("SMARTDB_LOG", "kit/src/telemetry.rs"),
    ("SMARTDB_DATA_DIR", "kit/src/config.rs"),
    ("HF_TOKEN", "embed-svc/src/model/fetch.rs"),
    ("HF_HUB_OFFLINE", "embed-svc/src/model/fetch.rs"),
    ("HF_ENDPOINT", "embed-svc/src/model/fetch.rs"),
    ("SMARTDB_PYPI_URL", "embed-svc/src/model/fetch.rs"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Every YAML document in `text`.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_of<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn seq(value: Option<&Value>) -> &[Value] {
    value
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// What `smartdb serve <service> --help` accepts: long flags and environment variables.
#[derive(Debug, Default)]
struct Accepted {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

impl Accepted {
    fn env_ok(&self, name: &str) -> bool {
        self.env.contains(name) || DIRECT_ENV.iter().any(|(n, _)| *n == name)
    }
}

fn accepted(service: &str) -> &'static Accepted {
    static ALL: OnceLock<BTreeMap<String, Accepted>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        SERVICES
            .iter()
            .map(|(name, _)| {
                let output = std::process::Command::new(smartdb_bin())
                    .args(["serve", name, "--help"])
                    .output()
                    .expect("run smartdb serve --help");
                assert!(
                    output.status.success(),
                    "smartdb serve {name} --help failed"
                );
                let help = String::from_utf8(output.stdout).expect("utf-8 help");
                let mut accepted = Accepted::default();
                for piece in help.split("[env: ").skip(1) {
                    let end = piece.find(['=', ']']).unwrap_or(piece.len());
                    accepted.env.insert(piece[..end].to_owned());
                }
                for piece in help.split("--").skip(1) {
                    let flag: String = piece
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    if !flag.is_empty() {
                        accepted.flags.insert(flag);
                    }
                }
                assert!(
                    accepted.env.contains("SMARTDB_LISTEN") && accepted.flags.contains("listen"),
                    "unexpected --help of {name}:\n{help}"
                );
                (name.to_string(), accepted)
            })
            .collect()
    });
    all.get(service)
        .unwrap_or_else(|| panic!("{service:?} is not a service of `smartdb serve`"))
}

/// The port of an address such as `0.0.0.0:50052` or `smartdb-embed:50054`.
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

// ---------------------------------------------------------------------------------------------
// Metric names in PromQL

const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "inf",
    "nan",
];

/// Metric names (and recorded series) a PromQL expression reads: identifiers outside label
/// matchers, ranges and strings that are neither functions nor keywords. Grafana's
/// `label_values(<selector>, <label>)` counts its selector only.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let expr = match expr.trim().strip_prefix("label_values(") {
        Some(inner) => inner.rsplit_once(',').map(|(s, _)| s).unwrap_or(inner),
        None => expr,
    };
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening bracket to its closing one, over quoted strings.
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        let mut quote = None;
        while i < chars.len() {
            let c = chars[i];
            match quote {
                Some(_) if c == '\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == open => depth += 1,
                None if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                None => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers and durations (5m, 1e3, 0.99).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let ident: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let grouping = matches!(
                ident.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            );
            if chars.get(next) == Some(&'(') {
                if grouping {
                    // A label list, not a call.
                    i = skip_group(next, '(', ')');
                }
            } else if !PROMQL_KEYWORDS.contains(&ident.as_str()) {
                names.insert(ident);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_names_are_found() {
    let names = metric_names(
        r#"sum by (job, le) (rate(a_bucket{x="}", y=~"b|c"}[5m])) / on (job) group_left b offset 1h > bool 2
           and histogram_quantile(0.99, sum without(le) (rate(rec:ord:ed[$__rate_interval]))) or max(c) > 1e3"#,
    );
    let expected: BTreeSet<String> = ["a_bucket", "b", "rec:ord:ed", "c"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);
    assert_eq!(
        metric_names(r#"label_values(up{job=~"smartdb-.+"}, job)"#),
        BTreeSet::from(["up".to_owned()])
    );
}

/// Names listed one per line in a deploy/prometheus file (comments start with `#`).
fn name_list(rel: &str) -> BTreeSet<String> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// The metric names the rules and the dashboard read, by where they are used, and the series
/// the rules record.
fn used_metric_names() -> (BTreeMap<String, BTreeSet<String>>, BTreeSet<String>) {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut recorded = BTreeSet::new();
    let rules_file = "deploy/prometheus/smartdb-rules.yaml";
    for doc in yaml_docs(&read(rules_file), rules_file) {
        for group in seq(doc.get("groups")) {
            for rule in seq(group.get("rules")) {
                if let Some(name) = str_of(rule, "record") {
                    recorded.insert(name.to_owned());
                }
                let what = str_of(rule, "record")
                    .or(str_of(rule, "alert"))
                    .unwrap_or("?")
                    .to_owned();
                let expr = str_of(rule, "expr").expect("every rule has an expr");
                for name in metric_names(expr) {
                    used.entry(name).or_default().insert(format!("rule {what}"));
                }
            }
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/smartdb.json")).expect("dashboard JSON");
    let mut exprs = Vec::new();
    fn panels(list: &serde_json::Value, exprs: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    exprs.push((format!("panel {title}"), expr.to_owned()));
                }
            }
            panels(&panel["panels"], exprs);
        }
    }
    panels(&dashboard["panels"], &mut exprs);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"].as_str().or(var["query"].as_str());
        if var["type"] == "query"
            && let Some(query) = query
        {
            exprs.push((format!("variable {}", var["name"]), query.to_owned()));
        }
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            exprs.push(("annotation".to_owned(), expr.to_owned()));
        }
    }
    assert!(exprs.len() > 5, "no queries found in the dashboard");
    for (what, expr) in exprs {
        for name in metric_names(&expr) {
            used.entry(name)
                .or_default()
                .insert(format!("dashboard {what}"));
        }
    }
    (used, recorded)
}

/// Metric names in a Prometheus text exposition.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(name.to_owned());
        }
    }
    names
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests

/// Every object in deploy/k8s, including the patches inlined in kustomization files.
fn k8s_objects() -> Vec<(String, Value)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy/k8s") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo().join("deploy/k8s"), &mut files);
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let what = file
            .strip_prefix(repo())
            .unwrap_or(&file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&file).expect("read manifest");
        for doc in yaml_docs(&text, &what) {
            if str_of(&doc, "kind") == Some("Kustomization") {
                for patch in seq(doc.get("patches")) {
                    if let Some(text) = str_of(patch, "patch") {
                        for doc in yaml_docs(text, &what) {
                            objects.push((format!("{what} (patch)"), doc));
                        }
                    }
                }
            }
            objects.push((what.clone(), doc));
        }
    }
    assert!(objects.len() > 20, "too few objects in deploy/k8s");
    objects
}

/// A container of one of the smartdb services, wherever it appears (base or patch).
struct Container<'a> {
    file: &'a str,
    service: String,
    spec: &'a Value,
}

fn containers(objects: &[(String, Value)]) -> Vec<Container<'_>> {
    let mut out = Vec::new();
    for (file, object) in objects {
        let pod = object
            .get("spec")
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("spec"));
        for spec in seq(pod.and_then(|p| p.get("containers"))) {
            let args: Vec<&str> = seq(spec.get("args"))
                .iter()
                .filter_map(Value::as_str)
                .collect();
            // The service is what `serve` runs; patches name the container only.
            let service = match args.as_slice() {
                ["serve", service, ..] => service.to_string(),
                [] => str_of(spec, "name").expect("container name").to_owned(),
                other => panic!("{file}: unexpected args {other:?}"),
            };
            assert!(
                SERVICES.iter().any(|(s, _)| *s == service),
                "{file}: container for unknown service {service:?}"
            );
            out.push(Container {
                file,
                service,
                spec,
            });
        }
    }
    out
}

/// (service, health service name) of every gRPC probe in the manifests.
fn probe_names(objects: &[(String, Value)]) -> BTreeSet<(String, String)> {
    let mut probes = BTreeSet::new();
    for container in containers(objects) {
        for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let Some(probe) = container.spec.get(kind) else {
                continue;
            };
            let grpc = probe
                .get("grpc")
                .unwrap_or_else(|| panic!("{}: {kind} is not a gRPC probe", container.file));
            let name = str_of(grpc, "service").unwrap_or("").to_owned();
            probes.insert((container.service.clone(), name));
        }
    }
    probes
}

#[test]
fn kubernetes_env_ports_and_config_match_serve_flags() {
    let objects = k8s_objects();
    let containers = containers(&objects);
    let mut configmap_users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut with_probes = BTreeSet::new();
    for c in &containers {
        let accepted = accepted(&c.service);
        let args: Vec<&str> = seq(c.spec.get("args"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for arg in args.iter().skip(2) {
            if let Some(flag) = arg.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap_or_default();
                assert!(
                    accepted.flags.contains(flag),
                    "{}: `smartdb serve {}` has no flag --{flag}",
                    c.file,
                    c.service
                );
            }
        }
        let mut env = BTreeMap::new();
        for var in seq(c.spec.get("env")) {
            let name = str_of(var, "name").expect("env name");
            assert!(
                accepted.env_ok(name),
                "{}: `smartdb serve {}` does not read {name}",
                c.file,
                c.service
            );
            if let Some(value) = str_of(var, "value") {
                env.insert(name, value);
            }
        }
        for source in seq(c.spec.get("envFrom")) {
            if let Some(map) = source.get("configMapRef") {
                let name = str_of(map, "name").expect("configMapRef name");
                configmap_users
                    .entry(name.to_owned())
                    .or_default()
                    .insert(c.service.clone());
            }
        }
        // The ports the container declares are the ones the service listens on.
        if let Some(listen) = env.get("SMARTDB_LISTEN") {
            let grpc = port_of(listen);
            let http = port_of(env.get("SMARTDB_HTTP_LISTEN").expect("metrics listen"));
            let declared: BTreeSet<u64> = seq(c.spec.get("ports"))
                .iter()
                .filter_map(|p| p.get("containerPort").and_then(Value::as_u64))
                .collect();
            assert_eq!(
                declared,
                BTreeSet::from([grpc as u64, http as u64]),
                "{}: container ports of {}",
                c.file,
                c.service
            );
            for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let port = c.spec[kind]["grpc"]["port"].as_u64();
                assert_eq!(
                    port,
                    Some(grpc as u64),
                    "{}: {kind} port of {}",
                    c.file,
                    c.service
                );
            }
            with_probes.insert(c.service.clone());
        }
    }
    assert_eq!(
        with_probes.len(),
        SERVICES.len(),
        "every service runs with probes somewhere"
    );
    // Every ConfigMap passed whole to a service holds only variables that service reads.
    let mut checked = BTreeSet::new();
    for (file, object) in &objects {
        if str_of(object, "kind") != Some("ConfigMap") {
            continue;
        }
        let name = str_of(&object["metadata"], "name").expect("ConfigMap name");
        let Some(users) = configmap_users.get(name) else {
            continue;
        };
        for key in object
            .get("data")
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .filter_map(|(k, _)| k.as_str())
        {
            for service in users {
                assert!(
                    accepted(service).env_ok(key),
                    "{file}: ConfigMap {name} sets {key}, which `smartdb serve {service}` does not read"
                );
            }
        }
        checked.insert(name.to_owned());
    }
    let referenced: BTreeSet<String> = configmap_users.keys().cloned().collect();
    assert_eq!(checked, referenced, "ConfigMaps referenced but not defined");

    // single-node redefines search and ingest as StatefulSets in full (Kustomize cannot change
    // a kind): their pods must stay the base's, but for the data volume (a claim there).
    for service in ["search", "ingest"] {
        let template = |kind: &str| {
            let (_, object) = objects
                .iter()
                .find(|(file, o)| {
                    !file.ends_with("(patch)")
                        && str_of(o, "kind") == Some(kind)
                        && str_of(&o["metadata"], "name")
                            == Some(format!("smartdb-{service}").as_str())
                })
                .unwrap_or_else(|| panic!("no {kind} smartdb-{service}"));
            let mut template = object["spec"]["template"].clone();
            let spec = template["spec"].as_mapping_mut().expect("pod spec");
            spec.remove("volumes");
            template
        };
        assert_eq!(
            template("Deployment"),
            template("StatefulSet"),
            "the single-node StatefulSet smartdb-{service} drifted from the base's Deployment"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Compose file and Dockerfile

#[test]
fn compose_services_match_serve_flags() {
    let compose = yaml_docs(&read("deploy/compose.yaml"), "deploy/compose.yaml")
        .pop()
        .expect("compose document");
    let services = compose["services"].as_mapping().expect("compose services");
    // Listen ports of each smartdb service, by compose name, for the address checks below.
    let mut listen_ports = BTreeMap::new();
    let mut smartdb_services = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().expect("service name");
        let image = str_of(service, "image").unwrap_or_default();
        if !image.starts_with("smartdb:") {
            continue;
        }
        if let Some(build) = service.get("build") {
            let dockerfile = str_of(build, "dockerfile").expect("build.dockerfile");
            assert_eq!(
                str_of(build, "context"),
                Some(".."),
                "{name}: build context"
            );
            assert!(repo().join(dockerfile).is_file(), "{name}: no {dockerfile}");
        }
        let command: Vec<&str> = seq(service.get("command"))
            .iter()
            .map(|v| v.as_str().expect("command words are strings"))
            .collect();
        let [serve, svc, flags @ ..] = command.as_slice() else {
            panic!("{name}: command {command:?} is not `serve <service> ...`");
        };
        assert_eq!(*serve, "serve", "{name}: command");
        let accepted = accepted(svc);
        smartdb_services.insert(svc.to_string());
        for flag in flags.iter().filter_map(|f| f.strip_prefix("--")) {
            let flag = flag.split('=').next().unwrap_or_default();
            assert!(accepted.flags.contains(flag), "{name}: no flag --{flag}");
        }
        let env: BTreeMap<String, String> = service["environment"]
            .as_mapping()
            .unwrap_or_else(|| panic!("{name}: environment as a map"))
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => serde_yaml_ng::to_string(other).unwrap().trim().to_owned(),
                };
                (k.as_str().expect("variable name").to_owned(), value)
            })
            .collect();
        for key in env.keys() {
            assert!(
                accepted.env_ok(key),
                "compose service {name}: `smartdb serve {svc}` does not read {key}"
            );
        }
        let grpc = port_of(env.get("SMARTDB_LISTEN").expect("SMARTDB_LISTEN"));
        let http = port_of(env.get("SMARTDB_HTTP_LISTEN").expect("SMARTDB_HTTP_LISTEN"));
        for port in seq(service.get("ports")) {
            let port = port.as_str().expect("ports as strings");
            let container = port_of(port);
            assert!(
                container == grpc || container == http,
                "{name}: publishes {port}, but listens on {grpc} and {http}"
            );
            // Only the gateway's API leaves the compose network.
            assert!(
                container != grpc || *svc == "gateway",
                "{name}: its gRPC port is internal and must not be published"
            );
        }
        listen_ports.insert(name.to_owned(), (grpc, env));
    }
    assert_eq!(
        smartdb_services,
        SERVICES.iter().map(|(s, _)| s.to_string()).collect(),
        "one compose service per smartdb service"
    );
    // Every downstream address names a compose service on the port it listens on.
    for (name, (_, env)) in &listen_ports {
        for (key, value) in env.iter().filter(|(k, _)| k.ends_with("_ADDR")) {
            let (host, port) = value.rsplit_once(':').expect("host:port");
            let target = listen_ports
                .get(host)
                .unwrap_or_else(|| panic!("{name}: {key}={value} names no smartdb service"));
            assert_eq!(
                port.parse::<u16>().ok(),
                Some(target.0),
                "{name}: {key}={value}"
            );
        }
    }
}

#[test]
fn dockerfile_builds_smartdb_and_runs_it_unprivileged() {
    let dockerfile = read("deploy/Dockerfile");
    assert!(
        dockerfile.contains("--bin smartdb"),
        "builds the smartdb binary"
    );
    assert!(dockerfile.contains("--release"), "release build");
    assert!(
        dockerfile.contains("CARGO_PROFILE_RELEASE_STRIP=debuginfo")
            && dockerfile.contains("CARGO_PROFILE_RELEASE_DEBUG=false"),
        "debug info stripped"
    );
    assert!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !matches!(user.split(':').next(), Some("root" | "0")),
        "runs as root"
    );
    assert!(dockerfile.contains(r#"ENTRYPOINT ["smartdb"]"#));
    // The default command is a valid `smartdb serve` call.
    let cmd = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("CMD");
    let words: Vec<String> = serde_json::from_str(cmd).expect("CMD in exec form");
    assert_eq!(words[0], "serve");
    let cmd_accepts = accepted(&words[1]);
    for flag in words.iter().filter_map(|w| w.strip_prefix("--")) {
        assert!(cmd_accepts.flags.contains(flag), "CMD: no flag --{flag}");
    }
    // The variables it sets are ones the services read.
    for line in dockerfile.lines() {
        for word in line.split_whitespace() {
            if let Some((name, _)) = word.split_once('=')
                && name.starts_with("SMARTDB_")
            {
                assert!(
                    SERVICES.iter().any(|(s, _)| accepted(s).env_ok(name)),
                    "Dockerfile sets {name}, which no service reads"
                );
            }
        }
    }
}

#[test]
fn directly_read_variables_are_read() {
    for (name, file) in DIRECT_ENV {
        assert!(
            read(file).contains(&format!("\"{name}\"")),
            "{file} no longer reads {name}: drop it from DIRECT_ENV and the manifests"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Against the running cluster

#[tokio::test]
async fn rules_dashboard_and_probes_match_the_running_services() {
    let (used, recorded) = used_metric_names();
    let pending = name_list("deploy/prometheus/pending-metrics.txt");
    let external = name_list("deploy/prometheus/external-metrics.txt");
    let probes = probe_names(&k8s_objects());

    // Plus a remote model whose endpoint is down, with a breaker that opens at the first failed
    // request (embed-svc's start-up probe): the remote-model metrics appear as in production.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dead_endpoint = format!("http://127.0.0.1:{dead_port}/v1");
    let cluster = Cluster::start_with_env(&[
        ("SMARTDB_OPENAI_BASE_URL", &dead_endpoint),
        ("SMARTDB_OPENAI_BREAKER_FAILURES", "1"),
    ])
    .await;
    // A little of everything: a knowledge base, a document through the whole ingest path, a
    // search twice (cache miss, then hit), and a caller's mistake (an error code).
    create_kb(&cluster, "deploy").await;
    ingest_text(
        &cluster,
        "deploy",
        "Kubernetes restarts a container whose liveness probe keeps failing.",
        true,
    )
    .await
    .expect("ingest");
    for _ in 0..2 {
        search(&cluster, "deploy", "what restarts a failing container?")
            .await
            .expect("search");
    }
    let missing = search(&cluster, "no-such-kb", "anything").await;
    assert_eq!(
        missing.expect_err("unknown kb").code(),
        tonic::Code::NotFound
    );

    let mut exported = BTreeSet::new();
    for (_, name) in SERVICES {
        let info = cluster.service(name);
        exported.extend(exported_names(&http_get(&info.http, "/metrics").await));
    }

    let mut unknown = Vec::new();
    for (name, uses) in &used {
        let known = exported.contains(name)
            || recorded.contains(name)
            || pending.contains(name)
            || external.contains(name);
        if !known {
            unknown.push(format!("{name} (used by {uses:?})"));
        }
    }
    assert!(
        unknown.is_empty(),
        "metric names that no service exports (add them to deploy/prometheus/pending-metrics.txt \
         only if a service is about to):\n{}\nexported: {exported:?}",
        unknown.join("\n")
    );
    // The allow-lists stay minimal: every name in them is used.
    for name in pending.iter().chain(&external) {
        assert!(used.contains_key(name), "{name} is listed but not used");
    }

    // Every probe asks for a health service the binary serves, and gets SERVING.
    assert!(!probes.is_empty());
    for (service, health_name) in &probes {
        let up_name = SERVICES.iter().find(|(s, _)| s == service).unwrap().1;
        let addr = cluster.service(up_name).grpc;
        assert_eq!(
            health(&addr, health_name).await,
            Some(ServingStatus::Serving),
            "{service} does not serve health for {health_name:?} (probed by the manifests)"
        );
    }
    // Unknown names are refused, so the check above means something.
    let gateway = cluster.service("gateway").grpc;
    assert_eq!(health(&gateway, "smartdb.v1.NoSuchService").await, None);
}
