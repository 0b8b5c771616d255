"""The cluster manifests under infra/: they parse, name files that exist, run the pinned Ray,
carry no credentials, and have the fields their operators need.

No Ray, no network, no kubectl: offline there is no Kubernetes schema, so each check is a small
function that returns a list of problems.  Every check runs on the real files and on a broken
copy made here, so each one is seen to fail.  The KubeRay field lists come from the Go types of
KubeRay 1.6.0 (ray-operator/apis/ray/v1), the oldest operator that these manifests support.
"""
from __future__ import annotations

import copy
import datetime
import importlib.util
import json
import math
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

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
    "kubernetes/cronjob-submit.yaml": [("batch/v1", "CronJob")],
    "kuberay/operator-values.yaml": "helm values of the kuberay-operator chart",
    "cluster-launcher/aws.yaml": "ray up cluster config",
}

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
CRONJOB_SPEC_KEYS = {"schedule", "timeZone", "startingDeadlineSeconds", "concurrencyPolicy", "suspend",
                     "jobTemplate", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"}
MAX_RAYJOB_NAME = 47  # KubeRay names the RayJob's cluster <name>-<5 characters>, <= 53
MAX_RAYCRONJOB_NAME = 36  # KubeRay 1.7: <name>-<minutes since the epoch> must be a valid RayJob name
SECRET_ENV = {"RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
GPU_INSTANCE = re.compile(r"^(g4dn|g4ad|g5|g5g|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.")


# ---------------------------------------------------------------- reading the repository

def ray_pin() -> str:
    pins = re.findall(r"(?im)^ray==([0-9][^\s;#]*)", (REPO / "constraints.txt").read_text())
    assert len(pins) == 1, f"constraints.txt should pin ray exactly once, found {pins}"
    return pins[0]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def yaml_files() -> list[str]:
    return sorted(str(p.relative_to(INFRA)) for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def load(rel: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((INFRA / rel).read_text()) if d is not None]


def docs_of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(rel, d) for rel in yaml_files() for d in load(rel) if isinstance(d, dict) and d.get("kind") == kind]


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def dicts(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from dicts(v)


# ---------------------------------------------------------------- entry points and files

REPO_FILE = re.compile(r"(?<![\w.-])((?:/[\w.-]+)*/)?(jobs/[\w.-]+(?:/[\w.-]+)*\.(?:py|ya?ml))(?![\w.-])")


def check_referenced_files(text: str) -> list[str]:
    """Every jobs/*.py and jobs/specs/*.yaml named in `text` exists; absolute paths are the image's."""
    problems = []
    for m in REPO_FILE.finditer(text):
        prefix, rel = m.group(1), m.group(2)
        if prefix and prefix != IMAGE_ROOT:
            problems.append(f"{prefix}{rel}: absolute paths to the repository must start with {IMAGE_ROOT}")
        if not (REPO / rel).is_file():
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


def repo_path(path: str) -> Path:
    return REPO / (path[len(IMAGE_ROOT):] if path.startswith(IMAGE_ROOT) else path)


def job_arguments(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """(script, --spec, [--set values]) of a jobs/*.py command line."""
    script, spec, overrides, i = argv[1], None, [], 2
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--spec", "--set"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if name == "--spec":
                spec = value
            else:
                overrides.append(value)
        i += 1
    return script, spec, overrides


def check_job_command(argv: list[str], gpu_capacity: int | None = None, cpus_per_pod: float | None = None) -> list[str]:
    """A cluster job's command: its spec loads with its --set values, every path it reads or writes
    is shared storage, and it fits the GPU group that runs it."""
    from jobs.spec import SpecError, load_spec

    problems = check_referenced_files(" ".join(argv))
    script, spec_path, overrides = job_arguments(argv)
    if spec_path is None:
        return problems + [f"{script}: no --spec"]
    if not repo_path(spec_path).is_file():
        return problems  # reported above
    try:
        spec = load_spec(str(repo_path(spec_path)), overrides)
    except SpecError as exc:
        return problems + [f"{script}: the spec does not load: {exc}"]
    shared = {"run.storage": [spec.run.storage], "data.dataset_root": [spec.data.dataset_root],
              "data.sources": list(spec.data.sources)}
    for key, values in shared.items():
        for value in values:
            if "://" not in value:
                problems.append(f"{script}: {key} {value!r} is not shared storage (a URL such as s3://...)")
    if gpu_capacity is not None:
        if not spec.cluster.use_gpu:
            problems.append(f"{script}: runs on a GPU group but cluster.use_gpu is false")
        elif spec.cluster.num_workers > gpu_capacity:
            problems.append(f"{script}: cluster.num_workers {spec.cluster.num_workers} > the GPU group's "
                            f"{gpu_capacity} GPUs")
        if cpus_per_pod is not None and spec.cluster.cpus_per_worker > cpus_per_pod:
            problems.append(f"{script}: cluster.cpus_per_worker {spec.cluster.cpus_per_worker} > the GPU pod's "
                            f"{cpus_per_pod} CPUs")
    return problems


# ---------------------------------------------------------------- versions

def check_image(image: str, ray: str, project: str) -> list[str]:
    """rayproject/ray:<ray>-...; or the project image .../charnn:<project>-ray<ray>-... ."""
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    if not tag or tag == "latest":
        return [f"{image}: pin a tag, not latest or none"]
    if name.endswith("rayproject/ray"):
        if tag != ray and not tag.startswith(f"{ray}-"):
            return [f"{image}: the tag should start with the pinned Ray {ray}"]
    elif name.endswith("/charnn"):
        if not tag.startswith(f"{project}-ray{ray}-") and tag != f"{project}-ray{ray}":
            return [f"{image}: the tag should start with {project}-ray{ray}- (charnn version, pinned Ray)"]
    else:
        return [f"{image}: not rayproject/ray nor the charnn image"]
    return []


IMAGE_IN_TEXT = re.compile(r"((?:[\w.-]+(?::\d+)?/)*(?:rayproject/ray|charnn)):([\w.-]*)")


def check_versions_in_text(text: str, ray: str, project: str) -> list[str]:
    problems = []
    for m in IMAGE_IN_TEXT.finditer(text):
        if "/" in m.group(1):  # an image reference, not a bare "charnn:" in prose
            problems += check_image(f"{m.group(1)}:{m.group(2)}", ray, project)
    return problems


def check_versions_in_doc(doc: Any, ray: str, project: str) -> list[str]:
    problems = []
    for d in dicts(doc):
        for key in ("image", "head_image", "worker_image"):
            if isinstance(d.get(key), str):
                problems += check_image(d[key], ray, project)
        if "rayVersion" in d and str(d["rayVersion"]) != ray:
            problems.append(f"rayVersion {d['rayVersion']!r} != the pinned Ray {ray}")
    return problems


# ---------------------------------------------------------------- credentials

CREDENTIAL_TEXT = [
    (re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"), "an AWS access key id"),
    (re.compile(r"(?i)aws_secret_access_key\s*[=:]"), "an aws_secret_access_key setting"),
    (re.compile(r"(?i)aws_session_token\s*[=:]"), "an aws_session_token setting"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"RAY_AUTH_TOKEN\s*=\s*[\"']?(?![\"']?\$)[^\s\"']+"), "a literal RAY_AUTH_TOKEN"),
]


def check_no_credentials_in_text(text: str) -> list[str]:
    return [f"{what}: {m.group(0)[:12]}..." for pattern, what in CREDENTIAL_TEXT for m in pattern.finditer(text)]


def check_no_credentials_in_doc(doc: Any) -> list[str]:
    problems = []
    if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append(f"Secret {doc.get('metadata', {}).get('name')}: values in a manifest; create it with kubectl")
    for d in dicts(doc):
        if d.get("name") in SECRET_ENV and "value" in d:
            problems.append(f"env {d['name']} has a literal value; use valueFrom.secretKeyRef")
    for s in strings(doc):
        problems += check_no_credentials_in_text(s)
    return problems


# ---------------------------------------------------------------- cron schedules

CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
               "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def cron_values(field: str, lo: int, hi: int) -> set[int]:
    values: set[int] = set()
    for part in field.split(","):
        span, slash, step_text = part.partition("/")
        step = int(step_text) if slash else 1
        if span == "*":
            first, last = lo, hi
        elif "-" in span:
            first, last = (int(x) for x in span.split("-", 1))
        else:
            first = int(span)
            last = hi if slash else first
        if step < 1 or not lo <= first <= last <= hi:
            raise ValueError(f"cron field {field!r} is outside {lo}-{hi}")
        values.update(range(first, last + 1, step))
    return values


def cron_min_gap(schedule: str) -> float:
    """The shortest time in seconds between two runs of a 5-field cron schedule (UTC, no DST)."""
    fields = CRON_MACROS.get(schedule.strip(), schedule).split()
    if len(fields) != 5:
        raise ValueError(f"cron schedule {schedule!r} should have 5 fields")
    minutes, hours, days, months, weekdays = (cron_values(f, lo, hi) for f, (lo, hi) in zip(fields, CRON_RANGES))
    weekdays = {d % 7 for d in weekdays}
    any_day, any_weekday = fields[2].startswith("*"), fields[4].startswith("*")
    times = sorted(h * 60 + m for h in hours for m in minutes)
    gap = min((b - a for a, b in zip(times, times[1:])), default=math.inf)
    previous_last, start = None, datetime.date(2024, 1, 1)
    for offset in range(800):  # two years and more: every day-of-week and day-of-month pairing
        day = start + datetime.timedelta(days=offset)
        day_ok, weekday_ok = day.day in days, (day.weekday() + 1) % 7 in weekdays
        runs = (day_ok and weekday_ok if any_day or any_weekday else day_ok or weekday_ok)
        if day.month not in months or not runs:
            continue
        if previous_last is not None:
            gap = min(gap, offset * 1440 + times[0] - previous_last)
        previous_last = offset * 1440 + times[-1]
    return gap * 60


def check_schedule_overlap(schedule: Any, deadline: Any) -> list[str]:
    """A schedule, and a deadline that ends a run before the next one starts."""
    if not isinstance(schedule, str) or not schedule.strip():
        return ["no schedule"]
    try:
        gap = cron_min_gap(schedule)
    except ValueError as exc:
        return [f"schedule: {exc}"]
    if not isinstance(deadline, int) or deadline <= 0:
        return ["no activeDeadlineSeconds: a stuck run would hold the GPUs and overlap the next"]
    if deadline >= gap:
        return [f"activeDeadlineSeconds {deadline} >= the {gap:.0f} s between runs of {schedule!r}: runs can overlap"]
    return []


# ---------------------------------------------------------------- KubeRay

def unknown(keys: Any, allowed: set[str], where: str) -> list[str]:
    if not isinstance(keys, dict):
        return [f"{where}: not a mapping"]
    return [f"{where}.{k}: not a field of KubeRay 1.6.0 (it would be dropped silently)"
            for k in keys if k not in allowed]


def pod_spec(group: dict) -> dict:
    return ((group.get("template") or {}).get("spec")) or {}


def quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gpus(group: dict) -> int:
    containers = pod_spec(group).get("containers") or [{}]
    return int(quantity(((containers[0].get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)))


def cpus(group: dict) -> float | None:
    resources = ((pod_spec(group).get("containers") or [{}])[0].get("resources")) or {}
    value = (resources.get("limits") or {}).get("cpu", (resources.get("requests") or {}).get("cpu"))
    return None if value is None else quantity(value)


def gpu_groups(cluster_spec: dict) -> list[dict]:
    return [g for g in cluster_spec.get("workerGroupSpecs") or [] if isinstance(g, dict) and gpus(g) > 0]


def gpu_capacity(cluster_spec: dict) -> int:
    """GPUs a job can get: maxReplicas when the cluster autoscales, else replicas."""
    key = "maxReplicas" if cluster_spec.get("enableInTreeAutoscaling") else "replicas"
    return sum(int(g.get(key) or 0) * gpus(g) * int(g.get("numOfHosts") or 1) for g in gpu_groups(cluster_spec))


def check_pod(spec: dict, where: str) -> list[str]:
    problems = []
    containers = spec.get("containers")
    if not containers or not all(isinstance(c, dict) and c.get("image") and c.get("name") for c in containers):
        problems.append(f"{where}: containers need a name and an image")
    if spec.get("serviceAccountName") != SERVICE_ACCOUNT:
        problems.append(f"{where}: serviceAccountName should be {SERVICE_ACCOUNT} (S3 through the pod's identity)")
    return problems


def check_raycluster_spec(spec: Any, where: str = "spec") -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: not a mapping"]
    problems = unknown(spec, RAYCLUSTER_SPEC_KEYS, where)
    if not spec.get("rayVersion"):
        problems.append(f"{where}.rayVersion: missing")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: should be token (Ray's token auth)")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}.headGroupSpec: missing"]
    problems += unknown(head, HEAD_GROUP_KEYS, f"{where}.headGroupSpec")
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{where}.headGroupSpec: the dashboard must stay in-cluster (ClusterIP, no Ingress)")
    if not isinstance(head.get("rayStartParams", {}), dict):
        problems.append(f"{where}.headGroupSpec.rayStartParams: not a mapping")
    problems += check_pod(pod_spec(head), f"{where}.headGroupSpec.template.spec")
    if gpus(head):
        problems.append(f"{where}.headGroupSpec: the head is a CPU node; no nvidia.com/gpu")
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{where}.workerGroupSpecs: missing"]
    for i, group in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        problems += unknown(group, WORKER_GROUP_KEYS, at)
        if not isinstance(group, dict):
            continue
        if not group.get("groupName"):
            problems.append(f"{at}.groupName: missing")
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(c, int) for c in counts) or not 0 <= counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{at}: needs 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
        problems += check_pod(pod_spec(group), f"{at}.template.spec")
    gpu = gpu_groups(spec)
    if not gpu:
        problems.append(f"{where}.workerGroupSpecs: no group requests nvidia.com/gpu in its limits")
    for group in gpu:
        resources = (pod_spec(group).get("containers") or [{}])[0].get("resources") or {}
        requested = (resources.get("requests") or {}).get("nvidia.com/gpu")
        if requested is not None and quantity(requested) != gpus(group):
            problems.append(f"{where}: group {group.get('groupName')}: GPU requests differ from limits")
        if not any(t.get("key") == "nvidia.com/gpu" for t in pod_spec(group).get("tolerations") or []):
            problems.append(f"{where}: group {group.get('groupName')}: no toleration for the nvidia.com/gpu taint")
        if not pod_spec(group).get("nodeSelector") and not pod_spec(group).get("affinity"):
            problems.append(f"{where}: group {group.get('groupName')}: no nodeSelector or affinity for GPU nodes")
    return problems


def check_deletion(spec: dict, where: str) -> list[str]:
    """The job's cluster goes away when the job ends (the operator's own rules, from 1.6.0)."""
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules") or []
    ttl = spec.get("ttlSecondsAfterFinished")
    if ttl and not spec.get("shutdownAfterJobFinishes"):
        return [f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"]
    if not rules:
        return [] if spec.get("shutdownAfterJobFinishes") else [
            f"{where}: shutdownAfterJobFinishes is not true and no deletionRules: the cluster would outlive the job"]
    if spec.get("shutdownAfterJobFinishes") or ttl:
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


def check_rayjob_spec(spec: Any, where: str = "spec") -> list[str]:
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
    commands = python_commands(spec.get("entrypoint") or "")
    if len(commands) != 1:
        return problems + [f"{where}.entrypoint: should be one `python .../jobs/X.py --spec ...` command"]
    cluster = spec.get("rayClusterSpec") or {}
    groups = gpu_groups(cluster)
    problems += check_job_command(commands[0], gpu_capacity(cluster) if cluster else None,
                                  cpus(groups[0]) if groups else None)
    return problems


def check_rayjob(doc: dict) -> list[str]:
    name = (doc.get("metadata") or {}).get("name") or ""
    problems = [] if 0 < len(name) <= MAX_RAYJOB_NAME else [f"RayJob name {name!r}: 1 to {MAX_RAYJOB_NAME} characters"]
    return problems + check_rayjob_spec(doc.get("spec"))


def check_raycronjob(doc: dict) -> list[str]:
    name = (doc.get("metadata") or {}).get("name") or ""
    problems = [] if 0 < len(name) <= MAX_RAYCRONJOB_NAME else [
        f"RayCronJob name {name!r}: 1 to {MAX_RAYCRONJOB_NAME} characters"]
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec: missing"]
    problems += unknown(spec, RAYCRONJOB_SPEC_KEYS, "spec")
    template = spec.get("jobTemplate")
    if not isinstance(template, dict):
        return problems + ["spec.jobTemplate: missing"]
    problems += check_schedule_overlap(spec.get("schedule"), template.get("activeDeadlineSeconds"))
    return problems + check_rayjob_spec(template, "spec.jobTemplate")


def submitted(doc: dict) -> str:
    """The shell text that a RayJob, RayCronJob or CronJob runs."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        return spec.get("entrypoint") or ""
    if doc.get("kind") == "RayCronJob":
        return (spec.get("jobTemplate") or {}).get("entrypoint") or ""
    pod = (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    container = (pod.get("containers") or [{}])[0]
    return "\n".join((container.get("command") or []) + (container.get("args") or []))


HEAD_ADDRESS = re.compile(r"http://([a-z0-9]([a-z0-9-]*[a-z0-9])?)-head-svc(\.[a-z0-9.-]+)?:8265\b")


def check_cronjob(doc: dict) -> list[str]:
    """A batch/v1 CronJob that runs `ray job submit` against a long-lived cluster."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return ["spec: missing"]
    problems = unknown(spec, CRONJOB_SPEC_KEYS, "spec")
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append("spec.concurrencyPolicy: should be Forbid (the default Allow overlaps runs)")
    job = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    problems += check_schedule_overlap(spec.get("schedule"), job.get("activeDeadlineSeconds"))
    pod = ((job.get("template") or {}).get("spec")) or {}
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append("jobTemplate.spec.template.spec.restartPolicy: Never or OnFailure")
    containers = pod.get("containers") or []
    if not containers or not all(c.get("name") and c.get("image") for c in containers):
        return problems + ["jobTemplate.spec.template.spec.containers: a name and an image each"]
    container, script = containers[0], submitted(doc)
    if "ray job submit" not in script or "--submission-id" not in script:
        problems.append("the container should run `ray job submit --submission-id ...`")
    if not HEAD_ADDRESS.search(script):
        problems.append("no job server address http://<cluster>-head-svc:8265")
    env = {e.get("name"): e for e in container.get("env") or []}
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        problems.append("env RAY_AUTH_MODE: token")
    if not (((env.get("RAY_AUTH_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"):
        problems.append("env RAY_AUTH_TOKEN: valueFrom.secretKeyRef")
    commands = python_commands(script)
    if len(commands) != 1:
        problems.append("the submission should run one `python .../jobs/X.py --spec ...` command")
    return problems


# ---------------------------------------------------------------- cluster launcher

def ray_launcher_schema() -> dict:
    """Ray's own schema for `ray up` configs, read from the installed package without importing it."""
    found = importlib.util.find_spec("ray")
    if found is None or not found.submodule_search_locations:
        pytest.skip("ray is not installed: no cluster-launcher schema")
    return json.loads((Path(list(found.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json").read_text())


def check_launcher(config: Any) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in jsonschema.Draft7Validator(ray_launcher_schema()).iter_errors(config)]
    if problems or not isinstance(config, dict):
        return problems
    if (config.get("provider") or {}).get("type") != "aws":
        problems.append("provider.type: aws")
    types = config.get("available_node_types") or {}
    head = types.get(config.get("head_node_type"))
    if head is None:
        return problems + ["head_node_type: not one of available_node_types"]
    if GPU_INSTANCE.match(str((head.get("node_config") or {}).get("InstanceType"))):
        problems.append("the head node type should be a CPU instance")
    for name, node in types.items():
        arn = ((node.get("node_config") or {}).get("IamInstanceProfile") or {}).get("Arn", "")
        if not re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+", arn):
            problems.append(f"{name}: node_config.IamInstanceProfile.Arn (S3 through the instance profile)")
    workers = [n for k, n in types.items() if k != config.get("head_node_type")]
    if not any(GPU_INSTANCE.match(str((n.get("node_config") or {}).get("InstanceType"))) and n.get("max_workers", 0) > 0
               for n in workers):
        problems.append("no GPU worker node type (g5, p4d, p5, ...) with max_workers > 0")
    docker = config.get("docker") or {}
    if not (docker.get("image") or (docker.get("head_image") and docker.get("worker_image"))):
        problems.append("docker.image: the charnn image")
    if "--env RAY_AUTH_MODE=token" not in docker.get("run_options", []):
        problems.append("docker.run_options: --env RAY_AUTH_MODE=token (token auth)")
    return problems


# ================================================================ tests on the real files

def test_every_yaml_file_parses_and_has_the_expected_kinds():
    assert sorted(EXPECTED) == yaml_files(), "classify every YAML file under infra/ in EXPECTED"
    for rel, kinds in EXPECTED.items():
        docs = load(rel)
        assert docs and all(isinstance(d, dict) for d in docs), rel
        if isinstance(kinds, list):
            assert [(d.get("apiVersion"), d.get("kind")) for d in docs] == kinds, rel
            assert all((d.get("metadata") or {}).get("name") for d in docs), f"{rel}: metadata.name"
        else:
            assert all("kind" not in d for d in docs), f"{rel}: {kinds}, not a Kubernetes object"


def test_referenced_entry_points_and_specs_exist():
    problems = [f"{p.relative_to(REPO)}: {x}" for p in text_files() for x in check_referenced_files(p.read_text())]
    assert not problems, problems


def test_the_schedules_run_retrain_and_the_one_off_job_runs_train():
    scripts: dict[str, set[str]] = {}
    for kind in ("RayJob", "RayCronJob", "CronJob"):
        for _, doc in docs_of_kind(kind):
            found = {REPO_FILE.search(argv[1]).group(2) for argv in python_commands(submitted(doc))}
            scripts.setdefault(kind, set()).update(found)
    assert scripts == {"RayJob": {"jobs/train.py"}, "RayCronJob": {"jobs/retrain.py"}, "CronJob": {"jobs/retrain.py"}}
    assert re.search(r"python jobs/retrain\.py", (INFRA / "local-schedule.sh").read_text())


def test_ray_version_is_the_pinned_one_everywhere():
    ray, project = ray_pin(), pyproject()["project"]["version"]
    requirements = pytest.importorskip("packaging.requirements")
    (requirement,) = [r for r in map(requirements.Requirement, pyproject()["project"]["dependencies"])
                      if r.name == "ray"]
    assert requirement.specifier.contains(ray), f"pyproject.toml's {requirement} does not admit ray=={ray}"
    problems = [f"{p.relative_to(REPO)}: {x}" for p in text_files()
                for x in check_versions_in_text(p.read_text(), ray, project)]
    problems += [f"{rel}: {x}" for rel in yaml_files() for d in load(rel)
                 for x in check_versions_in_doc(d, ray, project)]
    assert not problems, problems
    ray_versions = {str(d["rayVersion"]) for rel in yaml_files() for d in dicts(load(rel)) if "rayVersion" in d}
    assert ray_versions == {ray}


def test_no_credentials_inline():
    problems = [f"{p.relative_to(REPO)}: {x}" for p in text_files()
                for x in check_no_credentials_in_text(p.read_text())]
    problems += [f"{rel}: {x}" for rel in yaml_files() for d in load(rel) for x in check_no_credentials_in_doc(d)]
    assert not problems, problems


def test_service_account_carries_the_cloud_identity():
    (_, account), = docs_of_kind("ServiceAccount")
    assert account["metadata"]["name"] == SERVICE_ACCOUNT
    role = (account["metadata"].get("annotations") or {}).get("eks.amazonaws.com/role-arn", "")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role), role


def test_raycluster():
    (_, doc), = docs_of_kind("RayCluster")
    assert check_raycluster_spec(doc["spec"]) == []
    assert doc["spec"]["enableInTreeAutoscaling"] is True  # GPU workers scale from 0 between runs


def test_rayjob():
    for _, doc in docs_of_kind("RayJob"):
        assert check_rayjob(doc) == []


def test_raycronjob():
    for _, doc in docs_of_kind("RayCronJob"):
        assert check_raycronjob(doc) == []
    values = load("kuberay/operator-values.yaml")[0]
    assert {"name": "RayCronJob", "enabled": True} in values["featureGates"]


def test_cronjob_submits_to_the_long_lived_cluster():
    (_, cluster), = docs_of_kind("RayCluster")
    for _, doc in docs_of_kind("CronJob"):
        assert check_cronjob(doc) == []
        container = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        script = submitted(doc)
        assert HEAD_ADDRESS.search(script).group(1) == cluster["metadata"]["name"]
        token = next(e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]
        assert token == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}
        spec = cluster["spec"]
        (command,) = python_commands(script)
        assert check_job_command(command, gpu_capacity(spec), cpus(gpu_groups(spec)[0])) == []


def test_cluster_launcher_config():
    (config,) = load("cluster-launcher/aws.yaml")
    assert check_launcher(config) == []


def test_dockerfile_installs_the_project_with_the_constraints():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"(?m)^ARG RAY_IMAGE=rayproject/ray:\S+$", text) and "FROM ${RAY_IMAGE}" in text
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in text
    assert re.search(r"pip install .*-c constraints\.txt", text)


def test_shell_scripts_parse_and_are_executable():
    scripts = sorted(INFRA.rglob("*.sh"))
    assert {p.name for p in scripts} >= {"local-cluster.sh", "local-schedule.sh"}
    for path in scripts:
        assert check_shell(path) == [], path
        assert path.stat().st_mode & 0o111, f"{path} is not executable"


def test_readme_describes_every_file():
    readme = (INFRA / "README.md").read_text()
    missing = [str(p.relative_to(INFRA)) for p in text_files()
               if p.name != "README.md" and str(p.relative_to(INFRA)) not in readme]
    assert not missing, f"infra/README.md does not mention {missing}"


def check_shell(path: Path) -> list[str]:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    return [result.stderr.strip()] if result.returncode else []


# ================================================================ the checks catch broken manifests

def one(kind: str) -> dict:
    return copy.deepcopy(docs_of_kind(kind)[0][1])


def gpu_group(spec: dict) -> dict:
    return gpu_groups(spec)[0]


def has(problems: list[str], text: str) -> bool:
    return any(text in p for p in problems)


@pytest.mark.parametrize("schedule, gap", [
    ("30 2 * * *", 86400), ("*/15 * * * *", 900), ("0 0 * * 1", 7 * 86400), ("0 3 * * 1-5", 86400),
    ("0 0,12 * * *", 12 * 3600), ("@hourly", 3600), ("0 0 1 * *", 28 * 86400), ("0 0 1,15 * 1", 86400),
])
def test_cron_min_gap(schedule, gap):
    assert cron_min_gap(schedule) == gap


@pytest.mark.parametrize("schedule", ["61 * * * *", "* * * *", "0 0 * * mon", "*/0 * * * *", ""])
def test_cron_min_gap_rejects_bad_schedules(schedule):
    with pytest.raises(ValueError):
        cron_min_gap(schedule)


def test_referenced_files_check_catches_missing_and_misplaced_files():
    assert check_referenced_files("python jobs/train.py --spec jobs/specs/smoke.yaml") == []
    assert check_referenced_files(f"python {IMAGE_ROOT}jobs/train.py") == []
    assert has(check_referenced_files("python jobs/nope.py --spec jobs/specs/smoke.yaml"),
               "jobs/nope.py does not exist")
    assert has(check_referenced_files("--spec jobs/specs/nope.yaml"), "jobs/specs/nope.yaml does not exist")
    assert has(check_referenced_files("python /opt/app/jobs/train.py"), "must start with")


def test_job_command_check_catches_local_storage_and_oversized_jobs():
    good = shlex.split(f"python {IMAGE_ROOT}jobs/train.py --spec {IMAGE_ROOT}jobs/specs/shakespeare.yaml "
                       "--set run.storage=s3://b/runs --set 'data.sources=[s3://b/corpus/]' "
                       "--set data.dataset_root=s3://b/datasets --set cluster.use_gpu=true --set cluster.num_workers=2")
    assert check_job_command(good, gpu_capacity=2, cpus_per_pod=7) == []
    assert has(check_job_command(good, gpu_capacity=1), "> the GPU group's 1 GPUs")
    assert has(check_job_command(good + ["--set", "cluster.cpus_per_worker=8"], 2, 7), "cpus_per_worker 8")
    assert has(check_job_command(good + ["--set", "cluster.use_gpu=false"], 2), "cluster.use_gpu is false")
    assert has(check_job_command(good[:4]), "run.storage")  # the spec's own ~/charnn/runs
    assert has(check_job_command(good + ["--set", "data.sources=[corpus:shakespeare]"]), "data.sources")
    assert has(check_job_command(good + ["--set", "train.lr=-1"]), "the spec does not load")
    assert has(check_job_command(good[:2]), "no --spec")


def test_version_checks_catch_other_ray_versions():
    ray, project = ray_pin(), pyproject()["project"]["version"]
    assert check_image(f"rayproject/ray:{ray}-py311-gpu", ray, project) == []
    assert check_image(f"ghcr.io/x/charnn:{project}-ray{ray}-py311-gpu", ray, project) == []
    for image in ("rayproject/ray:latest", "rayproject/ray", "rayproject/ray:2.0.0-py311-gpu",
                  f"ghcr.io/x/charnn:{project}-ray2.0.0-py311-gpu", f"ghcr.io/x/charnn:9.9.9-ray{ray}-gpu",
                  "docker.io/library/python:3.11"):
        assert check_image(image, ray, project), image
    cluster = one("RayCluster")
    cluster["spec"]["rayVersion"] = "2.0.0"
    assert has(check_versions_in_doc(cluster, ray, project), "rayVersion '2.0.0'")
    assert has(check_versions_in_text("FROM rayproject/ray:2.0.0-py311-gpu", ray, project), "2.0.0")


def test_credential_checks_catch_inline_secrets():
    key_id = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documentation example, split so this file stays clean
    assert has(check_no_credentials_in_text(f"aws_access_key_id = {key_id}"), "access key id")
    assert has(check_no_credentials_in_text("aws_secret_access_key = x"), "aws_secret_access_key")
    assert has(check_no_credentials_in_text("--env RAY_AUTH_TOKEN=0123abcd"), "RAY_AUTH_TOKEN")
    assert check_no_credentials_in_text('RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"') == []
    cronjob = one("CronJob")
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "RAY_AUTH_TOKEN", "value": "0123abcd"},
                        {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]
    problems = check_no_credentials_in_doc(cronjob)
    assert has(problems, "env RAY_AUTH_TOKEN") and has(problems, "env AWS_SECRET_ACCESS_KEY")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"auth_token": "x"}}
    assert has(check_no_credentials_in_doc(secret), "create it with kubectl")


def test_raycluster_check_catches_broken_clusters():
    def broken(change) -> list[str]:
        spec = one("RayCluster")["spec"]
        change(spec)
        return check_raycluster_spec(spec)

    assert has(broken(lambda s: gpu_group(s)["template"]["spec"]["containers"][0]["resources"].update(limits={})),
               "no group requests nvidia.com/gpu")
    assert has(broken(lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer")), "in-cluster")
    assert has(broken(lambda s: s.pop("authOptions")), "authOptions.mode")
    assert has(broken(lambda s: s.update(workerGroupSpec=[])), "workerGroupSpec: not a field")
    assert has(broken(lambda s: s.pop("rayVersion")), "rayVersion: missing")
    assert has(broken(lambda s: gpu_group(s).update(minReplicas=5)), "minReplicas <= replicas")
    assert has(broken(lambda s: gpu_group(s)["template"]["spec"].pop("tolerations")), "toleration")
    assert has(broken(lambda s: gpu_group(s)["template"]["spec"].pop("serviceAccountName")), "serviceAccountName")
    assert has(broken(lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
                      .update({"nvidia.com/gpu": 1})), "the head is a CPU node")


def test_rayjob_check_catches_broken_jobs():
    def broken(change) -> list[str]:
        doc = one("RayJob")
        change(doc["spec"])
        return check_rayjob(doc)

    assert has(broken(lambda s: s.update(shutdownAfterJobFinishes=False)), "ttlSecondsAfterFinished needs")
    assert has(broken(lambda s: (s.update(shutdownAfterJobFinishes=False), s.pop("ttlSecondsAfterFinished"))),
               "the cluster would outlive the job")
    assert has(broken(lambda s: s.pop("activeDeadlineSeconds")), "activeDeadlineSeconds")
    assert has(broken(lambda s: s.update(backoffLimit=-1)), "backoffLimit")
    assert has(broken(lambda s: s.update(entrypoint=s["entrypoint"].replace("jobs/train.py", "jobs/trian.py"))),
               "jobs/trian.py does not exist")
    assert has(broken(lambda s: s.update(entrypoint=s["entrypoint"] + " --set cluster.num_workers=8")),
               "cluster.num_workers 8")
    assert has(broken(lambda s: s.update(entrypoint="echo hi")), "entrypoint: should be one")
    assert has(broken(lambda s: s.update(clusterSelector={"ray.io/cluster": "x"})), "exactly one of")
    doc = one("RayJob")
    doc["metadata"]["name"] = "x" * 48
    assert has(check_rayjob(doc), "1 to 47 characters")


def test_raycronjob_check_catches_overlap_and_dropped_fields():
    def broken(change) -> list[str]:
        doc = one("RayCronJob")
        change(doc["spec"])
        return check_raycronjob(doc)

    assert has(broken(lambda s: s.update(concurrencyPolicy="Forbid")), "concurrencyPolicy: not a field")
    assert has(broken(lambda s: s.pop("schedule")), "no schedule")
    assert has(broken(lambda s: s.update(schedule="every night")), "schedule:")
    assert has(broken(lambda s: s["jobTemplate"].update(activeDeadlineSeconds=90000)), "runs can overlap")
    assert has(broken(lambda s: s.update(schedule="0 */4 * * *")), "runs can overlap")
    assert has(broken(lambda s: s["jobTemplate"].pop("activeDeadlineSeconds")), "no activeDeadlineSeconds")
    assert has(broken(lambda s: s["jobTemplate"].update(shutdownAfterJobFinishes=True)), "deletionRules exclude")
    assert has(broken(lambda s: s["jobTemplate"]["deletionStrategy"]["deletionRules"][0]["condition"]
                      .update(ttlSeconds=10**6)), "must grow")  # DeleteCluster after DeleteSelf
    assert has(broken(lambda s: s["jobTemplate"]["deletionStrategy"].update(deletionRules=[
        r for r in s["jobTemplate"]["deletionStrategy"]["deletionRules"]
        if r["condition"].get("jobStatus") != "FAILED"])), "when the job is FAILED")


def test_cronjob_check_catches_overlap_and_missing_auth():
    def broken(change) -> list[str]:
        doc = one("CronJob")
        change(doc["spec"], doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0])
        return check_cronjob(doc)

    assert has(broken(lambda s, c: s.update(concurrencyPolicy="Allow")), "should be Forbid")
    assert has(broken(lambda s, c: s.pop("concurrencyPolicy")), "should be Forbid")
    assert has(broken(lambda s, c: s.pop("schedule")), "no schedule")
    assert has(broken(lambda s, c: s["jobTemplate"]["spec"].update(activeDeadlineSeconds=86400)), "runs can overlap")
    assert has(broken(lambda s, c: c.update(env=[e for e in c["env"] if e["name"] != "RAY_AUTH_MODE"])),
               "RAY_AUTH_MODE")
    assert has(broken(lambda s, c: c.update(env=[{"name": "RAY_AUTH_TOKEN", "value": "x"}])), "secretKeyRef")
    assert has(broken(lambda s, c: c.update(args=[a.replace("-head-svc:8265", ":8265") for a in c["args"]])),
               "head-svc")
    assert has(broken(lambda s, c: c.update(args=[a.replace("ray job submit", "ray submit") for a in c["args"]])),
               "ray job submit")
    assert has(broken(lambda s, c: s.update(concurrency_policy="Forbid")), "concurrency_policy: not a field")


def test_launcher_check_catches_broken_configs():
    def broken(change) -> list[str]:
        (config,) = copy.deepcopy(load("cluster-launcher/aws.yaml"))
        change(config)
        return check_launcher(config)

    workers = lambda c: c["available_node_types"]["ray.worker.gpu"]  # noqa: E731
    assert has(broken(lambda c: workers(c)["node_config"].pop("IamInstanceProfile")), "IamInstanceProfile")
    assert has(broken(lambda c: workers(c)["node_config"].update(InstanceType="m5.large")), "no GPU worker")
    assert has(broken(lambda c: c.update(setup_command=[])), "setup_command")  # Ray's schema: unknown key
    assert has(broken(lambda c: c.pop("cluster_name")), "cluster_name")
    assert has(broken(lambda c: c["docker"].update(run_options=[])), "RAY_AUTH_MODE")
    assert has(broken(lambda c: c.update(head_node_type="nope")), "head_node_type")


def test_shell_check_catches_syntax_errors(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("if true; then echo unclosed\n")
    assert check_shell(bad)
