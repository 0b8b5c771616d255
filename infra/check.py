"""Offline checks of everything under infra/: no Ray, network or kubectl needed.

    python infra/check.py     prints one line per problem and exits 1, or one "ok" line and exits 0

Offline there is no Kubernetes schema, so each check is a small function that returns a list of
problems (one line each).  What is checked: every YAML file parses and has the expected kinds;
the jobs/*.py and jobs/specs/*.yaml that any file names exist (absolute paths are the image's);
each cluster job's spec loads with its --set values, uses shared storage and fits its GPU group;
every image tag and rayVersion is the `ray==` of constraints.txt, which pyproject.toml admits; no
inline credentials; the KubeRay fields; schedules that cannot overlap; the launcher config against
Ray's own ray-schema.json; the RayService's serveConfigV2 against Ray Serve's own schema, and its
application (see below); the Dockerfile; `bash -n` on the scripts; the README names every file.
The KubeRay field lists come from the Go types of KubeRay 1.6.0 (ray-operator/apis/ray/v1), the
oldest operator these manifests support.  tests/test_infra.py runs this on the real files and on
broken copies of them, so that each check is seen to fail.

Workers.  A job runs cluster.workers_range = (cluster.min_workers, cluster.num_workers) Ray Train
workers of 1 GPU each; it is elastic when the first is smaller.  A GPU group's GPUs at a count are
the sum over groups that limit nvidia.com/gpu of count x GPUs per pod x numOfHosts.  The rules:
  - an elastic job has cluster.max_failures >= 1 (in Ray Train 2.60 a lost worker or node fails the
    worker group: with 0 the run ends instead of going on with fewer workers), and its cluster has
    enableInTreeAutoscaling: true;
  - a cluster of the job's own (RayJob, RayCronJob) has, at minReplicas, exactly cluster.min_workers
    GPUs and, at maxReplicas, exactly cluster.num_workers: the floor the autoscaler keeps is the
    fewest the run goes on with, and a GPU above the most would never be used (so GPU replicas vary
    only for an elastic job, and the rule above gives them the autoscaler, without which KubeRay
    keeps `replicas` pods and ignores the range);
  - a shared cluster (the RayCluster that the CronJob submits to) holds cluster.num_workers GPUs at
    maxReplicas (at replicas without autoscaling); its minReplicas is free: it scales from 0 between
    runs;
  - the launcher's GPU node types (GPU instances; resources.GPU per node where set, else 1) hold the
    largest cluster.num_workers of the jobs above at their max_workers, the top-level max_workers
    (default 2) allows as many nodes, and each type has min_workers <= max_workers; their
    min_workers is free, as for the shared RayCluster.

Serving.  A RayService runs charnn.serve:app (every import_path is a module of the charnn package,
which the image installs, and the file defines the name); its args are the builder's (model,
storage, endpoint_url and ServeConfig's fields), storage is shared storage where a retrain job
here publishes that model (its run.storage and retrain.model), no value carries credentials; the
route prefix is "/" (charnn.serve routes on the full path); the containers' `serve` port is Serve's
HTTP port (KubeRay makes the serve Service and the workers' readiness probe from it); and the
replicas' CPUs fit the cluster (its size at maxReplicas when it autoscales).  No GPU group needed.
"""
from __future__ import annotations

import dataclasses
import ast
import datetime
import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import jsonschema
import yaml
from packaging.requirements import Requirement
from pydantic import ValidationError

from charnn.config import ServeConfig
from charnn.spec_loader import SpecError, load_spec
from charnn.storage import redact

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
IMAGE_ROOT = "/home/ray/charnn/"  # where infra/docker/Dockerfile puts the repository
SERVICE_ACCOUNT = "charnn-ray"  # infra/kuberay/serviceaccount.yaml

# Every YAML file under infra/ and the (apiVersion, kind) of its documents, or what it is.
EXPECTED = {
    "kuberay/serviceaccount.yaml": [("v1", "ServiceAccount")],
    "kuberay/raycluster.yaml": [("ray.io/v1", "RayCluster")],
    "kuberay/rayjob-train.yaml": [("ray.io/v1", "RayJob")],
    "kuberay/raycronjob-retrain.yaml": [("ray.io/v1", "RayCronJob")],
    "kuberay/rayservice-generate.yaml": [("ray.io/v1", "RayService")],
    "kubernetes/cronjob-submit.yaml": [("batch/v1", "CronJob")],
    "kuberay/operator-values.yaml": "helm values of the kuberay-operator chart",
    "cluster-launcher/aws.yaml": "ray up cluster config",
}
# The other files that must be there, and what some of them must contain.
TEXT_NEEDS = {
    "README.md": [],
    "local-cluster.sh": [],
    "local-schedule.sh": [(r"python jobs/retrain\.py", "submit `python jobs/retrain.py`")],
    "docker/Dockerfile": [
        (r"(?m)^ARG RAY_IMAGE=rayproject/ray:\S+$", "ARG RAY_IMAGE=rayproject/ray:<tag> (the base image)"),
        (r"(?m)^FROM \$\{RAY_IMAGE\}", "FROM ${RAY_IMAGE}"),
        (f"WORKDIR {re.escape(IMAGE_ROOT.rstrip('/'))}", f"WORKDIR {IMAGE_ROOT.rstrip('/')}"),
        (r"pip install .*-c constraints\.txt", "pip install -c constraints.txt (the pinned dependencies)"),
    ],
}
RUNS = {"RayJob": "jobs/train.py", "RayCronJob": "jobs/retrain.py", "CronJob": "jobs/retrain.py"}

# Field names of KubeRay 1.6.0's types.  A misspelt or unsupported field is not an error there:
# the API server prunes it silently (concurrencyPolicy on a RayCronJob, for one).
RAYCLUSTER_SPEC_KEYS = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                        "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                        "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_GROUP_KEYS = {"template", "headService", "enableIngress", "resources", "labels", "rayStartParams",
                   "serviceType"}
WORKER_GROUP_KEYS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
                    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
                    "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend"}
RAYCRONJOB_SPEC_KEYS = {"jobTemplate", "schedule", "suspend"}  # timeZone: KubeRay >= 1.7 only
RAYSERVICE_SPEC_KEYS = {"rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold",  # suspend: >= 1.7
                        "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy", "managedBy",
                        "serveConfigV2", "rayClusterConfig", "excludeHeadPodFromServeSvc"}
CRONJOB_SPEC_KEYS = {"schedule", "timeZone", "startingDeadlineSeconds", "concurrencyPolicy", "suspend",
                     "jobTemplate", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"}
MAX_RAYJOB_NAME = 47  # KubeRay names the RayJob's cluster <name>-<5 characters>, <= 53
MAX_RAYCRONJOB_NAME = 36  # KubeRay 1.7: <name>-<minutes since the epoch> must be a valid RayJob name
MAX_RAYSERVICE_NAME = 47  # KubeRay's MaxRayServiceNameLength: its clusters are <name>-<5 characters>
PACKAGE = "charnn"  # the one package that the image installs (pyproject.toml's packages.find)
SERVE_APP = ("charnn.serve", "app")  # the application builder: module, name
SERVE_ARGS = {"model", "storage", "endpoint_url"} | {f.name for f in dataclasses.fields(ServeConfig)}
SERVE_REPLICA_CPUS = 1  # charnn.serve's ray_actor_options
SECRET_ENV = {"RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, when PyYAML has it: 10 times faster
GPU_INSTANCE = re.compile(r"^(g4dn|g4ad|g5|g5g|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.")


class Context(NamedTuple):
    """What the checks of one file need to know about the rest of the repository."""
    repo: Path
    ray: str  # the ray== pin of constraints.txt
    project: str  # charnn's version, in the image tag
    cluster: dict  # the long-lived RayCluster, that the CronJob submits to
    largest: int = 0  # the most workers (cluster.num_workers) of any cluster job here
    publishes: frozenset = frozenset()  # (run.storage, retrain.model) of every retrain job here


# ---------------------------------------------------------------- reading documents

def get(node: Any, *path: str | int, default: Any = None) -> Any:
    """node[path[0]][path[1]]..., or `default` where a key is missing or a value is not a container."""
    for key in path:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node):
            node = node[key]
        else:
            return default
    return default if node is None else node


def walk(node: Any) -> Iterator[Any]:
    """`node` and everything in it, mapping keys included."""
    yield node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(key)
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def text_files(infra: Path) -> list[Path]:
    """The files under infra/ that the text checks read (this checker aside)."""
    return sorted(p for p in infra.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p != infra / "check.py")


def load_yaml(infra: Path) -> tuple[dict[str, list[Any]], list[str]]:
    """{path under infra/: its documents} of every YAML file, and the problems of reading them."""
    docs, problems = {}, []
    for path in sorted(p for p in infra.rglob("*") if p.suffix in (".yaml", ".yml")):
        rel = path.relative_to(infra).as_posix()
        try:
            docs[rel] = [d for d in yaml.load_all(path.read_text(), Loader=SAFE_LOADER) if d is not None]
        except yaml.YAMLError as exc:
            problems.append(f"infra/{rel}: does not parse: {' '.join(str(exc).split())}")
    return docs, problems


# ---------------------------------------------------------------- the whole tree

def check(infra: Path = INFRA, repo: Path = REPO) -> list[str]:
    """Every problem under `infra`, one line each, starting with the file it is in."""
    ray, problems = check_pins(repo)
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    docs, unreadable = load_yaml(infra)
    problems += unreadable + check_inventory(infra, docs)
    clusters = [d for ds in docs.values() for d in ds if isinstance(d, dict) and d.get("kind") == "RayCluster"]
    ctx = Context(repo, ray, project, clusters[0] if clusters else {})
    ctx = ctx._replace(largest=largest_job(docs, ctx), publishes=published_models(docs, ctx))
    for path in text_files(infra):
        rel = path.relative_to(infra).as_posix()
        problems += [f"infra/{rel}: {p}" for p in check_file(path, rel, ctx)]
    for rel, items in docs.items():
        problems += [f"infra/{rel}: {p}" for doc in items if isinstance(doc, dict) for p in check_doc(rel, doc, ctx)]
    return list(dict.fromkeys(problems))  # the text and the document checks can report one thing twice


def check_pins(repo: Path) -> tuple[str, list[str]]:
    """The ray== pin of constraints.txt, and whether pyproject.toml's ray requirement admits it."""
    pins = re.findall(r"(?im)^ray==([0-9][^\s;#]*)", (repo / "constraints.txt").read_text())
    if len(pins) != 1:
        return "", [f"constraints.txt: should pin ray exactly once, found {pins}"]
    dependencies = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = [r for r in map(Requirement, dependencies) if r.name == "ray"]
    if len(ray) != 1 or not ray[0].specifier.contains(pins[0]):
        return pins[0], [f"pyproject.toml: its ray requirement {[str(r) for r in ray]} should admit ray=={pins[0]}"]
    return pins[0], []


def check_inventory(infra: Path, docs: dict[str, list[Any]]) -> list[str]:
    """The files that should be there are, every YAML file is in EXPECTED, the README names every file."""
    problems = [f"infra/{rel}: missing" for rel in [*EXPECTED, *TEXT_NEEDS] if not (infra / rel).is_file()]
    problems += [f"infra/{rel}: not classified in infra/check.py's EXPECTED" for rel in docs if rel not in EXPECTED]
    for rel, kinds in EXPECTED.items():
        problems += [f"infra/{rel}: {p}" for p in check_kinds(docs.get(rel), kinds)]
    readme = (infra / "README.md").read_text() if (infra / "README.md").is_file() else ""
    problems += [f"infra/README.md: does not mention {p.relative_to(infra).as_posix()}" for p in text_files(infra)
                 if p.name != "README.md" and p.relative_to(infra).as_posix() not in readme]
    return problems


def check_kinds(docs: list[Any] | None, kinds: list[tuple[str, str]] | str) -> list[str]:
    if not docs or not all(isinstance(d, dict) for d in docs):
        return [] if docs is None else ["should hold mappings"]  # a missing file is reported already
    if isinstance(kinds, str):
        return [f"{kinds}, not a Kubernetes object: no kind"] if any("kind" in d for d in docs) else []
    found = [(d.get("apiVersion"), d.get("kind")) for d in docs]
    problems = [] if found == kinds else [f"holds {found}, should hold {kinds}"]
    return problems + ["metadata.name: missing" for d in docs if not get(d, "metadata", "name")]


def check_file(path: Path, rel: str, ctx: Context) -> list[str]:
    """The checks on the text of any file: named files, image tags, credentials; and per kind of file."""
    text = path.read_text()
    problems = check_referenced_files(text, ctx.repo) + check_versions_in_text(text, ctx.ray, ctx.project)
    problems += check_credentials_in_text(text)
    problems += [f"should have {what}" for pattern, what in TEXT_NEEDS.get(rel, []) if not re.search(pattern, text)]
    if path.suffix == ".sh":
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        problems += [f"bash -n: {' '.join(result.stderr.split())}"] if result.returncode else []
        problems += [] if path.stat().st_mode & 0o111 else ["not executable"]
    return problems


def check_doc(rel: str, doc: dict, ctx: Context) -> list[str]:
    """The checks on one YAML document, by file or by kind."""
    kind = doc.get("kind")
    problems = check_versions_in_doc(doc, ctx.ray, ctx.project) + check_credentials_in_doc(doc)
    if rel == "kuberay/operator-values.yaml":
        problems += check_operator_values(doc)
    elif rel == "cluster-launcher/aws.yaml":
        problems += check_launcher(doc, ctx.largest)
    elif kind == "ServiceAccount":
        problems += check_service_account(doc)
    elif kind == "RayCluster":
        problems += check_raycluster(doc)
    elif kind == "RayJob":
        problems += check_name(doc, MAX_RAYJOB_NAME) + check_rayjob_spec(doc.get("spec"), "spec")
    elif kind == "RayCronJob":
        problems += check_name(doc, MAX_RAYCRONJOB_NAME) + check_raycronjob(doc)
    elif kind == "CronJob":
        problems += check_cronjob(doc) + check_submitter(doc, ctx.cluster)
    elif kind == "RayService":
        problems += check_name(doc, MAX_RAYSERVICE_NAME) + check_rayservice(doc, ctx)
    if kind in RUNS:
        problems += check_submission(doc, ctx)
    return problems


# ---------------------------------------------------------------- files named, jobs run

REPO_FILE = re.compile(r"(?<![\w.-])((?:/[\w.-]+)*/)?(jobs/[\w.-]+(?:/[\w.-]+)*\.(?:py|ya?ml))(?![\w.-])")


def check_referenced_files(text: str, repo: Path) -> list[str]:
    """Every jobs/*.py and jobs/specs/*.yaml named in `text` exists; absolute paths are the image's."""
    problems = []
    for m in REPO_FILE.finditer(text):
        prefix, rel = m.group(1), m.group(2)
        if prefix and prefix != IMAGE_ROOT:
            problems.append(f"{prefix}{rel}: absolute paths to the repository must start with {IMAGE_ROOT}")
        if not (repo / rel).is_file():
            problems.append(f"{rel} does not exist in the repository")
    return problems


def python_commands(text: str) -> list[list[str]]:
    """The argv of each `python .../jobs/X.py ...` command in a shell string."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        for m in re.finditer(r"(?<![\w/.-])python3?\s+\S*jobs/[\w.-]+\.py", line):
            lexer = shlex.shlex(line[m.start():], posix=True, punctuation_chars=";&|()")
            lexer.whitespace_split = True
            argv = []
            for token in lexer:
                if token and set(token) <= set(";&|()"):
                    break
                argv.append(token)
            commands.append(argv)
    return commands


def job_arguments(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """(script, --spec, [--set values]) of a jobs/*.py command line."""
    spec, overrides, args = None, [], iter(argv[2:])
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in ("--spec", "--set"):
            value = value if eq else next(args, "")
            if name == "--spec":
                spec = value
            else:
                overrides.append(value)
    return argv[1], spec, overrides


def submission(doc: dict, long_lived: dict) -> tuple[str, str, dict]:
    """Where a RayJob, RayCronJob or CronJob holds its command, the command, and the cluster that runs it."""
    if doc.get("kind") == "RayJob":
        return "spec.entrypoint", get(doc, "spec", "entrypoint", default=""), get(doc, "spec", "rayClusterSpec")
    if doc.get("kind") == "RayCronJob":
        template = get(doc, "spec", "jobTemplate", default={})
        return "spec.jobTemplate.entrypoint", get(template, "entrypoint", default=""), get(template, "rayClusterSpec")
    container = get(doc, "spec", "jobTemplate", "spec", "template", "spec", "containers", 0, default={})
    lines = (container.get("command") or []) + (container.get("args") or [])
    return "the container's command and args", "\n".join(map(str, lines)), get(long_lived, "spec")


def check_submission(doc: dict, ctx: Context) -> list[str]:
    """The one job that the document submits: the right script, its spec, storage and GPU group."""
    where, text, cluster = submission(doc, ctx.cluster)
    commands = python_commands(text)
    if len(commands) != 1:
        return [f"{where}: should be one `python .../jobs/X.py --spec ...` command"]
    argv, script = commands[0], RUNS[doc["kind"]]
    right = argv[1] == script or argv[1].endswith("/" + script)
    problems = [] if right else [f"{where}: runs {argv[1]}, should run {script}"]
    return problems + check_job_command(argv, ctx.repo, cluster or {}, doc["kind"] != "CronJob")


def load_job_spec(argv: list[str], repo: Path) -> tuple[str, Any, list[str]]:
    """A job command's script, its spec loaded with its --set values (None where it does not load),
    and the problem, if any."""
    script, spec_path, overrides = job_arguments(argv)
    if spec_path is None:
        return script, None, [f"{script}: no --spec"]
    path = repo / spec_path.removeprefix(IMAGE_ROOT)
    if not path.is_file():
        return script, None, []  # check_referenced_files reports it
    try:
        return script, load_spec(str(path), overrides), []
    except SpecError as exc:
        return script, None, [f"{script}: the spec does not load: {exc}"]


def job_specs(docs: dict[str, list[Any]], ctx: Context) -> Iterator[tuple[str, Any]]:
    """(script, spec loaded with its --set values) of every cluster job here whose spec loads."""
    for doc in (d for ds in docs.values() for d in ds if isinstance(d, dict) and d.get("kind") in RUNS):
        commands = python_commands(submission(doc, ctx.cluster)[1])
        script, spec, _ = load_job_spec(commands[0], ctx.repo) if len(commands) == 1 else ("", None, [])
        if spec is not None:
            yield script, spec


def largest_job(docs: dict[str, list[Any]], ctx: Context) -> int:
    """The most GPU workers (cluster.num_workers) that a cluster job here asks for; 0 when none loads."""
    return max((s.cluster.num_workers for _, s in job_specs(docs, ctx) if s.cluster.use_gpu), default=0)


def published_models(docs: dict[str, list[Any]], ctx: Context) -> frozenset:
    """(run.storage, retrain.model) of every jobs/retrain.py here: the registries that it publishes to."""
    return frozenset((s.run.storage.rstrip("/"), s.retrain.model) for script, s in job_specs(docs, ctx)
                     if script.endswith("jobs/retrain.py"))


def is_shared(path: str) -> bool:
    """A URL that every node reaches (file:// is local)."""
    return "://" in path and not path.startswith("file://")


def check_job_command(argv: list[str], repo: Path, cluster: dict, own: bool) -> list[str]:
    """A cluster job's command: its spec loads with its --set values, every path it reads or writes
    is shared storage, and it fits the GPU group of `cluster` (a RayCluster spec, or {}; `own`: the
    job's own cluster, else a shared one)."""
    script, spec, problems = load_job_spec(argv, repo)
    if spec is None:
        return problems
    shared = [("run.storage", spec.run.storage), ("data.dataset_root", spec.data.dataset_root)]
    problems = [f"{script}: {key} {value!r} is not shared storage (a URL such as s3://...)"
                for key, value in shared + [("data.sources", s) for s in spec.data.sources]
                if not is_shared(value)]
    fewest, most = spec.cluster.workers_range
    if fewest < most and spec.cluster.max_failures < 1:
        problems.append(f"{script}: elastic (cluster.min_workers {fewest} < cluster.num_workers {most}) needs "
                        f"cluster.max_failures >= 1: in Ray Train a lost worker fails the worker group")
    if not cluster:
        return problems
    if not spec.cluster.use_gpu:
        return problems + [f"{script}: runs on a GPU group but cluster.use_gpu is false"]
    problems += check_workers(script, spec.cluster.workers_range, cluster, own)
    groups = gpu_groups(cluster)
    pod_cpus = cpus(groups[0]) if groups else None
    if pod_cpus is not None and spec.cluster.cpus_per_worker > pod_cpus:
        problems.append(f"{script}: cluster.cpus_per_worker {spec.cluster.cpus_per_worker:g} > the GPU pod's "
                        f"{pod_cpus:g} CPUs")
    return problems


def check_workers(script: str, workers: tuple[int, int], cluster: dict, own: bool) -> list[str]:
    """A job's (min_workers, num_workers) against the GPU groups of the cluster that runs it: exactly
    minReplicas and maxReplicas for a cluster of its own, within a shared one (see the module docstring)."""
    (fewest, most), problems = workers, []
    if fewest < most and cluster.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{script}: elastic (cluster.min_workers {fewest} < cluster.num_workers {most}) needs "
                        f"enableInTreeAutoscaling: true (without it KubeRay keeps `replicas` GPU pods)")
    if not own:
        capacity = gpu_capacity(cluster)
        return problems + ([f"{script}: cluster.num_workers {most} > the GPU group's {capacity} GPUs"]
                           if most > capacity else [])
    floor, ceiling = gpu_count(cluster, "minReplicas"), gpu_count(cluster, "maxReplicas")
    if floor != fewest:
        problems.append(f"{script}: the GPU group has {floor} GPUs at minReplicas, should have cluster.min_workers "
                        f"{fewest} (the fewest workers the run goes on with; null: cluster.num_workers)")
    if ceiling != most:
        problems.append(f"{script}: the GPU group has {ceiling} GPUs at maxReplicas, should have "
                        f"cluster.num_workers {most} (one worker per GPU)")
    return problems


# ---------------------------------------------------------------- versions and credentials

def check_image(image: str, ray: str, project: str) -> list[str]:
    """rayproject/ray:<ray>-...; or the project image .../charnn:<project>-ray<ray>-... ."""
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    if not tag or tag == "latest":
        return [f"{image}: pin a tag, not latest or none"]
    if name.endswith("rayproject/ray"):
        ok, want = tag == ray or tag.startswith(f"{ray}-"), f"the pinned Ray {ray}"
    elif name.endswith("/charnn"):
        ok, want = tag == f"{project}-ray{ray}" or tag.startswith(f"{project}-ray{ray}-"), f"{project}-ray{ray}-"
    else:
        return [f"{image}: not rayproject/ray nor the charnn image"]
    return [] if ok else [f"{image}: the tag should start with {want}"]


IMAGE_IN_TEXT = re.compile(r"((?:[\w.-]+(?::\d+)?/)*(?:rayproject/ray|charnn)):([\w.-]*)")


def check_versions_in_text(text: str, ray: str, project: str) -> list[str]:
    """The image references in a text (not a bare "charnn:" in prose)."""
    return [p for m in IMAGE_IN_TEXT.finditer(text) if "/" in m.group(1) for p in check_image(m.group(0), ray, project)]


def check_versions_in_doc(doc: dict, ray: str, project: str) -> list[str]:
    problems = []
    for d in (n for n in walk(doc) if isinstance(n, dict)):
        problems += [p for key in ("image", "head_image", "worker_image") if isinstance(d.get(key), str)
                     for p in check_image(d[key], ray, project)]
        if "rayVersion" in d and str(d["rayVersion"]) != ray:
            problems.append(f"rayVersion {d['rayVersion']!r} != the pinned Ray {ray}")
    return problems


CREDENTIAL_TEXT = [
    (re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"), "an AWS access key id"),
    (re.compile(r"(?i)aws_secret_access_key\s*[=:]"), "an aws_secret_access_key setting"),
    (re.compile(r"(?i)aws_session_token\s*[=:]"), "an aws_session_token setting"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"RAY_AUTH_TOKEN\s*=\s*[\"']?(?![\"']?\$)[^\s\"']+"), "a literal RAY_AUTH_TOKEN"),
]


def check_credentials_in_text(text: str) -> list[str]:
    return [f"{what}: {m.group(0)[:12]}..." for pattern, what in CREDENTIAL_TEXT for m in pattern.finditer(text)]


def check_credentials_in_doc(doc: dict) -> list[str]:
    problems = []
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append(f"Secret {get(doc, 'metadata', 'name')}: values in a manifest; create it with kubectl")
    for node in walk(doc):
        if isinstance(node, dict) and node.get("name") in SECRET_ENV and "value" in node:
            problems.append(f"env {node['name']} has a literal value; use valueFrom.secretKeyRef")
        elif isinstance(node, str):  # what YAML quoting could hide from the text check
            problems += check_credentials_in_text(node)
    return problems


# ---------------------------------------------------------------- cron schedules

CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
               "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def cron_values(field: str, lo: int, hi: int) -> set[int]:
    """The numbers that one cron field (`*`, `5`, `1-5`, `*/15`, `0,30`, ...) allows."""
    values: set[int] = set()
    for part in field.split(","):
        span, slash, step = part.partition("/")
        if not re.fullmatch(r"\*|\d+(-\d+)?", span) or (slash and not step.isdigit()):
            raise ValueError(f"cron field {field!r}: numbers, ranges, * and /steps only")
        first, _, last = span.partition("-")
        if span == "*":
            first, last = lo, hi
        else:  # 5/15: from 5 to the end of the range
            first, last = int(first), int(last) if last else (hi if slash else int(first))
        if int(step or 1) < 1 or not lo <= first <= last <= hi:
            raise ValueError(f"cron field {field!r} is outside {lo}-{hi}")
        values.update(range(first, last + 1, int(step or 1)))
    return values


def cron_min_gap(schedule: str) -> float:
    """The shortest time in seconds between two runs of a 5-field cron schedule (UTC, no DST)."""
    fields = CRON_MACROS.get(schedule.strip(), schedule).split()
    if len(fields) != 5:
        raise ValueError(f"cron schedule {schedule!r} should have 5 fields")
    minutes, hours, days, months, weekdays = (cron_values(f, lo, hi) for f, (lo, hi) in zip(fields, CRON_RANGES))
    weekdays = {d % 7 for d in weekdays}
    both = fields[2].startswith("*") or fields[4].startswith("*")  # else cron runs when either day field matches
    run_days, start = [], datetime.date(2024, 1, 1)
    for offset in range(800):  # two years and more: every pairing of day of week and day of month
        day = start + datetime.timedelta(days=offset)
        by_date, by_weekday = day.day in days, (day.weekday() + 1) % 7 in weekdays
        if day.month in months and ((by_date and by_weekday) if both else (by_date or by_weekday)):
            run_days.append(offset)
    times = sorted(h * 60 + m for h in hours for m in minutes)
    within = min((b - a for a, b in zip(times, times[1:])), default=math.inf)
    across = min(((b - a) * 1440 + times[0] - times[-1] for a, b in zip(run_days, run_days[1:])), default=math.inf)
    return min(within, across) * 60


def check_schedule(schedule: Any, deadline: Any, where: str) -> list[str]:
    """A valid schedule, and a deadline (if any: the callers require one) that ends a run before the next."""
    if not isinstance(schedule, str) or not schedule.strip():
        return [f"{where}.schedule: missing"]
    try:
        gap = cron_min_gap(schedule)
    except ValueError as exc:
        return [f"{where}.schedule: {exc}"]
    if isinstance(deadline, int) and deadline >= gap:
        return [f"activeDeadlineSeconds {deadline} >= the {gap:.0f} s between runs of {schedule!r}: runs can overlap"]
    return []


# ---------------------------------------------------------------- pods and resources

def unknown(node: Any, allowed: set[str], where: str, api: str = "KubeRay 1.6.0",
            effect: str = "the API server would drop it silently") -> list[str]:
    if not isinstance(node, dict):
        return [f"{where}: not a mapping"]
    return [f"{where}.{k}: not a field of {api} ({effect})" for k in node if k not in allowed]


def pod_spec(group: dict) -> dict:
    return get(group, "template", "spec", default={})


def resources(group: dict, kind: str) -> dict:
    """The limits or requests of the first container of a group's pod."""
    return get(pod_spec(group), "containers", 0, "resources", kind, default={})


def quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gpus(group: dict) -> int:
    return int(quantity(resources(group, "limits").get("nvidia.com/gpu", 0)))


def cpus(group: dict) -> float | None:
    value = resources(group, "limits").get("cpu", resources(group, "requests").get("cpu"))
    return None if value is None else quantity(value)


def gpu_groups(cluster_spec: dict) -> list[dict]:
    return [g for g in cluster_spec.get("workerGroupSpecs") or [] if isinstance(g, dict) and gpus(g) > 0]


def gpu_count(cluster_spec: dict, key: str) -> int:
    """The GPUs of the cluster's GPU groups at their `key` (replicas, minReplicas or maxReplicas)."""
    return sum(int(g.get(key) or 0) * gpus(g) * int(g.get("numOfHosts") or 1) for g in gpu_groups(cluster_spec))


def gpu_capacity(cluster_spec: dict) -> int:
    """GPUs a job can get: maxReplicas when the cluster autoscales, else replicas."""
    return gpu_count(cluster_spec, "maxReplicas" if cluster_spec.get("enableInTreeAutoscaling") else "replicas")


def check_pod(spec: dict, where: str) -> list[str]:
    problems = []
    containers = spec.get("containers")
    if not containers or not all(isinstance(c, dict) and c.get("image") and c.get("name") for c in containers):
        problems.append(f"{where}: containers need a name and an image")
    if spec.get("serviceAccountName") != SERVICE_ACCOUNT:
        problems.append(f"{where}: serviceAccountName should be {SERVICE_ACCOUNT} (S3 through the pod's identity)")
    return problems


# ---------------------------------------------------------------- KubeRay

def check_raycluster(doc: dict) -> list[str]:
    """The long-lived RayCluster: its GPU workers scale from 0 between runs."""
    problems = check_raycluster_spec(doc.get("spec"), "spec")
    if get(doc, "spec", "enableInTreeAutoscaling") is not True:
        problems.append("spec.enableInTreeAutoscaling: should be true (GPU workers scale from 0 between runs)")
    return problems


def check_raycluster_spec(spec: Any, where: str, gpu: bool = True) -> list[str]:
    """A RayCluster's spec; `gpu`: it needs a GPU group (the training clusters)."""
    if not isinstance(spec, dict):
        return [f"{where}: not a mapping"]
    problems = unknown(spec, RAYCLUSTER_SPEC_KEYS, where)
    if not spec.get("rayVersion"):
        problems.append(f"{where}.rayVersion: missing")
    if get(spec, "authOptions", "mode") != "token":
        problems.append(f"{where}.authOptions.mode: should be token (Ray's token auth)")
    head = spec.get("headGroupSpec")
    problems += check_head(head, f"{where}.headGroupSpec") if isinstance(head, dict) else [
        f"{where}.headGroupSpec: missing"]
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{where}.workerGroupSpecs: missing"]
    for i, group in enumerate(groups):
        problems += check_worker_group(group, f"{where}.workerGroupSpecs[{i}]")
    if gpu and not gpu_groups(spec):
        problems.append(f"{where}.workerGroupSpecs: no group requests nvidia.com/gpu in its limits")
    return problems + [p for group in gpu_groups(spec) for p in check_gpu_group(group, where)]


def check_head(head: dict, where: str) -> list[str]:
    problems = unknown(head, HEAD_GROUP_KEYS, where)
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{where}: the dashboard must stay in-cluster (ClusterIP, no Ingress)")
    if not isinstance(head.get("rayStartParams", {}), dict):
        problems.append(f"{where}.rayStartParams: not a mapping")
    if gpus(head):
        problems.append(f"{where}: the head is a CPU node; no nvidia.com/gpu")
    return problems + check_pod(pod_spec(head), f"{where}.template.spec")


def check_worker_group(group: Any, where: str) -> list[str]:
    problems = unknown(group, WORKER_GROUP_KEYS, where)
    if not isinstance(group, dict):
        return problems
    if not group.get("groupName"):
        problems.append(f"{where}.groupName: missing")
    counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
    if not all(isinstance(c, int) for c in counts) or not 0 <= counts[0] <= counts[1] <= counts[2]:
        problems.append(f"{where}: needs 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
    return problems + check_pod(pod_spec(group), f"{where}.template.spec")


def check_gpu_group(group: dict, where: str) -> list[str]:
    """A GPU group asks for whole GPUs, tolerates the GPU nodes' taint and selects them."""
    problems, at, pod = [], f"{where}: group {group.get('groupName')}", pod_spec(group)
    requested = resources(group, "requests").get("nvidia.com/gpu")
    if requested is not None and quantity(requested) != gpus(group):
        problems.append(f"{at}: GPU requests differ from limits")
    if not any(isinstance(t, dict) and t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or []):
        problems.append(f"{at}: no toleration for the nvidia.com/gpu taint")
    if not pod.get("nodeSelector") and not pod.get("affinity"):
        problems.append(f"{at}: no nodeSelector or affinity for GPU nodes")
    return problems


def check_name(doc: dict, limit: int) -> list[str]:
    name = get(doc, "metadata", "name", default="")
    return [] if 0 < len(name) <= limit else [f"{doc.get('kind')} name {name!r}: 1 to {limit} characters"]


def check_rayjob_spec(spec: Any, where: str) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: not a mapping"]
    problems = unknown(spec, RAYJOB_SPEC_KEYS, where)
    if bool(spec.get("rayClusterSpec")) == bool(spec.get("clusterSelector")):
        problems.append(f"{where}: exactly one of rayClusterSpec and clusterSelector")
    backoff = spec.get("backoffLimit", 0)
    if not isinstance(backoff, int) or backoff < 0:
        problems.append(f"{where}.backoffLimit: a non-negative integer")
    deadline = spec.get("activeDeadlineSeconds")
    if not isinstance(deadline, int) or deadline <= 0:
        problems.append(f"{where}.activeDeadlineSeconds: set it, so that a stuck job does not hold GPUs for ever")
    if spec.get("rayClusterSpec"):
        problems += check_raycluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
        problems += check_deletion(spec, where)
    return problems


def check_deletion(spec: dict, where: str) -> list[str]:
    """The job's cluster goes away when the job ends (the operator's own rules, from 1.6.0)."""
    rules = get(spec, "deletionStrategy", "deletionRules", default=[])
    ttl, shutdown = spec.get("ttlSecondsAfterFinished"), spec.get("shutdownAfterJobFinishes")
    if ttl and not shutdown:
        return [f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"]
    if not rules:
        return [] if shutdown else [
            f"{where}: shutdownAfterJobFinishes is not true and no deletionRules: the cluster would outlive the job"]
    if shutdown or ttl:
        return [f"{where}: deletionRules exclude shutdownAfterJobFinishes and ttlSecondsAfterFinished"]
    problems, by_condition = [], {}
    for rule in rules:
        condition = rule.get("condition") or {}
        key = (condition.get("jobStatus"), condition.get("jobDeploymentStatus"))
        by_condition.setdefault(key, {})[rule.get("policy")] = int(condition.get("ttlSeconds") or 0)
    for status in ("SUCCEEDED", "FAILED"):
        if not {"DeleteCluster", "DeleteSelf"} & set(by_condition.get((status, None), {})):
            problems.append(f"{where}: no deletion rule frees the cluster when the job is {status}")
    for key, ttls in by_condition.items():
        order = [ttls[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in ttls]
        if order != sorted(order):
            problems.append(f"{where}: deletion TTLs for {key} must grow DeleteWorkers <= DeleteCluster <= DeleteSelf")
    return problems


def check_raycronjob(doc: dict) -> list[str]:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return ["spec: missing"]
    problems = unknown(spec, RAYCRONJOB_SPEC_KEYS, "spec")
    template = spec.get("jobTemplate")
    if not isinstance(template, dict):
        return problems + ["spec.jobTemplate: missing"]
    problems += check_schedule(spec.get("schedule"), template.get("activeDeadlineSeconds"), "spec")
    return problems + check_rayjob_spec(template, "spec.jobTemplate")


def check_operator_values(values: dict) -> list[str]:
    gates = values.get("featureGates") or []
    return [] if {"name": "RayCronJob", "enabled": True} in gates else [
        "featureGates: should enable RayCronJob (alpha, off by default; raycronjob-retrain.yaml needs it)"]


def check_service_account(doc: dict) -> list[str]:
    """The pods' cloud identity: an IRSA role for S3."""
    name = get(doc, "metadata", "name")
    problems = [] if name == SERVICE_ACCOUNT else [f"metadata.name {name!r}: should be {SERVICE_ACCOUNT}"]
    role = get(doc, "metadata", "annotations", "eks.amazonaws.com/role-arn", default="")
    if not re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", str(role)):
        problems.append("metadata.annotations: eks.amazonaws.com/role-arn should be an IAM role ARN")
    return problems


# ---------------------------------------------------------------- RayService (Ray Serve)

def check_rayservice(doc: dict, ctx: Context) -> list[str]:
    """KubeRay's fields, the cluster (no GPU group needed), and the Serve config that it deploys."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return ["spec: missing"]
    problems = unknown(spec, RAYSERVICE_SPEC_KEYS, "spec")
    cluster = spec.get("rayClusterConfig")
    if isinstance(cluster, dict):
        problems += check_raycluster_spec(cluster, "spec.rayClusterConfig", gpu=False)
    else:
        problems.append("spec.rayClusterConfig: missing")
    try:
        config = yaml.load(str(spec.get("serveConfigV2") or ""), Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        return problems + [f"spec.serveConfigV2: does not parse: {' '.join(str(exc).split())}"]
    if not isinstance(config, dict):
        return problems + ["spec.serveConfigV2: should be a Serve config (a mapping with applications)"]
    return problems + check_serve_config(config, cluster if isinstance(cluster, dict) else {}, ctx)


def serve_schemas() -> tuple[Any, Any, Any] | None:
    """Ray Serve's own models of a config, an application and a deployment; None without Ray."""
    try:
        with warnings.catch_warnings():  # Ray's own pydantic deprecations, nothing of ours
            warnings.simplefilter("ignore", DeprecationWarning)
            from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema
    except ImportError:
        return None
    return ServeDeploySchema, ServeApplicationSchema, DeploymentSchema


def check_serve_config(config: dict, cluster: dict, ctx: Context) -> list[str]:
    """serveConfigV2: Ray Serve's schema, no field it would ignore, and the charnn application."""
    where, schemas = "spec.serveConfigV2", serve_schemas()
    if schemas is None:
        return [f"{where}: ray[serve] is not installed: no schema to check against (make install)"]
    try:
        schemas[0].model_validate(config)
    except ValidationError as exc:
        return [f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    api = (f"Ray Serve {ctx.ray}'s config", "Serve would ignore it")
    problems = unknown(config, set(schemas[0].model_fields), where, *api)
    problems += [f"{where}: a value carries credentials: {redact(s)[:60]}" for s in walk(config)
                 if isinstance(s, str) and redact(s) != s]
    apps = config.get("applications") or []
    for i, app in enumerate(apps):
        at = f"{where}.applications[{i}]"
        problems += unknown(app, set(schemas[1].model_fields), at, *api)
        problems += [p for j, d in enumerate(app.get("deployments") or [])
                     for p in unknown(d, set(schemas[2].model_fields), f"{at}.deployments[{j}]", *api)]
        problems += check_import_path(str(app.get("import_path")), ctx.repo, at)
        if import_target(str(app.get("import_path")))[0] == SERVE_APP[0]:
            problems += check_serve_app(app, at, cluster, ctx)
    if not any(import_target(str(a.get("import_path"))) == SERVE_APP for a in apps):
        problems.append(f"{where}: no application runs {':'.join(SERVE_APP)}")
    return problems + check_serve_ports(config, cluster)


def import_target(path: str) -> tuple[str, str]:
    """(module, name) of an import_path, module:name or module.name as Serve reads it."""
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    return module, name


def check_import_path(path: str, repo: Path, where: str) -> list[str]:
    """A module of the charnn package (what the image installs), in the repository, that defines the name."""
    module, name = import_target(path)
    if module.split(".")[0] != PACKAGE or not name:
        return [f"{where}.import_path {path!r}: should be {PACKAGE}.MODULE:NAME (the package the image installs)"]
    base = repo / module.replace(".", "/")
    file = next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)
    if file is None:
        return [f"{where}.import_path {path!r}: {base.relative_to(repo).as_posix()}.py does not exist here"]
    names = set()
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names.update(t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                         if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return [] if name in names else [f"{where}.import_path {path!r}: {file.relative_to(repo).as_posix()} "
                                     f"defines no {name}"]


def check_serve_app(app: dict, where: str, cluster: dict, ctx: Context) -> list[str]:
    """charnn.serve's application: its route, its args, the registry it reads, room for its replicas."""
    problems = [] if app.get("route_prefix", "/") == "/" else [
        f"{where}.route_prefix: should be / (charnn.serve routes on the full path: /generate, /model, /healthz)"]
    args = app.get("args") or {}
    problems += [f"{where}.args.{k}: not an argument of {':'.join(SERVE_APP)} (it would ignore it)" for k in args
                 if k not in SERVE_ARGS]
    model, storage = str(args.get("model") or ""), str(args.get("storage") or "")
    if not model:
        problems.append(f"{where}.args.model: missing (the registry name, retrain.model)")
    if not storage:
        problems.append(f"{where}.args.storage: missing (the retrain job's run.storage, shared storage)")
    elif not is_shared(storage):
        problems.append(f"{where}.args.storage {storage!r}: is not shared storage (a URL such as s3://...)")
    elif model and ctx.publishes and (storage.rstrip("/"), model) not in ctx.publishes:
        problems.append(f"{where}.args: no retrain job here publishes to {storage.rstrip('/')}/models/{model}/ "
                        f"(they publish {sorted(ctx.publishes)} as (run.storage, retrain.model))")
    try:
        replicas = int(args.get("replicas", 1))
    except (TypeError, ValueError):
        return problems + [f"{where}.args.replicas: an integer"]
    room = cluster_cpus(cluster)
    if cluster and replicas * SERVE_REPLICA_CPUS > room:
        problems.append(f"{where}.args.replicas: {replicas} replicas of {SERVE_REPLICA_CPUS} CPU > the cluster's "
                        f"{room:g} CPUs (they would wait for ever)")
    return problems


def ray_cpus(group: dict) -> float:
    """The CPUs that a node of a group gives Ray: rayStartParams num-cpus, else the container's."""
    given = get(group, "rayStartParams", "num-cpus")
    return quantity(given) if given is not None else cpus(group) or 0.0


def cluster_cpus(cluster: dict) -> float:
    """Ray's CPUs in a cluster: the head's and the workers' (at maxReplicas when it autoscales)."""
    key = "maxReplicas" if cluster.get("enableInTreeAutoscaling") else "replicas"
    workers = sum(int(g.get(key) or 0) * ray_cpus(g) * int(g.get("numOfHosts") or 1)
                  for g in cluster.get("workerGroupSpecs") or [] if isinstance(g, dict))
    return workers + ray_cpus(cluster.get("headGroupSpec") or {})


def serve_port(group: dict) -> int | None:
    for port in get(pod_spec(group), "containers", 0, "ports", default=[]):
        if isinstance(port, dict) and port.get("name") == "serve":
            return port.get("containerPort")
    return None


def check_serve_ports(config: dict, cluster: dict) -> list[str]:
    """The containers' `serve` port is Serve's HTTP port: KubeRay makes <name>-serve-svc from the head's,
    and the workers' readiness probe asks the proxy on theirs (8000 when not named)."""
    port, where = get(config, "http_options", "port", default=8000), "spec.rayClusterConfig"
    head = serve_port(cluster.get("headGroupSpec") or {}) if cluster else port
    problems = [] if head == port else [
        f"{where}.headGroupSpec: the head container needs a port named serve, {port} (Serve's HTTP port)"]
    for i, group in enumerate(g for g in cluster.get("workerGroupSpecs") or [] if isinstance(g, dict)):
        if (serve_port(group) or 8000) != port:
            problems.append(f"{where}.workerGroupSpecs[{i}]: its port named serve should be {port} (Serve's HTTP port)")
    return problems


# ---------------------------------------------------------------- CronJob

HEAD_ADDRESS = re.compile(r"http://([a-z0-9]([a-z0-9-]*[a-z0-9])?)-head-svc(\.[a-z0-9.-]+)?:8265\b")


def check_cronjob(doc: dict) -> list[str]:
    """A batch/v1 CronJob: never two runs at once, one container that runs to completion."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return ["spec: missing"]
    problems = unknown(spec, CRONJOB_SPEC_KEYS, "spec", api="batch/v1 CronJob")
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append("spec.concurrencyPolicy: should be Forbid (the default Allow overlaps runs)")
    job = get(spec, "jobTemplate", "spec", default={})
    deadline = job.get("activeDeadlineSeconds")
    if not isinstance(deadline, int) or deadline <= 0:
        problems.append("spec.jobTemplate.spec.activeDeadlineSeconds: set it, so that a stuck run cannot overlap")
    problems += check_schedule(spec.get("schedule"), deadline, "spec")
    pod = get(job, "template", "spec", default={})
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append("jobTemplate.spec.template.spec.restartPolicy: Never or OnFailure")
    containers = pod.get("containers") or []
    if not containers or not all(isinstance(c, dict) and c.get("name") and c.get("image") for c in containers):
        problems.append("jobTemplate.spec.template.spec.containers: a name and an image each")
    return problems


def check_submitter(doc: dict, cluster: dict) -> list[str]:
    """The CronJob's container runs `ray job submit` against `cluster`, with that cluster's token."""
    _, script, _ = submission(doc, cluster)
    container = get(doc, "spec", "jobTemplate", "spec", "template", "spec", "containers", 0, default={})
    problems = []
    if "ray job submit" not in script or "--submission-id" not in script:
        problems.append("the container should run `ray job submit --submission-id ...`")
    address, name = HEAD_ADDRESS.search(script), get(cluster, "metadata", "name")
    if not address:
        problems.append("no job server address http://<cluster>-head-svc:8265")
    elif address.group(1) != name:
        problems.append(f"{address.group(0)}: should be the RayCluster {name}'s head, {name}-head-svc")
    env = {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}
    if get(env, "RAY_AUTH_MODE", "value") != "token":
        problems.append("env RAY_AUTH_MODE: token")
    secret = {"name": get(cluster, "spec", "authOptions", "secretName"), "key": "auth_token"}
    if get(env, "RAY_AUTH_TOKEN", "valueFrom", "secretKeyRef") != secret:
        problems.append(f"env RAY_AUTH_TOKEN: valueFrom.secretKeyRef {secret} (the RayCluster's authOptions)")
    return problems


# ---------------------------------------------------------------- cluster launcher

def ray_launcher_schema() -> dict | None:
    """Ray's own schema for `ray up` configs, read from the installed package without importing it."""
    found = importlib.util.find_spec("ray")
    if found is None or not found.submodule_search_locations:
        return None
    return json.loads((Path(list(found.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json").read_text())


def check_launcher(config: dict, largest: int = 0) -> list[str]:
    """Ray's schema, then the nodes, and room for `largest` GPU workers (the largest job here)."""
    schema = ray_launcher_schema()
    if schema is None:
        return ["ray is not installed: no ray-schema.json to check against (make install)"]
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    return problems or check_launcher_nodes(config) + check_launcher_range(config, largest)


def check_launcher_nodes(config: dict) -> list[str]:
    """AWS, a CPU head, GPU workers, instance profiles for S3, the charnn image with token auth."""
    problems = [] if get(config, "provider", "type") == "aws" else ["provider.type: aws"]
    types = config.get("available_node_types") or {}
    head = types.get(config.get("head_node_type"))
    if head is None:
        return problems + ["head_node_type: not one of available_node_types"]
    if GPU_INSTANCE.match(str(get(head, "node_config", "InstanceType"))):
        problems.append("the head node type should be a CPU instance")
    for name, node in types.items():
        arn = get(node, "node_config", "IamInstanceProfile", "Arn", default="")
        if not re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+", str(arn)):
            problems.append(f"{name}: node_config.IamInstanceProfile.Arn (S3 through the instance profile)")
    if not any(GPU_INSTANCE.match(str(get(node, "node_config", "InstanceType"))) and node.get("max_workers", 0) > 0
               for name, node in types.items() if name != config.get("head_node_type")):
        problems.append("no GPU worker node type (g5, p4d, p5, ...) with max_workers > 0")
    docker = config.get("docker") or {}
    if not (docker.get("image") or (docker.get("head_image") and docker.get("worker_image"))):
        problems.append("docker.image: the charnn image")
    if "--env RAY_AUTH_MODE=token" not in docker.get("run_options", []):
        problems.append("docker.run_options: --env RAY_AUTH_MODE=token (token auth)")
    return problems


def check_launcher_range(config: dict, largest: int) -> list[str]:
    """The GPU node types' min_workers <= max_workers, and room at max_workers for `largest` workers."""
    limit, head = config.get("max_workers", 2), config.get("head_node_type")  # 2: Ray's default for AWS
    types = {name: node for name, node in (config.get("available_node_types") or {}).items()
             if name != head and GPU_INSTANCE.match(str(get(node, "node_config", "InstanceType")))}
    most = {name: node.get("max_workers", limit) for name, node in types.items()}  # Ray's default: the limit
    problems = [f"{name}: min_workers {node.get('min_workers', 0)} > max_workers {most[name]}"
                for name, node in types.items() if node.get("min_workers", 0) > most[name]]
    if not types or not largest:
        return problems
    per_node = {name: int(get(node, "resources", "GPU", default=1)) for name, node in types.items()}
    room = sum(most[name] * per_node[name] for name in types)
    if room < largest:
        problems.append(f"the GPU node types hold {room} GPUs at max_workers, fewer than the largest job's "
                        f"cluster.num_workers {largest}")
    nodes = math.ceil(largest / max(1, *per_node.values()))
    if limit < nodes:
        problems.append(f"max_workers {limit}: the largest job's cluster.num_workers {largest} needs {nodes} GPU nodes")
    return problems


def main() -> int:
    problems = check()
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: infra/ has no problems ({len(text_files(INFRA))} files checked)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
