"""Offline checks for the Dockerfile and the manifests in deploy/ (no Docker, no cluster).

- Core Kubernetes objects: kubernetes-validate's bundled OpenAPI schemas, strict (an unknown
  field is an error, as `kubectl apply --validate=strict` would say).
- Custom resources (KServe, KEDA): the CRD schemas vendored in tests/schemas/, made strict the
  same way. The API server prunes unknown fields of a custom resource silently, so a typo would
  be lost without a word; here it fails.
- The Dockerfile: parsed with dockerfile-parse; .dockerignore evaluated the way Docker does.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shlex
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT / "tests" / "schemas"

# The oldest Kubernetes the manifests claim (native gRPC probes are GA since 1.27; 1.29 is the
# oldest minor still common in managed clusters) and the newest kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.29", "1.37")

# Custom resources and their vendored schema (tests/schemas/README.md says where from).
CRD_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): (
        "serving.kserve.io_clusterservingruntime_v1alpha1.json"
    ),
    ("serving.kserve.io/v1beta1", "InferenceService"): (
        "serving.kserve.io_inferenceservice_v1beta1.json"
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
}


# ------------------------------------------------------------------------------ manifests


@dataclass(frozen=True)
class Document:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.body["kind"]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def id(self) -> str:
        return f"{self.path.name}#{self.index}:{self.kind}/{self.name}"


# Files in deploy/ that are Helm values for someone else's chart, not Kubernetes objects
# (file name -> chart). load_documents leaves them out; tests read them with helm_values.
HELM_VALUES = {"prometheus-adapter-values.yaml": "prometheus-community/prometheus-adapter"}

# prometheus-adapter's rule fields (kubernetes-sigs/prometheus-adapter pkg/config/config.go at
# 01919d0, DiscoveryRule and the types under it). The adapter loads its config with
# yaml.UnmarshalStrict: an unknown key stops it from starting.
ADAPTER_RULE_KEYS = {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}
ADAPTER_RESOURCES_KEYS = {"template", "overrides", "namespaced"}
ADAPTER_NAME_KEYS = {"matches", "as"}
ADAPTER_OVERRIDE_KEYS = {"group", "resource"}


def load_documents(folder: Path = DEPLOY) -> list[Document]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name in HELM_VALUES:
            continue
        for index, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is not None:
                docs.append(Document(path, index, body))
    return docs


# Objects the manifests create that have no namespace; everything else goes to NAMESPACE.
CLUSTER_SCOPED = {"Namespace", "ClusterServingRuntime"}
NAMESPACE = "tributary"


def file_problems(name: str, text: str) -> list[str]:
    """A deploy/ file holds Kubernetes objects (kind, apiVersion, a name) or, when HELM_VALUES
    lists it, Helm values with no trace of an object."""
    bodies = [b for b in yaml.safe_load_all(text) if b is not None]
    if not bodies:
        return [f"{name}: empty"]
    problems = []
    for index, body in enumerate(bodies):
        is_object = isinstance(body, dict) and {"apiVersion", "kind", "metadata"} <= set(body)
        if name in HELM_VALUES:
            if not isinstance(body, dict) or {"apiVersion", "kind", "metadata"} & set(body):
                problems.append(f"{name}#{index}: Helm values must not look like an object")
        elif not is_object:
            problems.append(f"{name}#{index}: not a Kubernetes object (and not in HELM_VALUES)")
        elif not (body["metadata"] or {}).get("name"):
            problems.append(f"{name}#{index}: {body['kind']} without a name")
    return problems


def namespace_problems(docs: list[Document]) -> list[str]:
    """Namespaced objects name the tributary namespace (not someone else's, nor whatever
    namespace kubectl happens to use); cluster-scoped ones name none."""
    problems = []
    for doc in docs:
        namespace = doc.body["metadata"].get("namespace")
        expected = None if doc.kind in CLUSTER_SCOPED else NAMESPACE
        if namespace != expected:
            problems.append(f"{doc.id}: namespace {namespace!r}, expected {expected!r}")
    return problems


def helm_values(name: str, folder: Path = DEPLOY) -> dict[str, Any]:
    assert name in HELM_VALUES, name
    return yaml.safe_load((folder / name).read_text())


def adapter_rule_problems(rule: dict[str, Any], series: str, metric: str) -> list[str]:
    """A prometheus-adapter custom-metrics rule that serves the Prometheus series `series` per
    pod as the custom metric `metric`, in a form the adapter loads."""
    problems = []
    for where, keys, allowed in (
        ("rule", rule, ADAPTER_RULE_KEYS),
        ("resources", rule.get("resources", {}), ADAPTER_RESOURCES_KEYS),
        ("name", rule.get("name", {}), ADAPTER_NAME_KEYS),
        *(
            (f"overrides.{label}", value, ADAPTER_OVERRIDE_KEYS)
            for label, value in rule.get("resources", {}).get("overrides", {}).items()
        ),
    ):
        unknown = set(keys) - allowed
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
    if not str(rule.get("seriesQuery", "")).startswith(series + "{"):
        problems.append(f"seriesQuery does not select {series}: {rule.get('seriesQuery')!r}")
    overrides = rule.get("resources", {}).get("overrides", {})
    for label in ("namespace", "pod"):
        if overrides.get(label) != {"resource": label}:
            problems.append(f"label {label!r} is not mapped to the {label} resource")
    name = rule.get("name", {})
    if not re.fullmatch(name.get("matches", ""), series):
        problems.append(f"name.matches {name.get('matches')!r} does not match {series}")
    if name.get("as") != metric:
        problems.append(f"name.as is {name.get('as')!r}, the HPA asks for {metric!r}")
    query = str(rule.get("metricsQuery", ""))
    for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        if part not in query:
            problems.append(f"metricsQuery lacks {part}: {query!r}")
    return problems


def find(docs: list[Document], kind: str, name: str | None = None) -> list[Document]:
    return [d for d in docs if d.kind == kind and (name is None or d.name == name)]


def is_custom(body: dict[str, Any]) -> bool:
    return (body.get("apiVersion"), body.get("kind")) in CRD_SCHEMAS


def core_errors(body: dict[str, Any], version: str) -> list[str]:
    """kubernetes-validate, strict. It reports the first error it finds."""
    try:
        kubernetes_validate.validate(body, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(top)"
        return [f"{where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"no schema: {exc.message}"]
    return []


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural schema as a strict JSON Schema.

    Where an object lists `properties` (and neither keeps unknown fields nor sets
    `additionalProperties`) any other key is an error. `nullable` admits null. Objects with
    x-kubernetes-preserve-unknown-fields stay open: the API server keeps what it does not know
    there, so unknown keys are legitimate (e.g. free-form config).
    """
    node = copy.deepcopy(schema)

    def walk(s: Any) -> None:
        if not isinstance(s, dict):
            return
        if s.get("nullable") and "type" in s:
            s["type"] = [s["type"], "null"] if isinstance(s["type"], str) else s["type"]
        props = s.get("properties")
        if isinstance(props, dict):
            for sub in props.values():
                walk(sub)
            open_ = s.get("x-kubernetes-preserve-unknown-fields") is True
            if s.get("x-kubernetes-embedded-resource"):
                for key in ("apiVersion", "kind", "metadata"):
                    props.setdefault(key, {})
            if not open_ and "additionalProperties" not in s:
                s["additionalProperties"] = False
        for key in ("items", "additionalProperties", "not"):
            if isinstance(s.get(key), dict):
                walk(s[key])
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in s.get(key, []):
                walk(sub)

    walk(node)
    return node


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    raw = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    # OpenAPI v3.0 schemas are JSON Schema draft 4 with extensions; `format` is not asserted.
    return jsonschema.Draft4Validator(strict_schema(raw))


def schema_errors(validator: jsonschema.protocols.Validator, body: Any) -> list[str]:
    errors = sorted(validator.iter_errors(body), key=lambda e: [str(p) for p in e.path])
    return [f"{'.'.join(str(p) for p in e.path) or '(top)'}: {e.message}" for e in errors]


def custom_errors(body: dict[str, Any]) -> list[str]:
    """A custom resource against its CRD schema; its metadata against Kubernetes' ObjectMeta
    (the CRD schemas leave metadata open; the API server does not)."""
    errors = schema_errors(crd_validator(body["apiVersion"], body["kind"]), body)
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": body.get("metadata", {})}
    errors += core_errors(probe, KUBERNETES_VERSIONS[-1])
    return errors


def document_errors(body: dict[str, Any], version: str) -> list[str]:
    return custom_errors(body) if is_custom(body) else core_errors(body, version)


# ------------------------------------------------------------------------------ pod specs


def pod_spec(doc: Document) -> dict[str, Any]:
    if doc.kind == "Deployment":
        return doc.body["spec"]["template"]["spec"]
    if doc.kind == "ClusterServingRuntime":
        return doc.body["spec"]
    raise ValueError(doc.kind)


def tributary_containers(doc: Document) -> Iterator[dict[str, Any]]:
    for container in pod_spec(doc).get("containers", []):
        if container.get("image", "").split(":")[0].rsplit("/", 1)[-1] == "tributary":
            yield container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container port number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    raise LookupError(f"container {container['name']} has no port named {port!r}")


def parse_server_args(args: list[str]):
    """`tributary` parses the args (every cross-flag rule included) -> (ServerOptions, the
    --model-repository paths as written). The paths are swapped for an existing folder because
    the parser insists they exist, which they do only inside the pod."""
    from tributary import cli

    repos: list[str] = []
    swapped: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        it = iter(args)
        for arg in it:
            if arg in ("--model-repository", "--model-store"):
                repos.append(next(it))
                swapped += [arg, folder]
            elif arg.startswith(("--model-repository=", "--model-store=")):
                repos.append(arg.split("=", 1)[1])
                swapped.append(f"{arg.split('=', 1)[0]}={folder}")
            else:
                swapped.append(arg)
        return cli.parse_args(swapped), repos


# What KServe does to a predictor pod's annotations, from kserve/kserve at the commit the CRD
# schemas come from (tests/schemas/README.md):
# - pkg/controller/v1beta1/inferenceservice/components/predictor.go, buildObjectMeta: the pod
#   template gets the union of the runtime's spec.annotations, the InferenceService's
#   metadata.annotations and spec.predictor.annotations, later ones winning;
# - pkg/webhook/admission/pod/metrics_aggregate_injector.go, InjectMetricsAggregator: when
#   serving.kserve.io/enable-prometheus-scraping is absent the pod gets the cluster default
#   (inferenceservice-config, metricsAggregator.enablePrometheusScraping); when it is "true" the
#   webhook overwrites prometheus.io/port with queue-proxy's port (9091, or the aggregation port
#   9088 with serving.kserve.io/enable-metric-aggregation) and prometheus.io/path with /metrics.
#   It never sets prometheus.io/scrape. Queue-proxy exists only in Knative (Serverless) mode.
KSERVE_SCRAPING = "serving.kserve.io/enable-prometheus-scraping"
KSERVE_AGGREGATION = "serving.kserve.io/enable-metric-aggregation"
QUEUE_PROXY_METRICS_PORT = "9091"
QUEUE_PROXY_AGGREGATE_PORT = "9088"


def kserve_pod_annotations(
    runtime: dict[str, Any],
    isvc: dict[str, Any],
    cluster_scraping_default: str = "false",
    cluster_aggregation_default: str = "false",
) -> dict[str, str]:
    """The annotations a predictor pod of `isvc` served by `runtime` ends up with."""
    pod = {
        **runtime["spec"].get("annotations", {}),
        **isvc["metadata"].get("annotations", {}),
        **isvc["spec"]["predictor"].get("annotations", {}),
    }
    pod.setdefault(KSERVE_AGGREGATION, cluster_aggregation_default)
    pod.setdefault(KSERVE_SCRAPING, cluster_scraping_default)
    if pod[KSERVE_SCRAPING] == "true":
        aggregate = pod[KSERVE_AGGREGATION] == "true"
        pod["prometheus.io/port"] = (
            QUEUE_PROXY_AGGREGATE_PORT if aggregate else QUEUE_PROXY_METRICS_PORT
        )
        pod["prometheus.io/path"] = "/metrics"
    return pod


def prometheus_scrape_target(annotations: dict[str, str]) -> tuple[int, str] | None:
    """(port, path) that a Prometheus scraping pods by their prometheus.io/* annotations (the
    prometheus-community `prometheus` chart's kubernetes-pods job) reads, or None when it skips
    the pod: it keeps only prometheus.io/scrape "true", and needs a numeric port."""
    if annotations.get("prometheus.io/scrape") != "true":
        return None
    port = annotations.get("prometheus.io/port", "")
    if not port.isdigit():
        return None
    return int(port), annotations.get("prometheus.io/path", "/metrics")


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def console_scripts() -> dict[str, str]:
    """[project.scripts] of the server and, once it is its own package, the SDK."""
    scripts: dict[str, str] = {}
    for path in (ROOT / "pyproject.toml", ROOT / "clients" / "pyproject.toml"):
        if path.exists():
            scripts.update(tomllib.loads(path.read_text())["project"].get("scripts", {}))
    return scripts


# ------------------------------------------------------------------------------ Dockerfile


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per .dockerignore line: Go filepath.Match syntax plus `**`, a leading
    `!` re-includes, paths are relative to the context root (a leading `/` is dropped)."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = re.sub(r"/+", "/", pattern).strip("/")
        if pattern.startswith("./"):
            pattern = pattern[2:]
        if "\\" in pattern:
            raise ValueError(f".dockerignore: escapes are not handled here: {line}")
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
                end = pattern.index("]", i + 1)
                body = pattern[i + 1 : end]
                body = "^" + body[1:] if body.startswith(("^", "!")) else body
                out, i = out + f"[{body}]", end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        rules.append((not negate, re.compile(out)))
    return rules


def is_excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exclude, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = exclude
    return excluded


def tracked_files(root: Path = ROOT) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    return [p for p in out.split("\0") if p]


@dataclass(frozen=True)
class Instruction:
    stage: int  # 0-based index of the FROM it belongs to
    name: str  # upper case
    value: str


def instructions(dockerfile_text: str) -> list[Instruction]:
    from dockerfile_parse import DockerfileParser

    structure = DockerfileParser(fileobj=io.BytesIO(dockerfile_text.encode())).structure
    out, stage = [], -1
    for item in structure:
        name = item["instruction"].upper()
        if name == "COMMENT":
            continue
        if name == "FROM":
            stage += 1
        out.append(Instruction(stage, name, item["value"]))
    return out


def arg_defaults(instrs: list[Instruction]) -> dict[str, str]:
    """ARGs declared before the first FROM (the ones FROM lines may use)."""
    out = {}
    for ins in instrs:
        if ins.name == "FROM":
            break
        if ins.name == "ARG" and "=" in ins.value:
            key, value = ins.value.split("=", 1)
            out[key.strip()] = value.strip().strip('"')
    return out


def from_images(instrs: list[Instruction]) -> list[tuple[str, str | None]]:
    """(image with ARGs substituted, stage name) for every FROM."""
    args = arg_defaults(instrs)
    out = []
    for ins in instrs:
        if ins.name != "FROM":
            continue
        words = [w for w in ins.value.split() if not w.startswith("--platform")]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
        alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
        out.append((image, alias))
    return out


def copy_sources(instrs: list[Instruction]) -> list[str]:
    """Sources of COPY/ADD instructions that read the build context (not --from=stage)."""
    sources = []
    for ins in instrs:
        if ins.name not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.value)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        sources += words[:-1]
    return sources


def copy_problems(dockerfile_text: str, dockerignore_text: str, root: Path = ROOT) -> list[str]:
    """Every COPY source exists, is not excluded by .dockerignore, and nothing git tracks
    under it is excluded (a pattern that drops part of server/ breaks the image quietly)."""
    rules = dockerignore_rules(dockerignore_text)
    tracked = tracked_files(root)
    problems = []
    for source in copy_sources(instructions(dockerfile_text)):
        rel = source.strip("/").removeprefix("./")
        if not (root / rel).exists():
            problems.append(f"COPY {source}: not in the repository")
            continue
        if is_excluded(rel, rules):
            problems.append(f"COPY {source}: excluded by .dockerignore")
            continue
        under = [p for p in tracked if p == rel or p.startswith(rel + "/")]
        if not under:
            problems.append(f"COPY {source}: nothing under it is tracked by git")
        dropped = [p for p in under if is_excluded(p, rules)]
        if dropped:
            problems.append(f"COPY {source}: .dockerignore drops {dropped[:3]}")
    return problems


_UID_1000 = re.compile(r"\buseradd\b[^;&|]*(?:--uid[ =]|-u\s*)1000\b")
_FREE_1000 = re.compile(r"\buserdel\b[^;&|]*\bubuntu\b")


def useradd_problems(dockerfile_text: str) -> list[str]:
    """Ubuntu 24.04 images already have uid 1000 ('ubuntu'): `useradd --uid 1000` fails
    unless that user was removed first, earlier in the same stage."""
    problems = []
    freed: set[int] = set()
    for ins in instructions(dockerfile_text):
        if ins.name != "RUN":
            continue
        add = _UID_1000.search(ins.value)
        free = _FREE_1000.search(ins.value)
        if free and (not add or free.start() < add.start()):
            freed.add(ins.stage)
        if add and ins.stage not in freed:
            problems.append(f"stage {ins.stage}: `{add.group(0).strip()}` but uid 1000 is taken")
    return problems
