"""deploy/: every document validates (strict), and the manifests agree with the server.

Schemas: core objects through kubernetes-validate (KUBERNETES_VERSIONS), custom resources
through the CRD schemas in tests/schemas/. Agreement: container args parse with tributary's own
CLI, and the ports, probes, grace period, user, image tag and autoscaling queries match what
those args and the server do.
"""

from __future__ import annotations

import copy
import re

import pytest
from deploy_checks import (
    CRD_SCHEMAS,
    DEPLOY,
    HELM_VALUES,
    KSERVE_AGGREGATION,
    KSERVE_SCRAPING,
    KUBERNETES_VERSIONS,
    QUEUE_PROXY_AGGREGATE_PORT,
    QUEUE_PROXY_METRICS_PORT,
    ROOT,
    Document,
    adapter_rule_problems,
    container_port,
    core_errors,
    custom_errors,
    file_problems,
    find,
    helm_values,
    is_custom,
    kserve_pod_annotations,
    load_documents,
    namespace_problems,
    parse_server_args,
    pod_spec,
    project_version,
    prometheus_scrape_target,
    schema_errors,
    strict_schema,
    tributary_containers,
)
from jsonschema import Draft4Validator

DOCS = load_documents()
CORE = [d for d in DOCS if not is_custom(d.body)]
CUSTOM = [d for d in DOCS if is_custom(d.body)]
SERVERS = find(DOCS, "Deployment") + find(DOCS, "ClusterServingRuntime")
METRIC = "nv_inference_pending_request_count"
# The Prometheus scaler's trigger metadata keys (KEDA pkg/scalers/prometheus_scaler.go): the
# CRD types metadata as a free string map, so a misspelt key would pass the schema unseen.
KEDA_PROMETHEUS_KEYS = {
    "serverAddress",
    "query",
    "queryParameters",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "unsafeSsl",
    "awsRegion",
    "timeout",
    "identityOwner",
}


def test_deploy_has_what_the_docs_promise() -> None:
    kinds = {d.kind for d in DOCS}
    assert {
        "ClusterServingRuntime",
        "InferenceService",
        "Deployment",
        "Service",
        "ScaledObject",
        "HorizontalPodAutoscaler",
    } <= kinds
    assert len(CORE) >= 6 and len(CUSTOM) >= 4


def test_every_file_is_objects_or_declared_helm_values() -> None:
    """`kubectl apply -f` on a file in deploy/ applies Kubernetes objects, each with a kind and
    a name; the Helm values files (HELM_VALUES) are not objects at all, so they cannot be
    applied by mistake in place of the user's own."""
    assert set(HELM_VALUES) <= {path.name for path in DEPLOY.glob("*.yaml")}
    for path in sorted(DEPLOY.glob("*.yaml")):
        assert file_problems(path.name, path.read_text()) == [], path.name


def test_nothing_lands_in_another_namespace() -> None:
    """Applying deploy/ must not replace something of the user's elsewhere (as a
    prometheus-adapter ConfigMap in monitoring once would have)."""
    assert namespace_problems(DOCS) == []


def test_the_file_and_namespace_checks_can_fail() -> None:
    values = (DEPLOY / "prometheus-adapter-values.yaml").read_text()
    assert file_problems("extra-values.yaml", values)  # values, but not declared as such
    hpa = (DEPLOY / "autoscaling-hpa.yaml").read_text()
    assert file_problems("prometheus-adapter-values.yaml", hpa)  # an object where values go
    assert file_problems("x.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n")
    assert file_problems("x.yaml", "# only a comment\n")
    adapter = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "prometheus-adapter", "namespace": "monitoring"},
    }
    assert namespace_problems([*DOCS, Document(DEPLOY / "x.yaml", 0, adapter)])
    unset = copy.deepcopy(adapter)
    del unset["metadata"]["namespace"]  # lands in the current kubectl context's namespace
    assert namespace_problems([Document(DEPLOY / "x.yaml", 0, unset)])
    runtime = copy.deepcopy(find(DOCS, "ClusterServingRuntime")[0].body)
    runtime["metadata"]["namespace"] = "tributary"
    assert namespace_problems([Document(DEPLOY / "x.yaml", 0, runtime)])


# ------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("doc", CORE, ids=lambda d: d.id)
def test_core_objects_validate_strictly(doc: Document, version: str) -> None:
    assert core_errors(doc.body, version) == []


@pytest.mark.parametrize("doc", CUSTOM, ids=lambda d: d.id)
def test_custom_resources_validate_against_their_crd(doc: Document) -> None:
    assert custom_errors(doc.body) == []


def test_every_custom_kind_has_a_vendored_schema() -> None:
    for api_version, kind in CRD_SCHEMAS:
        assert (ROOT / "tests" / "schemas" / CRD_SCHEMAS[(api_version, kind)]).is_file()


def _deployment() -> dict:
    return copy.deepcopy(find(DOCS, "Deployment", "tributary")[0].body)


def test_core_validation_catches_a_typo_and_a_wrong_type() -> None:
    body = _deployment()
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grcp"] = container["readinessProbe"].pop("grpc")
    for version in KUBERNETES_VERSIONS:
        (error,) = core_errors(body, version)
        assert "'grcp' was unexpected" in error
        assert error.startswith("spec.template.spec.containers.0.readinessProbe")
    body = _deployment()
    body["spec"]["replicas"] = "one"
    assert "'one' is not of type 'integer'" in core_errors(body, KUBERNETES_VERSIONS[0])[0]


def test_a_kind_without_a_schema_fails() -> None:
    body = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert core_errors(body, KUBERNETES_VERSIONS[-1])[0].startswith("no schema")


def test_custom_validation_catches_typos_the_api_server_would_drop() -> None:
    body = copy.deepcopy(find(DOCS, "InferenceService", "digits")[0].body)
    model = body["spec"]["predictor"]["model"]
    model["protocolVersio"] = model.pop("protocolVersion")
    body["spec"]["predictor"]["minReplicas"] = "two"
    body["metadata"]["annotation"] = {"a": "b"}
    errors = custom_errors(body)
    assert any("'protocolVersio' was unexpected" in e for e in errors), errors
    assert any("'two' is not of type 'integer'" in e for e in errors), errors
    assert any(e.startswith("metadata") and "'annotation'" in e for e in errors), errors

    scaled = copy.deepcopy(find(DOCS, "ScaledObject")[0].body)
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    assert any("'minReplicas' was unexpected" in e for e in custom_errors(scaled))

    runtime = copy.deepcopy(find(DOCS, "ClusterServingRuntime")[0].body)
    runtime["spec"]["containers"][0]["ports"][0]["containerport"] = 9000
    assert any("'containerport' was unexpected" in e for e in custom_errors(runtime))


def test_preserve_unknown_fields_stay_open_and_the_rest_is_closed() -> None:
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "open": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"known": {"type": "string"}},
                },
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
                "list": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"a": {"type": "integer"}}},
                },
                "maybe": {"type": "string", "nullable": True},
            },
        }
    )
    validator = Draft4Validator(schema)
    ok = {"open": {"known": "x", "anything": 1}, "map": {"k": "v"}, "list": [{"a": 1}]}
    assert schema_errors(validator, ok | {"maybe": None}) == []
    assert schema_errors(validator, {"open": {"known": 3}}) != []  # known fields still typed
    assert schema_errors(validator, {"typo": 1}) != []
    assert schema_errors(validator, {"list": [{"b": 1}]}) != []
    assert schema_errors(validator, {"map": {"k": 1}}) != []


# ------------------------------------------------------------------------------ agreement


def _probe_ports(container: dict) -> dict[str, int]:
    out = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if not spec:
            continue
        for action in ("grpc", "tcpSocket", "httpGet"):
            if action in spec:
                out[f"{probe}.{action}"] = container_port(container, spec[action]["port"])
    return out


@pytest.mark.parametrize("doc", SERVERS, ids=lambda d: d.id)
def test_container_args_are_accepted_and_ports_match(doc: Document) -> None:
    containers = list(tributary_containers(doc))
    assert len(containers) == 1
    container = containers[0]
    assert container.get("command") in (None, ["tributary"])  # the image's ENTRYPOINT
    options, repositories = parse_server_args(container["args"])

    ports = {p["containerPort"] for p in container["ports"]}
    assert options.grpc_port in ports
    probes = _probe_ports(container)
    assert probes and set(probes.values()) == {options.grpc_port}, probes
    assert "grpc" in container["readinessProbe"]  # readiness = grpc.health.v1 Check

    spec = pod_spec(doc)
    if doc.kind == "ClusterServingRuntime":
        (port,) = container["ports"]  # Knative routes one port; gRPC needs the name h2c
        assert port["name"] == "h2c" and port["containerPort"] == options.grpc_port
        annotations = doc.body["spec"]["annotations"]
        assert annotations["prometheus.kserve.io/port"] == str(options.metrics_port)
        assert repositories == ["/mnt/models"]  # where KServe puts storageUri
        assert "grpc-v2" in doc.body["spec"]["protocolVersions"]
        assert "v2" in doc.body["spec"]["protocolVersions"]  # REST on --http-port
        assert options.allow_http and options.http_port == 8080  # KServe's Triton port
    else:
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert names == {
            "grpc": options.grpc_port,
            "http": options.http_port,
            "metrics": options.metrics_port,
        }
        annotations = doc.body["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(options.metrics_port)
        assert annotations["prometheus.io/path"] == "/metrics"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for repository in repositories:
            assert repository in mounts and mounts[repository].get("readOnly") is True
        assert "startupProbe" in container  # slow model loads do not trip liveness
        assert "grpc" not in container["livenessProbe"]  # not readiness: no restart loops
        grace = spec["terminationGracePeriodSeconds"]
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        pause = int(pre_stop["command"][-1]) if pre_stop.get("command", [""])[0] == "sleep" else 0
        assert grace > options.exit_timeout_secs + pause, (grace, options.exit_timeout_secs)


def test_the_validator_for_args_can_fail() -> None:
    with pytest.raises(SystemExit):
        parse_server_args(["--model-repository=/models", "--grpc-prot=8001"])
    with pytest.raises(SystemExit):  # a cross-flag rule from parse_args, not just argparse
        parse_server_args(["--model-repository=/models", "--grpc-use-ssl=true"])
    options, repos = parse_server_args(["--model-repository", "/x", "--grpc-port=9"])
    assert options.grpc_port == 9 and repos == ["/x"]


@pytest.mark.parametrize("doc", SERVERS, ids=lambda d: d.id)
def test_runs_as_the_image_user_locked_down(doc: Document) -> None:
    (container,) = tributary_containers(doc)
    spec = pod_spec(doc)
    pod_ctx = spec.get("securityContext", {})
    ctx = {**pod_ctx, **container.get("securityContext", {})}
    assert ctx["runAsUser"] == 1000 and ctx["runAsNonRoot"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert container["image"] == f"tributary:{project_version()}"
    assert "memory" in container["resources"]["limits"]
    assert container["resources"]["requests"]["cpu"]
    if ctx.get("readOnlyRootFilesystem"):
        volumes = {v["name"]: v for v in spec["volumes"]}
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]]


def test_services_select_the_pods_and_name_their_ports() -> None:
    (deployment,) = find(DOCS, "Deployment", "tributary")
    template = deployment.body["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert deployment.body["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = tributary_containers(deployment)
    services = find(DOCS, "Service")
    assert len(services) == 2
    for service in services:
        assert service.body["metadata"]["namespace"] == deployment.body["metadata"]["namespace"]
        assert service.body["spec"]["selector"].items() <= labels.items()
        for port in service.body["spec"]["ports"]:
            target = container_port(container, port["targetPort"])
            if port["name"] == "grpc":
                assert port["appProtocol"] == "kubernetes.io/h2c"
                assert target == parse_server_args(container["args"])[0].grpc_port
            if port["name"] == "http":
                assert port["appProtocol"] == "http"
                assert target == parse_server_args(container["args"])[0].http_port
    headless = [s for s in services if s.body["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1


# ------------------------------------------------------------------------------ KServe


def test_inference_services_use_the_runtime_as_it_expects() -> None:
    (runtime,) = find(DOCS, "ClusterServingRuntime")
    (container,) = tributary_containers(runtime)
    grpc_port = parse_server_args(container["args"])[0].grpc_port
    formats = {f["name"] for f in runtime.body["spec"]["supportedModelFormats"]}
    services = find(DOCS, "InferenceService")
    assert len(services) >= 2
    for isvc in services:
        model = isvc.body["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime.name
        assert model["protocolVersion"] == "grpc-v2"
        assert model["modelFormat"]["name"] in formats
        assert model["storageUri"]
        assert model["ports"] == [{"name": "h2c", "containerPort": grpc_port, "protocol": "TCP"}]


# ------------------------------------------------------------------------------ autoscaling


def _pod_regex(query: str) -> re.Pattern[str]:
    found = re.search(r'pod=~"([^"]+)"', query)
    assert found, query
    return re.compile(found.group(1))


def _check_query(query: str, namespace: str, deployment: str) -> None:
    assert query.startswith(f"sum({METRIC}{{"), query  # the backlog of every replica
    assert f'namespace="{namespace}"' in query
    pods = _pod_regex(query)  # Prometheus anchors =~ at both ends, as fullmatch does
    assert pods.fullmatch(f"{deployment}-7d9c8b6f5d-x2x9z")
    assert not pods.fullmatch(f"{deployment}-canary-7d9c8b6f5d-x2x9z")
    assert not pods.fullmatch(f"other-{deployment}-7d9c8b6f5d-x2x9z")


def test_the_scaling_metric_is_one_the_server_exports() -> None:
    assert f'"{METRIC}"' in (ROOT / "server" / "tributary" / "metrics.py").read_text()


def test_keda_scales_the_deployment_on_queue_depth() -> None:
    (deployment,) = find(DOCS, "Deployment", "tributary")
    (scaled,) = find(DOCS, "ScaledObject")
    spec = scaled.body["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment.name,
    }
    assert scaled.body["metadata"]["namespace"] == deployment.body["metadata"]["namespace"]
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert set(trigger["metadata"]) <= KEDA_PROMETHEUS_KEYS, set(trigger["metadata"])
    assert float(trigger["metadata"]["threshold"]) > 0
    _check_query(trigger["metadata"]["query"], scaled.body["metadata"]["namespace"], "tributary")


def test_hpa_scales_the_deployment_through_the_adapter_rule() -> None:
    (deployment,) = find(DOCS, "Deployment", "tributary")
    (hpa,) = find(DOCS, "HorizontalPodAutoscaler")
    spec = hpa.body["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment.name
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa.body["metadata"]["namespace"] == deployment.body["metadata"]["namespace"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"]["type"] == "AverageValue"

    values = helm_values("prometheus-adapter-values.yaml")
    assert set(values) == {"rules"} and set(values["rules"]) == {"custom"}  # nothing else of theirs
    wanted = metric["pods"]["metric"]["name"]
    rules = [r for r in values["rules"]["custom"] if r.get("name", {}).get("as") == wanted]
    assert len(rules) == 1, values
    assert adapter_rule_problems(rules[0], METRIC, wanted) == []


def test_the_adapter_rule_check_can_fail() -> None:
    (rule,) = helm_values("prometheus-adapter-values.yaml")["rules"]["custom"]
    name = rule["name"]["as"]
    assert adapter_rule_problems(rule, METRIC, name) == []
    assert adapter_rule_problems(rule, METRIC, "another_name")  # the HPA asks for another metric
    assert adapter_rule_problems(rule, "nv_inference_queue_duration_us", name)
    for path, value in (
        (("metricQuery",), "x"),  # a typo the adapter's strict loader refuses
        (("resources", "overrides", "pod", "resources"), "pod"),
        (("resources", "overrides", "pod"), {"resource": "pods"}),
        (("name", "matches"), "^nv_inference_pending$"),
        (("metricsQuery",), "sum(<<.Series>>{<<.LabelMatchers>>})"),
    ):
        broken = copy.deepcopy(rule)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert adapter_rule_problems(broken, METRIC, name), path


def _autoscaled_isvc() -> dict:
    scaled = [
        d
        for d in find(DOCS, "InferenceService")
        if d.body["metadata"].get("annotations", {}).get("serving.kserve.io/autoscalerClass")
    ]
    assert len(scaled) == 1
    return copy.deepcopy(scaled[0].body)


def test_inference_service_scales_with_keda_on_queue_depth() -> None:
    isvc = _autoscaled_isvc()
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    assert annotations["serving.kserve.io/deploymentMode"] in ("Standard", "RawDeployment")
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
    (metric,) = predictor["autoScaling"]["metrics"]
    assert metric["type"] == "External"
    external = metric["external"]
    assert external["metric"]["backend"] == "prometheus"
    assert external["target"]["type"] == "Value" and float(external["target"]["value"]) > 0
    # KServe's KEDA reconciler copies only the stabilization windows from autoScaling.behavior;
    # policies would be dropped without a word. The windows match the plain ScaledObject's.
    (scaled,) = find(DOCS, "ScaledObject")
    plain = scaled.body["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    behavior = predictor["autoScaling"]["behavior"]
    for direction in ("scaleUp", "scaleDown"):
        assert set(behavior[direction]) == {"stabilizationWindowSeconds"}, behavior
        window = behavior[direction]["stabilizationWindowSeconds"]
        assert window == plain[direction]["stabilizationWindowSeconds"]
    # KServe names the predictor Deployment <isvc>-predictor.
    name = isvc["metadata"]["name"]
    _check_query(external["metric"]["query"], isvc["metadata"]["namespace"], f"{name}-predictor")


def _runtime_and_metrics_port() -> tuple[dict, int]:
    (runtime,) = find(DOCS, "ClusterServingRuntime")
    (container,) = tributary_containers(runtime)
    return copy.deepcopy(runtime.body), parse_server_args(container["args"])[0].metrics_port


@pytest.mark.parametrize("cluster_default", ["false", "true"])
def test_prometheus_scrapes_the_autoscaled_predictor(cluster_default: str) -> None:
    """KEDA's query has series only if Prometheus scrapes the predictor pods' metrics port.
    Whatever the cluster's enablePrometheusScraping default, KServe must leave the pods with
    prometheus.io/scrape "true" and the server's metrics port (Standard mode runs no
    queue-proxy, so KServe's 9091/9088 would be a dead target)."""
    runtime, metrics_port = _runtime_and_metrics_port()
    isvc = _autoscaled_isvc()
    pod = kserve_pod_annotations(runtime, isvc, cluster_scraping_default=cluster_default)
    assert prometheus_scrape_target(pod) == (metrics_port, "/metrics"), pod


@pytest.mark.parametrize("doc", find(DOCS, "InferenceService"), ids=lambda d: d.id)
def test_every_predictor_is_scraped_on_the_metrics_port(doc: Document) -> None:
    runtime, metrics_port = _runtime_and_metrics_port()
    pod = kserve_pod_annotations(runtime, doc.body)
    assert prometheus_scrape_target(pod) == (metrics_port, "/metrics"), pod
    # prometheus.kserve.io/*: where queue-proxy's metric aggregation (Serverless mode) reads.
    assert pod["prometheus.kserve.io/port"] == str(metrics_port)


def test_the_scrape_check_fails_without_the_annotations() -> None:
    runtime, metrics_port = _runtime_and_metrics_port()
    isvc = _autoscaled_isvc()
    assert prometheus_scrape_target(kserve_pod_annotations(runtime, isvc, "true")) is not None

    # Without the pin, a cluster default of "true" moves the port to queue-proxy's.
    unpinned = copy.deepcopy(isvc)
    del unpinned["metadata"]["annotations"][KSERVE_SCRAPING]
    assert prometheus_scrape_target(kserve_pod_annotations(runtime, unpinned, "false"))
    assert prometheus_scrape_target(kserve_pod_annotations(runtime, unpinned, "true")) == (
        int(QUEUE_PROXY_METRICS_PORT),
        "/metrics",
    )
    # What KServe's own docs suggest, in Standard mode: the same dead port, still no scrape.
    enabled = copy.deepcopy(isvc)
    enabled["metadata"]["annotations"][KSERVE_SCRAPING] = "true"
    enabled["metadata"]["annotations"][KSERVE_AGGREGATION] = "true"
    target = prometheus_scrape_target(kserve_pod_annotations(runtime, enabled))
    assert target == (int(QUEUE_PROXY_AGGREGATE_PORT), "/metrics")
    # Only prometheus.kserve.io/* (where metrics are, for KServe): Prometheus skips the pods.
    bare = copy.deepcopy(runtime)
    for key in ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"):
        del bare["spec"]["annotations"][key]
    assert prometheus_scrape_target(kserve_pod_annotations(bare, isvc)) is None
    # A predictor-level annotation wins over the InferenceService's and the runtime's.
    override = copy.deepcopy(isvc)
    override["spec"]["predictor"]["annotations"] = {"prometheus.io/port": "1"}
    assert prometheus_scrape_target(kserve_pod_annotations(runtime, override)) == (1, "/metrics")


def test_the_deployment_guide_covers_every_manifest() -> None:
    guide = (ROOT / "docs" / "deployment.md").read_text()
    for path in sorted(DEPLOY.glob("*.yaml")):
        assert f"deploy/{path.name}" in guide, path.name
    assert "../" not in guide  # the guide stands on the repository alone
