//! The Kubernetes manifests under `deploy/kubernetes/`: every document is valid
//! against the Kubernetes JSON schemas (strict: unknown fields are errors) and, for
//! the Prometheus Operator's ServiceMonitor/PodMonitor, against models generated from
//! its CRD schemas (`tests/kubernetes/validate.py`, PyPI packages that `.ci/run`
//! installs). The mxgate configuration in the ConfigMap loads, and the Deployment's
//! timings and security settings agree with it.

use mxgate_test_kit as support;

use serde::Deserialize;
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Runs the validator; `None` (a skip) when its packages are not installed.
fn validate(files: &[PathBuf]) -> Option<(i32, String)> {
    let output = match Command::new("python3")
        .arg(root().join("tests/kubernetes/validate.py"))
        .args(files)
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            support::skip("python3 not installed");
            return None;
        }
        Err(e) => panic!("run validate.py: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let code = output.status.code().unwrap_or(-1);
    if code == 3 {
        support::skip(format!("schema packages not installed: {text}"));
        return None;
    }
    Some((code, text))
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind_of(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn find(kind: &str) -> Value {
    manifests()
        .iter()
        .flat_map(|p| documents(p))
        .find(|d| kind_of(d) == kind)
        .unwrap_or_else(|| panic!("no {kind} under deploy/kubernetes"))
}

#[test]
fn manifests_are_valid_against_the_kubernetes_and_operator_schemas() {
    let files = manifests();
    let Some((code, text)) = validate(&files) else {
        return;
    };
    assert_eq!(code, 0, "{text}");
    let mut kinds: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("valid "))
        .filter_map(|l| l.rsplit(": ").next())
        .filter_map(|l| l.split('/').next())
        .map(str::to_string)
        .collect();
    kinds.sort();
    kinds.dedup();
    for kind in [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PodMonitor",
        "Secret",
        "Service",
        "ServiceMonitor",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} not validated:\n{text}"
        );
    }
}

/// The validator can fail: a mistyped field, an unknown field and a misspelt CRD
/// field are each refused.
#[test]
fn the_validator_refuses_broken_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "replicas.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: two\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec: {containers: [{name: x, image: y}]}\n",
        ),
        (
            "unknown.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec: {containers: [{name: x, image: y, securityContext: {readOnlyRootFS: true}}]}\n",
        ),
        (
            "podmonitor.yaml",
            "apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  podMetricEndpoints: [{port: metrics}]\n",
        ),
        (
            "servicemonitor.yaml",
            "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\nspec:\n  selector: {}\n  endpoints: [{port: metrics, interval: 30}]\n",
        ),
    ];
    let mut paths = Vec::new();
    for (name, text) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let Some((code, output)) = validate(&paths) else {
        return;
    };
    assert_eq!(code, 1, "{output}");
    for (name, _) in cases {
        assert!(
            output
                .lines()
                .any(|l| l.starts_with("INVALID ") && l.contains(name)),
            "{name} passed:\n{output}"
        );
    }
}

/// The ConfigMap's mxgate.yaml is a valid configuration, and the Deployment gives a
/// SIGTERMed pod longer than mxgate needs to finish (delay + grace + 10 s to close).
#[test]
fn configmap_config_loads_and_the_grace_period_covers_the_drain() {
    let configmap = find("ConfigMap");
    let yaml = configmap["data"]["mxgate.yaml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mxgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (loaded, _) = mxgate::config::load(&path).unwrap_or_else(|errors| {
        panic!(
            "{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let timeouts = &loaded.config.server.timeouts;
    let needed = timeouts.shutdown_delay + timeouts.shutdown_grace + Duration::from_secs(10);
    assert!(!timeouts.shutdown_delay.is_zero());
    let deployment = find("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let period = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        Duration::from_secs(period) > needed,
        "terminationGracePeriodSeconds {period} must exceed {needed:?}"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["args"],
        serde_yaml_ng::from_str::<Value>("[serve, --config, /etc/mxgate/mxgate.yaml]").unwrap()
    );
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], Value::Bool(true));
    assert_eq!(security["allowPrivilegeEscalation"], Value::Bool(false));
    assert_eq!(
        security["capabilities"]["add"],
        serde_yaml_ng::from_str::<Value>("[NET_BIND_SERVICE]").unwrap()
    );
    assert_eq!(
        security["capabilities"]["drop"],
        serde_yaml_ng::from_str::<Value>("[ALL]").unwrap()
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true));
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    // The metrics listener the probes use is the one the config opens.
    let metrics = loaded.config.metrics.as_ref().expect("metrics.listen");
    assert_eq!(metrics.listen.port(), 9425);
    assert_eq!(loaded.config.server.listen[0].port(), 25);
}
