"""The deployment, validated offline: deploy/Dockerfile, deploy/serve.yaml, the KubeRay manifests
under k8s/ and the sweep file they run.

- Every manifest validates strictly against the KubeRay CRDs' OpenAPI v3 schemas (ray.io/v1): an
  unknown field is an error here, where the API server would drop it silently. The CRDs come from
  $RAYCURV_KUBERAY_CRDS, else ../shared/kuberay-crds beside the repository; without them those
  tests skip and say why. Core kinds (Namespace, PVC, Service, Secret, Prometheus monitors,
  Kustomization) are checked for their required fields.
- The RayService's serveConfigV2 and deploy/serve.yaml parse with Ray Serve's own config schema
  (and use no key Serve would ignore), agree with each other, and their import path imports and
  builds the app, with the config's deployment options applied as Serve's controller applies them.
- Every `raycurv ...` entrypoint parses with raycurv's command line, and what it names (sweep file,
  volume paths, GPUs) exists in the image and the cluster it runs on.
- The Dockerfile's install line is the README's.

Nothing here starts Ray or needs a network; `kubectl kustomize` is used where kubectl exists.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SERVE_YAML = ROOT / "deploy" / "serve.yaml"
CRDS_ENV = "RAYCURV_KUBERAY_CRDS"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- loading ---------------------------------------------------------------------------------

def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_Loader) if doc is not None]


def _is_kustomization(path: Path) -> bool:
    return path.name in ("kustomization.yaml", "kustomization.yml", "Kustomization")


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.y*ml") if not _is_kustomization(p))


def _kustomizations() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.is_file() and _is_kustomization(p))


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in _manifest_files():
        for index, doc in enumerate(_load_all(path)):
            out.append((f"{path.relative_to(ROOT)}#{index}", doc))
    return out


MANIFESTS = _manifests()


def _of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(where, doc) for where, doc in MANIFESTS if doc.get("kind") == kind]


def _ids(items: list[tuple[str, Any]]) -> list[str]:
    return [where for where, _ in items]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def _groups(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) of the head and every worker group."""
    cluster = _cluster_spec(doc)
    return [("head", cluster["headGroupSpec"]),
            *((f"worker group {g['groupName']}", g) for g in cluster.get("workerGroupSpecs", []))]


def _pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every pod template a Ray resource defines, the submitter's included."""
    pods = [(name, group["template"]["spec"]) for name, group in _groups(doc)]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        pods.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in bytes)."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    assert match and match.group(2) in ("", *units), f"not a quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1.0)


def _entrypoint(doc: dict[str, Any]) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


# --- CRDs and strict schemas -----------------------------------------------------------------

def _crd_dir() -> Path | None:
    """$RAYCURV_KUBERAY_CRDS (must hold the CRDs when set), else ../shared/kuberay-crds."""
    named = os.environ.get(CRDS_ENV)
    if named:
        path = Path(named)
        if not any(path.glob("*.yaml")):
            pytest.fail(f"${CRDS_ENV}={named} holds no CRD files")
        return path
    default = ROOT.parent / "shared" / "kuberay-crds"
    return default if any(default.glob("*.yaml")) else None


def strict_schema(node: Any) -> Any:
    """A CRD's OpenAPI v3 schema as JSON Schema with the API server's strictness: an object that
    lists `properties` (and does not preserve unknown fields) takes no other field;
    x-kubernetes-int-or-string takes an integer or a string; `nullable` also takes null."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):  # field name -> schema
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = strict_schema(value)
        elif key.startswith("x-kubernetes-") or key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


# ObjectMeta fields a manifest may set (a CRD's schema leaves the top-level metadata open).
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers",
               "ownerReferences"}


@cache
def _validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a Draft 7 validator of that CRD version's strict schema."""
    from jsonschema import Draft7Validator

    folder = _crd_dir()
    assert folder is not None
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        for crd in _load_all(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = strict_schema(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {
                    "type": "object", "additionalProperties": False,
                    "properties": {field: {} for field in OBJECT_META}}
                out[(f"{group}/{version['name']}", kind)] = Draft7Validator(schema)
    return out


@pytest.fixture(scope="module")
def crds():
    if _crd_dir() is None:
        pytest.skip(f"KubeRay CRDs not found: set ${CRDS_ENV} or put them in "
                    f"{ROOT.parent / 'shared' / 'kuberay-crds'} (.ci/run does)")
    return _validators()


def _schema_errors(validators: dict, doc: dict[str, Any]) -> list[str]:
    validator = validators.get((doc.get("apiVersion"), doc.get("kind")))
    assert validator is not None, (f"no CRD for {doc.get('apiVersion')} {doc.get('kind')}; "
                                   f"have {sorted(validators)}")
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(doc)]


# --- the manifests against the CRDs ----------------------------------------------------------

RAY_MANIFESTS = [(w, d) for w, d in MANIFESTS if d.get("apiVersion", "").startswith("ray.io/")]


def test_manifests_exist():
    kinds = sorted(d["kind"] for _, d in MANIFESTS)
    assert kinds.count("RayJob") >= 2 and "RayService" in kinds, kinds
    assert all(d["apiVersion"] == "ray.io/v1" for _, d in RAY_MANIFESTS)


@pytest.mark.parametrize(("where", "doc"), RAY_MANIFESTS, ids=_ids(RAY_MANIFESTS))
def test_ray_manifest_validates_strictly_against_the_crd(crds, where, doc):
    assert _schema_errors(crds, doc) == []


def test_an_unknown_or_misspelled_field_is_rejected(crds):
    where, job = _of_kind("RayJob")[0]
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in _schema_errors(crds, typo))

    deep = copy.deepcopy(job)
    _ray_container(_cluster_spec(deep)["workerGroupSpecs"][0])["resource"] = {"limits": {}}
    errors = _schema_errors(crds, deep)
    assert any("'resource' was unexpected" in e and ".containers.0" in e for e in errors), errors

    meta = copy.deepcopy(job)
    meta["metadata"]["label"] = {"a": "b"}
    assert _schema_errors(crds, meta)

    wrong_type = copy.deepcopy(job)
    _cluster_spec(wrong_type)["workerGroupSpecs"][0]["replicas"] = "3"
    assert _schema_errors(crds, wrong_type)


def test_int_or_string_fields_take_both(crds):
    _, service = _of_kind("RayService")[0]
    for value in (2, "2", "500m"):
        doc = copy.deepcopy(service)
        _ray_container(_cluster_spec(doc)["headGroupSpec"])["resources"]["limits"]["cpu"] = value
        assert _schema_errors(crds, doc) == [], value
    doc = copy.deepcopy(service)
    _ray_container(_cluster_spec(doc)["headGroupSpec"])["resources"]["limits"]["cpu"] = "two"
    assert _schema_errors(crds, doc)  # the quantity pattern still applies to strings


def test_strict_schema_conversion():
    from jsonschema import Draft7Validator

    schema = strict_schema({"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "port": {"x-kubernetes-int-or-string": True},
        "maybe": {"type": "string", "nullable": True}}})
    valid = Draft7Validator(schema).is_valid
    assert valid({"closed": {"a": "x"}, "open": {"a": "x", "b": 1}, "map": {"k": "v"},
                  "port": 8000, "maybe": None})
    assert valid({"port": "serve"})
    assert not valid({"closed": {"b": "x"}})
    assert not valid({"unknown": 1})
    assert not valid({"port": 1.5})
    assert not valid({"map": {"k": 1}})


# --- what the KubeRay operator checks before it creates anything ----------------------------

@pytest.mark.parametrize(("where", "doc"), RAY_MANIFESTS, ids=_ids(RAY_MANIFESTS))
def test_kuberay_operator_validation(where, doc):
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), f"{name}: not a DNS-1035 label"
    limit = 53 if doc["kind"] == "RayCluster" else 47  # KubeRay appends a suffix to name clusters
    assert len(name) <= limit, name
    cluster = _cluster_spec(doc)
    for group_name, group in _groups(doc):
        params = group.get("rayStartParams", {})
        assert "labels" not in params, group_name
        assert not (set(params) & {"num-cpus", "num-gpus", "memory", "resources"}
                    and group.get("resources")), f"{group_name}: resources set twice"
        assert all(isinstance(v, str) for v in params.values()), group_name
        assert group["template"]["spec"]["containers"], group_name
    for group in cluster.get("workerGroupSpecs", []):
        replicas = group.get("replicas", group["minReplicas"])
        assert group["minReplicas"] <= replicas <= group["maxReplicas"], group["groupName"]
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        if spec.get("ttlSecondsAfterFinished") or spec.get("suspend"):
            assert spec.get("shutdownAfterJobFinishes"), "needs shutdownAfterJobFinishes"
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    if doc["kind"] == "RayService":
        assert "name" not in cluster["headGroupSpec"].get("headService", {}).get("metadata", {})


# --- security ----------------------------------------------------------------------------------

def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize(("where", "doc"), RAY_MANIFESTS, ids=_ids(RAY_MANIFESTS))
def test_ray_token_authentication_is_on(where, doc):
    cluster = _cluster_spec(doc)
    assert cluster.get("authOptions", {}).get("mode") == "token"
    assert _version(cluster["rayVersion"]) >= (2, 52, 0)  # KubeRay's minimum for token auth


def _check_container_security(where: str, container: dict[str, Any]) -> None:
    context = container.get("securityContext", {})
    assert context.get("allowPrivilegeEscalation") is False, where
    assert "ALL" in context.get("capabilities", {}).get("drop", []), where
    assert not context.get("capabilities", {}).get("add"), where
    assert not context.get("privileged"), where
    assert context.get("runAsUser", 1000) != 0, where


def _check_resources(where: str, resources: dict[str, Any]) -> None:
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: {kind}"
    for name in ("cpu", "memory"):
        assert _quantity(resources["requests"][name]) <= _quantity(resources["limits"][name]), where
    gpus = {k: v for k, v in resources["limits"].items() if k.endswith("/gpu")}
    for key, value in gpus.items():  # extended resources: requests must equal limits
        assert str(resources["requests"].get(key)) == str(value), f"{where}: {key}"


@pytest.mark.parametrize(("where", "doc"), RAY_MANIFESTS, ids=_ids(RAY_MANIFESTS))
def test_pods_run_as_non_root_with_requests_and_limits(where, doc):
    for pod_name, pod in _pod_specs(doc):
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, pod_name
        assert context.get("runAsUser", 0) > 0, pod_name
        assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", pod_name
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), pod_name
        assert not any("hostPath" in v for v in pod.get("volumes", [])), pod_name
        for container in _containers(pod):
            label = f"{pod_name}/{container['name']}"
            _check_container_security(label, container)
            _check_resources(label, container.get("resources", {}))
    cluster = _cluster_spec(doc)
    if cluster.get("enableInTreeAutoscaling"):  # the autoscaler sidecar KubeRay adds to the head
        options = cluster.get("autoscalerOptions", {})
        _check_resources("autoscaler", options.get("resources", {}))
        _check_container_security("autoscaler", options)
        assert options["securityContext"].get("runAsNonRoot") is True


def test_namespace_enforces_restricted_pod_security():
    namespaces = _of_kind("Namespace")
    assert namespaces
    for where, doc in namespaces:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("pod-security.kubernetes.io/enforce") == "restricted", where


# --- core kinds and kustomizations -----------------------------------------------------------

CORE_REQUIRED: dict[tuple[str, str], list[str]] = {
    ("v1", "Namespace"): [],
    ("v1", "PersistentVolumeClaim"): ["spec.accessModes", "spec.resources.requests.storage"],
    ("v1", "Service"): ["spec.ports"],
    ("v1", "Secret"): [],
    ("v1", "ConfigMap"): [],
    ("monitoring.coreos.com/v1", "PodMonitor"): ["spec.selector", "spec.podMetricsEndpoints"],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["spec.selector", "spec.endpoints"],
    ("monitoring.coreos.com/v1", "PrometheusRule"): ["spec.groups"],
}
CLUSTER_SCOPED = {"Namespace"}
CORE_MANIFESTS = [(w, d) for w, d in MANIFESTS if (w, d) not in RAY_MANIFESTS]


def _get(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


@pytest.mark.parametrize(("where", "doc"), CORE_MANIFESTS, ids=_ids(CORE_MANIFESTS))
def test_core_manifest_has_its_required_fields(where, doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in CORE_REQUIRED, f"{where}: {key} has no check here; add one"
    name = _get(doc, "metadata.name")
    assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), where
    assert set(doc["metadata"]) <= OBJECT_META, where
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec", "data", "stringData", "type",
                        "immutable"}, where
    for field in CORE_REQUIRED[key]:
        assert _get(doc, field) not in (None, [], {}), f"{where}: {field} is required"
    if doc["kind"] == "PersistentVolumeClaim":
        assert "ReadWriteMany" in doc["spec"]["accessModes"], "head and workers share the volume"
    endpoints = (_get(doc, "spec.endpoints") or []) + (_get(doc, "spec.podMetricsEndpoints") or [])
    for endpoint in endpoints:
        assert endpoint.get("port"), f"{where}: endpoints scrape a named port"


def test_no_secret_values_are_committed():
    assert not any(doc.get("kind") == "Secret" for _, doc in MANIFESTS), \
        "tokens are created with kubectl (README), never committed"


KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches",
                      "labels", "components", "configMapGenerator", "secretGenerator",
                      "generatorOptions"}


def test_kustomizations_cover_every_manifest_once():
    listed: list[Path] = []
    for path in _kustomizations():
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1", path
        assert doc["kind"] == "Kustomization", path
        assert set(doc) <= KUSTOMIZATION_KEYS, f"{path}: {set(doc) - KUSTOMIZATION_KEYS}"
        assert doc.get("namespace") == "raycurv", path
        for resource in doc.get("resources", []):
            target = (path.parent / resource).resolve()
            assert target.is_file(), f"{path}: {resource} does not exist"
            assert path.parent.resolve() in target.parents, f"{path}: {resource} is outside it"
            listed.append(target)
        for image in doc.get("images", []):
            assert set(image) <= {"name", "newName", "newTag", "digest"} and image.get("name"), path
    assert (K8S / "kustomization.yaml").is_file()
    assert sorted(listed) == sorted(p.resolve() for p in _manifest_files())


def test_images_are_raycurv_at_the_project_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for where, doc in RAY_MANIFESTS:
        gpu_cluster = any(k.endswith("/gpu") for _, g in _groups(doc)
                          for k in _ray_container(g).get("resources", {}).get("limits", {}))
        for pod_name, pod in _pod_specs(doc):
            for container in _containers(pod):
                expected = f"raycurv:{version}-{'gpu' if gpu_cluster else 'cpu'}"
                assert container["image"] == expected, f"{where} {pod_name}: {container['image']}"
    for path in _kustomizations():
        doc = yaml.safe_load(path.read_text())
        uses_image = any("raycurv:" in p.read_text() for p in path.parent.glob("*.yaml")
                         if not _is_kustomization(p))
        if uses_image:  # one place to point the manifests at a registry
            assert [i["name"] for i in doc.get("images", [])] == ["raycurv"], path


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", [p.parent for p in _kustomizations()],
                         ids=[str(p.parent.relative_to(ROOT)) for p in _kustomizations()])
def test_kustomize_renders(folder):
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert len(docs) == sum(len(_load_all(p)) for p in folder.glob("*.yaml")
                            if not _is_kustomization(p))
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == "raycurv", doc["metadata"]["name"]
    if _crd_dir() is not None:
        validators = _validators()
        for doc in docs:
            if doc["apiVersion"].startswith("ray.io/"):
                assert _schema_errors(validators, doc) == [], doc["metadata"]["name"]


# --- entrypoints: raycurv's command line, the image, the cluster -----------------------------

JOBS = _of_kind("RayJob")
SHELL_SPECIAL = set("$`'\"\\;&|<>()*?#~!{}[]")


def _parse(argv: list[str]):
    from raycurv.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`raycurv {' '.join(argv)}` does not parse (exit {exc.code})")


@pytest.mark.parametrize(("where", "doc"), JOBS, ids=_ids(JOBS))
def test_entrypoint_parses_with_raycurvs_command_line(where, doc, capsys):
    from raycurv.cli import VERBS, build_parser

    argv = _entrypoint(doc)
    assert argv[0] == "raycurv" and argv[1] in VERBS, argv
    assert argv[1] not in ("reference", "report"), "verbs not on every branch yet"
    args = _parse(argv[1:])
    assert args.verb == argv[1]
    with pytest.raises(SystemExit) as info:  # the verb's --help, after those flags
        build_parser().parse_args([*argv[1:], "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: raycurv {argv[1]}")
    # whole flag names only: argparse takes abbreviations, which a new flag can make ambiguous
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    known = verbs.choices[argv[1]]._option_string_actions
    assert [a for a in argv[2:] if a.startswith("--") and a not in known] == []


def test_a_renamed_flag_breaks_the_parse(capsys):
    from raycurv.cli import build_parser

    argv = _entrypoint(JOBS[0][1])
    renamed = [a + "x" if a.startswith("--") and a != "--address" else a for a in argv[1:]]
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(renamed)
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(("where", "doc"), JOBS, ids=_ids(JOBS))
def test_entrypoint_survives_the_submitters_shell_and_joins_the_cluster(where, doc):
    # KubeRay pastes the entrypoint into a bash command line in the submitter pod, where $VARS
    # would expand (to nothing) and quotes would be eaten before `ray job submit` sees them.
    text = " ".join(doc["spec"]["entrypoint"].split())
    assert not SHELL_SPECIAL & set(text), f"{where}: shell characters in {text!r}"
    # Inside a Ray job, raycurv must join the job's cluster: without --address it would start a
    # local Ray sized for the run, which ray.init refuses while RAY_ADDRESS names a cluster.
    args = _parse(_entrypoint(doc)[1:])
    assert args.address == "auto", where


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instruction, _, rest = current.strip().partition(" ")
        lines.append((instruction.upper(), " ".join(rest.split())))
        current = ""
    return lines


def _workdir() -> str:
    return [args for ins, args in _dockerfile() if ins == "WORKDIR"][-1]


def _copied_sources() -> list[str]:
    sources = []
    for ins, args in _dockerfile():
        if ins == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            sources.extend(p.rstrip("/") for p in parts[:-1])
    return sources


def _job_spec(doc: dict[str, Any]) -> tuple[Any, int]:
    """The validated run spec an entrypoint runs, and how many runs go at once."""
    args = _parse(_entrypoint(doc)[1:])
    if args.verb == "score":
        from raycurv.commands.score import build_spec

        return build_spec(args), 1
    if args.verb == "sweep":
        from raycurv.sweep import load_sweep_file, training_points, trial_spec

        sweep = load_sweep_file(_repo_path(args.config), args.sweep_dir)
        return trial_spec(sweep, training_points(sweep)[0], args.sweep_dir), sweep.max_concurrent
    pytest.fail(f"no check for `raycurv {args.verb}` entrypoints yet")


def _repo_path(image_path: str) -> Path:
    """The repository file an absolute path in the image comes from."""
    workdir = _workdir().rstrip("/") + "/"
    assert image_path.startswith(workdir), f"{image_path} is not under the image's {workdir}"
    return ROOT / image_path[len(workdir):]


@pytest.mark.parametrize(("where", "doc"), JOBS, ids=_ids(JOBS))
def test_files_an_entrypoint_names_are_in_the_image(where, doc):
    args = _parse(_entrypoint(doc)[1:])
    config = getattr(args, "config", None)
    if config is None:
        return
    relative = _repo_path(config).relative_to(ROOT)
    assert (ROOT / relative).is_file(), relative
    copied = [s for s in _copied_sources()
              if str(relative) == s or str(relative).startswith(s + "/")]
    assert copied, f"deploy/Dockerfile does not copy {relative}"


@pytest.mark.parametrize(("where", "doc"), JOBS, ids=_ids(JOBS))
def test_job_runs_what_its_cluster_holds(where, doc):
    from raycurv.data.sources import SOURCES
    from raycurv.models import MODELS

    spec, concurrent = _job_spec(doc)
    assert spec.data.dataset in SOURCES and spec.train.model in MODELS
    t, c = spec.train, spec.curvature
    gpus = concurrent * (t.workers * t.gpus_per_worker + c.actors * c.actor_gpus)
    cpus = concurrent * (t.workers * t.cpus_per_worker + c.actors * c.actor_cpus)
    pods = []  # (CPUs, GPUs) of each worker pod present from the start (check_resources needs them)
    for group in _cluster_spec(doc)["workerGroupSpecs"]:
        limits = _ray_container(group)["resources"]["limits"]
        params = group.get("rayStartParams", {})
        pod = (float(params.get("num-cpus", _quantity(limits["cpu"]))),
               float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))))
        pods += [pod] * group["minReplicas"]
    assert gpus > 0, "a GPU job"
    assert sum(p[1] for p in pods) >= gpus, f"{where}: needs {gpus} GPUs"
    assert sum(p[0] for p in pods) >= cpus, f"{where}: needs {cpus} CPUs"
    assert any(p[1] >= max(t.gpus_per_worker, c.actor_gpus) and p[0] >= t.cpus_per_worker
               for p in pods), f"{where}: no pod fits one trainer"
    head = _ray_container(_cluster_spec(doc)["headGroupSpec"])
    assert not any(k.endswith("/gpu") for k in head["resources"]["limits"]), "a CPU head"
    for group in _cluster_spec(doc)["workerGroupSpecs"]:
        if "nvidia.com/gpu" in _ray_container(group)["resources"]["limits"]:
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), where


def _mounts(doc: dict[str, Any]) -> dict[str, list[tuple[str, str, bool]]]:
    """Group -> (mount path, PVC claim, read-only) of the Ray container's volumes."""
    out = {}
    for name, group in _groups(doc):
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        out[name] = [(m["mountPath"], volumes[m["name"]]["persistentVolumeClaim"]["claimName"],
                      bool(m.get("readOnly")))
                     for m in _ray_container(group).get("volumeMounts", [])
                     if "persistentVolumeClaim" in volumes.get(m["name"], {})]
    return out


def _pvc_names() -> set[str]:
    return {d["metadata"]["name"] for _, d in _of_kind("PersistentVolumeClaim")}


def _on_shared_volume(doc: dict[str, Any], path: str, *, writable: bool, groups: list[str]) -> None:
    if "://" in path:  # an object-store URI: every pod reaches it the same way
        return
    for group, mounts in _mounts(doc).items():
        if group not in groups:
            continue
        hits = [m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")]
        assert hits, f"{path} is not on a volume mounted in the {group}"
        assert hits[0][1] in _pvc_names(), f"{hits[0][1]} is no PVC of k8s/"
        assert not (writable and hits[0][2]), f"{path} is read-only in the {group}"


@pytest.mark.parametrize(("where", "doc"), JOBS, ids=_ids(JOBS))
def test_job_reads_and_writes_shared_storage_on_every_node(where, doc):
    spec, _ = _job_spec(doc)
    args = _parse(_entrypoint(doc)[1:])
    everywhere = [name for name, _ in _groups(doc)]
    for path in (spec.data.data_root, spec.run_dir, getattr(args, "sweep_dir", None)):
        if path:
            _on_shared_volume(doc, path, writable=True, groups=everywhere)


@pytest.mark.parametrize(("where", "doc"), JOBS, ids=_ids(JOBS))
def test_job_cluster_goes_away_after_the_job(where, doc):
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 <= spec.get("ttlSecondsAfterFinished", 0) <= 3600
    assert not spec.get("suspend")
    assert spec.get("activeDeadlineSeconds", 1) > 0


# --- the Serve config and the RayService ------------------------------------------------------

SERVICES = _of_kind("RayService")
# Where the RayService's serveConfigV2 may differ from deploy/serve.yaml, and what it must hold.
CLUSTER_ONLY = {("http_options", "host"): "0.0.0.0", ("proxy_location",): "EveryNode",
                ("applications", 0, "args", "runs"): None}


def _serve_configs() -> list[tuple[str, dict[str, Any]]]:
    configs = [("deploy/serve.yaml", yaml.safe_load(SERVE_YAML.read_text()))]
    for where, doc in SERVICES:
        configs.append((f"{where} serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return configs


SERVE_CONFIGS = _serve_configs()


def _models_in(annotation: Any) -> list[type]:
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def unknown_keys(data: Any, model: type, where: str = "") -> list[str]:
    """Keys of ``data`` that pydantic ``model`` (recursively) has no field for. Ray Serve's config
    schemas accept and ignore unknown keys, so a misspelled option would go unnoticed."""
    if isinstance(data, list):
        return [k for i, item in enumerate(data) for k in unknown_keys(item, model, f"{where}{i}.")]
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = {name: name for name in fields} | {f.alias: n for n, f in fields.items() if f.alias}
    found = []
    for key, value in data.items():
        if key not in names:
            found.append(f"{where}{key}")
            continue
        if key == "args":  # the app builder validates these (ServeSettings forbids extras)
            continue
        models = _models_in(fields[names[key]].annotation)
        if len(models) == 1:
            found += unknown_keys(value, models[0], f"{where}{key}.")
    return found


@pytest.mark.parametrize(("where", "config"), SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_serve_config_parses_with_ray_serves_schema(where, config):
    from ray.serve.schema import ServeDeploySchema

    parsed = ServeDeploySchema.model_validate(config)
    assert [a.import_path for a in parsed.applications] == ["raycurv.serve.app:app_builder"]
    assert parsed.applications[0].route_prefix == "/"  # /healthz and /metrics at the root
    assert unknown_keys(config, ServeDeploySchema) == []


def test_unknown_serve_keys_are_found():
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(SERVE_CONFIGS[0][1])
    config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 4
    config["http_option"] = {}
    assert sorted(unknown_keys(config, ServeDeploySchema)) == [
        "applications.0.deployments.0.autoscaling_config.max_replica", "http_option"]


def _drop(config: dict[str, Any], path: tuple) -> Any:
    *parents, last = path
    node = config
    for part in parents:
        node = node[part]
    return node.pop(last, None)


@pytest.mark.parametrize(("where", "doc"), SERVICES, ids=_ids(SERVICES))
def test_serve_configs_agree(where, doc):
    local = copy.deepcopy(SERVE_CONFIGS[0][1])
    cluster = yaml.safe_load(doc["spec"]["serveConfigV2"])
    for path, expected in CLUSTER_ONLY.items():
        _drop(local, path)
        value = _drop(cluster, path)
        if expected is not None:
            assert value == expected, f"{path}: {value!r}"
    assert cluster == local, "serveConfigV2 and deploy/serve.yaml differ beyond CLUSTER_ONLY"


@pytest.mark.parametrize(("where", "config"), SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_import_path_builds_the_app_with_the_configs_options(where, config, monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app
    from ray.serve._private.deploy_utils import deploy_args_to_deployment_info
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setenv("RAYCURV_SERVE_TOKEN", "from-the-secret")
    app_config = ServeDeploySchema.model_validate(config).applications[0]
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_config.import_path),
                                                       app_config.args)
    built = build_app(app, name=app_config.name, default_runtime_env={})
    built.validate_single_fastapi_ingress()
    (deployment,) = built.deployments
    settings = deployment.init_args[0]
    assert settings.token.get_secret_value() == "from-the-secret"  # the Secret reaches the app
    assert settings.runs == config["applications"][0]["args"]["runs"]

    infos = {deployment.name: deploy_args_to_deployment_info(  # as Serve's controller does
        deployment_name=deployment.name,
        deployment_config_proto_bytes=deployment._deployment_config.to_proto_bytes(),
        replica_config_proto_bytes=deployment._replica_config.to_proto_bytes(),
        deployer_job_id="test", app_name=app_config.name, ingress=True, route_prefix="/")}
    info = override_deployment_info(infos, app_config)[deployment.name]
    options = config["applications"][0]["deployments"][0]
    scaling = info.deployment_config.autoscaling_config
    assert scaling.min_replicas == options["autoscaling_config"]["min_replicas"]
    assert scaling.max_replicas == options["autoscaling_config"]["max_replicas"]
    assert info.deployment_config.health_check_period_s == options["health_check_period_s"]
    assert info.deployment_config.health_check_timeout_s == options["health_check_timeout_s"]
    assert info.replica_config.ray_actor_options["num_cpus"] == settings.replica_cpus


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize(("where", "doc"), SERVICES, ids=_ids(SERVICES))
def test_rayservice_token_readiness_service_and_scaling(where, doc):
    from raycurv.serve.settings import TOKEN_ENV

    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = config["applications"][0]
    port = config["http_options"]["port"]
    cluster = _cluster_spec(doc)
    # the bearer token from a Secret, wherever Serve may build the app or run a replica
    secrets = set()
    for name, group in _groups(doc):
        token = _env(_ray_container(group)).get(TOKEN_ENV, {})
        ref = token.get("valueFrom", {}).get("secretKeyRef", {})
        assert ref.get("name") and ref.get("key"), f"{name}: {TOKEN_ENV} from a Secret"
        assert not ref.get("optional"), f"{name}: without the Secret the API would be open"
        assert "value" not in token, f"{name}: a token value in the manifest"
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1
    for _, monitor in _of_kind("ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            credentials = endpoint["authorization"]["credentials"]
            assert {(credentials["name"], credentials["key"])} == secrets
    # the Service: port "serve" of the head container, where Serve listens
    head = _ray_container(cluster["headGroupSpec"])
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports["serve"] == port
    service = doc["spec"]["serveService"]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("serve", port)]
    # worker pods serve traffic once /healthz says a table is loaded
    assert doc["spec"].get("excludeHeadPodFromServeSvc") is True
    replica_cpus = float(app["args"].get("replica_cpus", 0.25))
    scaling = app["deployments"][0]["autoscaling_config"]
    workers = cluster["workerGroupSpecs"]
    for group in workers:
        container = _ray_container(group)
        probe = container["readinessProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert probe["path"] == "/healthz"
        assert ports.get(probe["port"], probe["port"]) == port
    # replicas fit the worker pods (the head runs none), and the pods scale with them
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    cpus = [_quantity(_ray_container(g)["resources"]["limits"]["cpu"]) for g in workers]
    assert sum(c * g["minReplicas"] for c, g in zip(cpus, workers, strict=True)) \
        >= scaling["min_replicas"] * replica_cpus
    assert sum(c * g["maxReplicas"] for c, g in zip(cpus, workers, strict=True)) \
        >= scaling["max_replicas"] * replica_cpus
    assert cluster.get("enableInTreeAutoscaling") is True
    assert any(g["maxReplicas"] > g["minReplicas"] for g in workers)
    assert scaling["min_replicas"] < scaling["max_replicas"]
    for path in app["args"]["runs"]:
        _on_shared_volume(doc, path, writable=False,
                          groups=[name for name, _ in _groups(doc) if name != "head"])


def test_monitors_select_what_the_manifests_expose():
    pod_monitors, service_monitors = _of_kind("PodMonitor"), _of_kind("ServiceMonitor")
    assert pod_monitors  # the lookup API's metrics come through Ray's export too
    for _, monitor in pod_monitors:  # KubeRay labels every Ray pod ray.io/is-ray-node=yes
        assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
        ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
        for where, doc in RAY_MANIFESTS:
            for name, group in _groups(doc):
                container = _ray_container(group)
                named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
                assert ports <= set(named), f"{where} {name}: no port {ports}"
                annotations = group["template"].get("metadata", {}).get("annotations", {})
                assert annotations.get("prometheus.io/scrape") == "true", f"{where} {name}"
                assert int(annotations["prometheus.io/port"]) == named["metrics"]
    for _, monitor in service_monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [d for _, d in SERVICES
                   if selector.items() <= d["spec"]["serveService"]["metadata"]["labels"].items()]
        assert matched, f"ServiceMonitor selects no serveService: {selector}"
        for endpoint in monitor["spec"]["endpoints"]:
            assert (endpoint["port"], endpoint["path"]) == ("serve", "/metrics")


# --- the image --------------------------------------------------------------------------------

def _readme_install_line() -> str:
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not on this branch")
    # the users' line ends in `-e .` (the tests' line in `-e ".[test]"`)
    found = re.findall(r"(pip install (?:[^\s`]+ )*?-e \.)(?=$|[\s`])", readme.read_text(), re.M)
    assert found, "README.md has no `pip install ... -e .` line"
    return found[0]


def test_dockerfile_install_line_is_the_readmes():
    line = _readme_install_line()
    runs = [args for ins, args in _dockerfile() if ins == "RUN"]
    assert any(line in run for run in runs), f"no RUN of deploy/Dockerfile holds `{line}`"


def _args_defaults() -> dict[str, str]:
    out = {}
    for ins, args in _dockerfile():
        if ins == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            out.setdefault(name, value)
    return out


def test_dockerfile_builds_on_the_official_ray_image_of_the_manifests():
    froms = [args for ins, args in _dockerfile() if ins == "FROM"]
    assert froms == ["rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}"]
    defaults = _args_defaults()
    assert defaults["VARIANT"] in ("cpu", "gpu")
    assert "$VARIANT" in " ".join(a for i, a in _dockerfile() if i == "RUN")  # CPU wheels for cpu
    minimum = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    python = re.fullmatch(r"py3(\d+)", defaults["PYTHON_TAG"])
    assert python and int(python.group(1)) >= int(re.search(r"3\.(\d+)", minimum).group(1))
    versions = {_cluster_spec(d)["rayVersion"] for _, d in RAY_MANIFESTS}
    assert versions == {defaults["RAY_VERSION"]}, "image and manifests must run one Ray version"


def test_dockerfile_runs_as_a_non_root_user_and_copies_what_exists():
    instructions = _dockerfile()
    users = [(i, args) for i, (ins, args) in enumerate(instructions) if ins == "USER"]
    assert users, "no USER"
    last_user = users[-1][1].split(":")[0]
    assert last_user not in ("root", "0"), last_user
    first_install = next(i for i, (ins, args) in enumerate(instructions)
                         if ins == "RUN" and "pip install" in args)
    assert users[0][0] < first_install, "install as the image's user, not root"
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    for source in _copied_sources():
        if source == "README.md" and not (ROOT / source).exists():
            continue  # pyproject's readme; test_dockerfile_install_line_is_the_readmes says more
        assert (ROOT / source).exists(), source
        assert any(line.startswith(f"!{source}") for line in ignore), \
            f"deploy/Dockerfile.dockerignore keeps {source} out of the build context"
    for needed in ("pyproject.toml", "README.md", "raycurv"):
        assert needed in _copied_sources(), needed
