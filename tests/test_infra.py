"""infra/check.py, the offline checker of the cluster manifests: no problem in the real files, and
each check fails on a copy of infra/ that breaks one thing.  Also infra/local-cluster.sh's token
permissions, with a stub `ray`.  No Ray, network or kubectl.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("infra_check", REPO / "infra" / "check.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)
RAY, _ = check.check_pins(REPO)

RC, RJ, RCJ = "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/raycronjob-retrain.yaml"
CJ, AWS, SA = "kubernetes/cronjob-submit.yaml", "cluster-launcher/aws.yaml", "kuberay/serviceaccount.yaml"
LC, LS, DF, RM = "local-cluster.sh", "local-schedule.sh", "docker/Dockerfile", "README.md"
RS = "kuberay/rayservice-generate.yaml"
KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documentation example, split so that this file stays clean


def sub(old: str, new: str) -> Callable[[str], str]:
    """Replace every `old` (which must be there) in a file's text."""
    def change(text: str) -> str:
        assert old in text, old
        return text.replace(old, new)
    return change


def chain(*changes: Callable[[str], str]) -> Callable[[str], str]:
    """Several changes to one file, in order."""
    def change(text: str) -> str:
        for one in changes:
            text = one(text)
        return text
    return change


def add(extra: str) -> Callable[[str], str]:
    return lambda text: text + extra


def doc(change: Callable[[dict], object]) -> Callable[[str], str]:
    """Edit a one-document YAML file as data."""
    def edit(text: str) -> str:
        data = yaml.safe_load(text)
        change(data)
        return yaml.safe_dump(data, sort_keys=False)
    return edit


def spec(change: Callable[[dict], object]) -> Callable[[str], str]:
    """Edit the spec of a one-document YAML file; for a RayCronJob, the spec of its RayJobs."""
    return doc(lambda d: change(d["spec"]["jobTemplate"] if d["kind"] == "RayCronJob" else d["spec"]))


def serve_app(change: Callable[[dict], object]) -> Callable[[str], str]:
    """Edit the first application of a RayService's serveConfigV2 as data."""
    def edit(d: dict) -> None:
        config = yaml.safe_load(d["spec"]["serveConfigV2"])
        change(config["applications"][0])
        d["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)
    return doc(edit)


def rs_cluster(change: Callable[[dict], object]) -> Callable[[str], str]:
    """Edit a RayService's rayClusterConfig as data."""
    return doc(lambda d: change(d["spec"]["rayClusterConfig"]))


def gpu_pod(cluster_spec: dict) -> dict:
    return cluster_spec["workerGroupSpecs"][0]["template"]["spec"]


def head(cluster_spec: dict) -> dict:
    return cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def submitter(d: dict) -> dict:
    return d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def set_env(container: dict, name: str, *entry: dict) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name] + list(entry)


def top(key: str, value: object = None) -> Callable[[str], str]:
    """Set (or, without a value, drop) a key of the document's top level, or of its spec when it has one."""
    return doc(lambda d: (d.get("spec", d).pop(key) if value is None else d.get("spec", d).update({key: value})))


# (case, file under infra/, change, the problems it must cause: one substring each, and no other problem)
CASES = [
    # job files named anywhere, the script each schedule runs
    ("missing-script", LC, sub("python jobs/train.py", "python jobs/nope.py"), ["jobs/nope.py does not exist"]),
    ("missing-spec", RCJ, sub("specs/shakespeare-retrain.yaml", "specs/nope.yaml"), ["specs/nope.yaml does not exist"]),
    ("path-outside-image", RJ, sub("/home/ray/charnn/jobs/train.py", "/opt/app/jobs/train.py"), ["must start with"]),
    ("typo-in-entrypoint", RJ, sub("jobs/train.py", "jobs/trian.py"),
     ["jobs/trian.py does not exist", "should run jobs/train.py"]),
    ("wrong-script", RCJ, sub("jobs/retrain.py --spec", "jobs/train.py --spec"), ["should run jobs/retrain.py"]),
    ("local-schedule-no-retrain", LS, sub("python jobs/retrain.py", "python jobs/train.py"), ["`python jobs/retrain"]),
    # the job's spec, storage and GPU group
    ("no-spec", RJ, sub("--spec /home/ray/charnn/jobs/specs/shakespeare.yaml", ""), ["no --spec"]),
    ("spec-does-not-load", RCJ, sub("max_failures=3", "max_failures=3 --set train.lr=-1"), ["the spec does not load"]),
    ("local-run-storage", RJ, sub("run.storage=s3://my-bucket/charnn/runs", "run.storage=/tmp/runs"),
     ["run.storage '/tmp/runs' is not shared storage"]),
    ("local-sources", CJ, sub("[s3://my-bucket/corpora/shakespeare/]", "[corpus:shakespeare]"),
     ["data.sources 'corpus:shakespeare' is not shared"]),
    ("use-gpu-false", RCJ, sub("cluster.use_gpu=true", "cluster.use_gpu=false"), ["cluster.use_gpu is false"]),
    ("more-workers-than-gpus", RJ, sub("num_workers=2", "num_workers=3"),
     ["2 GPUs at maxReplicas, should have cluster.num_workers 3"]),
    ("file-url-storage", RJ, sub("run.storage=s3://my-bucket/charnn/runs", "run.storage=file:///mnt/runs"),
     ["run.storage 'file:///mnt/runs' is not shared storage"]),
    # workers: elastic jobs, the GPU groups' replicas, the launcher's node types
    ("min-replicas-not-min-workers", RJ, sub("minReplicas: 1  #", "minReplicas: 2  #"),
     ["2 GPUs at minReplicas, should have cluster.min_workers 1"]),
    ("max-replicas-over-num-workers", RCJ, sub("maxReplicas: 2  #", "maxReplicas: 3  #"),
     ["3 GPUs at maxReplicas, should have cluster.num_workers 2"]),
    ("not-elastic-varying-replicas", RJ, sub("--set cluster.min_workers=1\n", ""),
     ["1 GPUs at minReplicas, should have cluster.min_workers 2"]),
    ("min-workers-over-num-workers", RJ, sub("min_workers=1", "min_workers=3"), ["the spec does not load"]),
    ("elastic-no-retries", RJ, sub("max_failures=3", "max_failures=0"), ["needs cluster.max_failures >= 1"]),
    ("elastic-default-retries", RCJ, sub("\n      --set cluster.max_failures=3", ""),
     ["needs cluster.max_failures >= 1"]),
    ("elastic-no-autoscaling", RJ, spec(lambda s: s["rayClusterSpec"].update(enableInTreeAutoscaling=False)),
     ["needs enableInTreeAutoscaling: true"]),
    ("elastic-raycronjob-no-autoscaling", RCJ, spec(lambda s: s["rayClusterSpec"].pop("enableInTreeAutoscaling")),
     ["needs enableInTreeAutoscaling: true"]),
    ("elastic-on-shared-cluster", CJ, sub("max_failures=3 &", "max_failures=3 --set cluster.min_workers=1 &"), []),
    ("elastic-on-shared-cluster-no-retries", CJ,
     sub("max_failures=3 &", "max_failures=0 --set cluster.min_workers=1 &"), ["needs cluster.max_failures >= 1"]),
    ("launcher-too-few-gpus", AWS, sub("max_workers: 4  # the largest", "max_workers: 1  # the largest"),
     ["hold 1 GPUs at max_workers, fewer than the largest job's cluster.num_workers 2"]),
    ("launcher-cluster-limit", AWS, sub("max_workers: 4\nupscaling", "max_workers: 1\nupscaling"),
     ["max_workers 1: the largest job's cluster.num_workers 2 needs 2 GPU nodes"]),
    ("launcher-min-over-max", AWS, sub("min_workers: 0  #", "min_workers: 5  #"), ["min_workers 5 > max_workers 4"]),
    ("launcher-multi-gpu-nodes", AWS, doc(lambda d: d["available_node_types"]["ray.worker.gpu"].update(
        max_workers=1, resources={"GPU": 2})), []),
    ("launcher-under-largest-job", RJ,
     chain(sub("num_workers=2", "num_workers=6"), sub("maxReplicas: 2", "maxReplicas: 6")),
     ["the GPU node types hold 4 GPUs at max_workers, fewer than the largest job's cluster.num_workers 6",
      "max_workers 4: the largest job's cluster.num_workers 6 needs 6 GPU nodes"]),
    ("cluster-too-small", RC, sub("maxReplicas: 4", "maxReplicas: 1"), ["cluster.num_workers 2 > the GPU group's 1"]),
    ("more-cpus-than-pod", CJ, sub("cpus_per_worker=4", "cpus_per_worker=8"), ["cpus_per_worker 8 > the GPU pod's 7"]),
    # versions
    ("image-latest", CJ, sub(f"rayproject/ray:{RAY}-py311-cpu", "rayproject/ray:latest"), ["pin a tag"]),
    ("image-untagged", CJ, sub(f"rayproject/ray:{RAY}-py311-cpu", "rayproject/ray"), ["pin a tag"]),
    ("image-not-ray", CJ, sub(f"rayproject/ray:{RAY}-py311-cpu", "docker.io/library/python:3.11"),
     ["not rayproject/ray nor"]),
    ("ray-image-other-ray", CJ, sub(f"rayproject/ray:{RAY}-", "rayproject/ray:2.0.0-"), ["the pinned Ray"]),
    ("charnn-image-other-ray", AWS, sub(f"-ray{RAY}-", "-ray2.0.0-"), ["ray2.0.0-py311-gpu: the tag should start"]),
    ("charnn-image-other-version", RC, sub("charnn:0.1.0-ray", "charnn:9.9.9-ray"), ["charnn:9.9.9"]),
    ("rayversion", RC, sub(f'rayVersion: "{RAY}"', 'rayVersion: "2.0.0"'), ["rayVersion '2.0.0' != the pinned Ray"]),
    ("dockerfile-other-ray", DF, sub(f"rayproject/ray:{RAY}", "rayproject/ray:2.0.0"), ["2.0.0-py311-gpu: the tag"]),
    # credentials
    ("access-key-id", LC, add(f"# aws_access_key_id = {KEY_ID}\n"), ["an AWS access key id"]),
    ("secret-access-key", RM, add("aws_secret_access_key = x\n"), ["an aws_secret_access_key setting"]),
    ("literal-token", AWS, sub("    - --env RAY_AUTH_MODE=token\n",
                                "    - --env RAY_AUTH_MODE=token\n    - --env RAY_AUTH_TOKEN=0123\n"),
     ["a literal RAY_AUTH_TOKEN"]),
    ("token-from-file-is-fine", LC, add('RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"\n'), []),
    ("env-literal-secret", RC, spec(lambda s: head(s)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"})),
     ["env AWS_SECRET_ACCESS_KEY has a literal value"]),
    ("secret-in-manifest", SA, add("---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {k: x}\n"),
     ["values in a manifest", "should hold [('v1', 'ServiceAccount')]"]),
    # RayCluster
    ("no-gpu-limits", RC, spec(lambda s: gpu_pod(s)["containers"][0]["resources"].update(limits={})),
     ["no group requests nvidia.com/gpu", "cluster.num_workers 2 > the GPU group's 0 GPUs"]),
    ("load-balancer", RC, spec(lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer")), ["in-cluster"]),
    ("no-token-auth", RC, spec(lambda s: s["authOptions"].update(mode="disabled")), ["authOptions.mode"]),
    ("misspelt-field", RC, top("workerGroupSpec", []), ["workerGroupSpec: not a field"]),
    ("no-rayversion", RC, top("rayVersion"), ["rayVersion: missing"]),
    ("replica-order", RC, spec(lambda s: s["workerGroupSpecs"][0].update(minReplicas=5)), ["minReplicas <= replicas"]),
    ("no-toleration", RC, spec(lambda s: gpu_pod(s).pop("tolerations")), ["toleration"]),
    ("no-service-account", RC, spec(lambda s: gpu_pod(s).pop("serviceAccountName")), ["serviceAccountName"]),
    ("gpu-head", RC, spec(lambda s: head(s)["resources"]["limits"].update({"nvidia.com/gpu": 1})), ["a CPU node"]),
    ("no-autoscaling", RC, top("enableInTreeAutoscaling", False),
     ["enableInTreeAutoscaling", "cluster.num_workers 2 > the GPU group's 0 GPUs"]),
    # RayJob
    ("ttl-without-shutdown", RJ, top("shutdownAfterJobFinishes", False), ["ttlSecondsAfterFinished needs"]),
    ("cluster-outlives-job", RJ, spec(lambda s: (s.update(shutdownAfterJobFinishes=False),
                                                 s.pop("ttlSecondsAfterFinished"))), ["outlive the job"]),
    ("no-job-deadline", RJ, top("activeDeadlineSeconds"), ["activeDeadlineSeconds: set it"]),
    ("negative-backoff", RJ, top("backoffLimit", -1), ["backoffLimit"]),
    ("no-python-command", RJ, top("entrypoint", "echo hi"), ["entrypoint: should be one"]),
    ("cluster-and-selector", RJ, top("clusterSelector", {"ray.io/cluster": "x"}), ["exactly one of"]),
    ("rayjob-name-too-long", RJ, doc(lambda d: d["metadata"].update(name="x" * 48)), ["1 to 47 characters"]),
    # RayCronJob
    ("concurrency-policy-dropped", RCJ, top("concurrencyPolicy", "Forbid"), ["concurrencyPolicy: not a field"]),
    ("raycronjob-no-schedule", RCJ, top("schedule"), ["spec.schedule: missing"]),
    ("raycronjob-bad-schedule", RCJ, top("schedule", "every night"), ["spec.schedule: cron"]),
    ("deadline-over-interval", RCJ, spec(lambda s: s.update(activeDeadlineSeconds=90000)), ["runs can overlap"]),
    ("schedule-under-deadline", RCJ, top("schedule", "0 */4 * * *"), ["runs can overlap"]),
    ("raycronjob-no-deadline", RCJ, spec(lambda s: s.pop("activeDeadlineSeconds")), ["activeDeadlineSeconds: set it"]),
    ("rules-and-shutdown", RCJ, spec(lambda s: s.update(shutdownAfterJobFinishes=True)), ["deletionRules exclude"]),
    ("deletion-order", RCJ, spec(lambda s: s["deletionStrategy"]["deletionRules"][0]["condition"].update(
        ttlSeconds=10**6)), ["must grow"]),  # DeleteCluster after DeleteSelf
    ("no-rule-for-failed", RCJ, spec(lambda s: s["deletionStrategy"].update(deletionRules=[
        r for r in s["deletionStrategy"]["deletionRules"] if r["condition"].get("jobStatus") != "FAILED"])),
     ["when the job is FAILED"]),
    ("raycronjob-name-too-long", RCJ, doc(lambda d: d["metadata"].update(name="x" * 37)), ["1 to 36 characters"]),
    ("gate-off", "kuberay/operator-values.yaml", doc(lambda d: d["featureGates"][0].update(enabled=False)),
     ["should enable RayCronJob"]),
    # CronJob
    ("concurrency-allow", CJ, top("concurrencyPolicy", "Allow"), ["should be Forbid"]),
    ("concurrency-default", CJ, top("concurrencyPolicy"), ["should be Forbid"]),
    ("cronjob-no-schedule", CJ, top("schedule"), ["spec.schedule: missing"]),
    ("cronjob-deadline-over-interval", CJ, sub("activeDeadlineSeconds: 21600", "activeDeadlineSeconds: 86400"),
     ["runs can overlap"]),
    ("no-auth-mode", CJ, doc(lambda d: set_env(submitter(d), "RAY_AUTH_MODE")), ["RAY_AUTH_MODE"]),
    ("literal-token-env", CJ, doc(lambda d: set_env(submitter(d), "RAY_AUTH_TOKEN", {"name": "RAY_AUTH_TOKEN",
                                                                                     "value": "x"})),
     ["valueFrom.secretKeyRef {", "env RAY_AUTH_TOKEN has a literal value"]),
    ("other-secret", CJ, sub("name: charnn-ray-auth", "name: other-auth"), ["valueFrom.secretKeyRef {"]),
    ("no-head-address", CJ, sub("-head-svc:8265", ":8265"), ["no job server address"]),
    ("other-cluster", CJ, sub("http://charnn-head-svc", "http://other-head-svc"), ["the RayCluster charnn's"]),
    ("not-ray-job-submit", CJ, sub("ray job submit", "ray submit"), ["ray job submit"]),
    ("cronjob-misspelt-field", CJ, top("concurrency_policy", "Forbid"), ["concurrency_policy: not a field"]),
    # cluster launcher
    ("no-instance-profile", AWS, sub("Arn: arn:aws:iam::111122223333:instance-profile/charnn-ray-worker", "{}"),
     ["IamInstanceProfile"]),
    ("no-gpu-worker", AWS, sub("InstanceType: g5.2xlarge", "InstanceType: m5.large"), ["no GPU worker"]),
    ("launcher-unknown-key", AWS, top("setup_command", []), ["setup_command"]),
    ("launcher-no-name", AWS, top("cluster_name"), ["cluster_name"]),
    ("launcher-no-token-auth", AWS, doc(lambda d: d["docker"].update(run_options=[])), ["RAY_AUTH_MODE"]),
    ("launcher-head-type", AWS, top("head_node_type", "nope"), ["head_node_type"]),
    # RayService: the Serve config, its application, the cluster that serves it
    ("rs-config-does-not-parse", RS, sub("proxy_location: EveryNode", "proxy_location: [EveryNode"),
     ["spec.serveConfigV2: does not parse"]),
    ("rs-serve-schema", RS, sub("proxy_location: EveryNode", "proxy_location: Everywhere"),
     ["serveConfigV2.proxy_location: Input should be"]),
    ("rs-serve-misspelt-field", RS, sub("route_prefix: /", "route_prefx: /"),
     ["applications[0].route_prefx: not a field of Ray Serve"]),
    ("rs-deployment-misspelt-field", RS, serve_app(lambda a: a.update(deployments=[{"name": "Generator",
                                                                                   "num_replica": 3}])),
     ["deployments[0].num_replica: not a field of Ray Serve"]),
    ("rs-route-prefix", RS, sub("route_prefix: /  #", "route_prefix: /charnn  #"), ["route_prefix: should be /"]),
    ("rs-missing-module", RS, sub("charnn.serve:app", "charnn.nope:app"),
     ["charnn/nope.py does not exist", "no application runs charnn.serve:app"]),
    ("rs-missing-name", RS, sub("import_path: charnn.serve:app", "import_path: charnn.serve:application"),
     ["charnn/serve.py defines no application", "no application runs charnn.serve:app"]),
    ("rs-dotted-import-path", RS, sub("import_path: charnn.serve:app", "import_path: charnn.serve.app"), []),
    ("rs-outside-package", RS, sub("import_path: charnn.serve:app", "import_path: serve_app:app"),
     ["should be charnn.MODULE:NAME", "no application runs charnn.serve:app"]),
    ("rs-unknown-arg", RS, sub("replicas: 2  #", "replica: 2  #"), ["args.replica: not an argument of charnn.serve"]),
    ("rs-local-storage", RS, sub("storage: s3://my-bucket/charnn/runs", "storage: /mnt/runs"),
     ["args.storage '/mnt/runs': is not shared storage"]),
    ("rs-file-url-storage", RS, sub("storage: s3://my-bucket/charnn/runs", "storage: file:///mnt/runs"),
     ["args.storage 'file:///mnt/runs': is not shared storage"]),
    ("rs-no-storage", RS, serve_app(lambda a: a["args"].pop("storage")), ["args.storage: missing"]),
    ("rs-no-model", RS, serve_app(lambda a: a["args"].pop("model")), ["args.model: missing"]),
    ("rs-other-model", RS, sub("model: shakespeare", "model: sonnets"),
     ["no retrain job here publishes to s3://my-bucket/charnn/runs/models/sonnets/"]),
    ("rs-other-storage", RS, sub("storage: s3://my-bucket/charnn/runs", "storage: s3://other-bucket/runs"),
     ["no retrain job here publishes to s3://other-bucket/runs/models/shakespeare/"]),
    ("rs-storage-trailing-slash", RS, sub("/my-bucket/charnn/runs  # CHANGE", "/my-bucket/charnn/runs/  # CHANGE"), []),
    ("rs-credentials-in-url", RS, sub("# endpoint_url: https://minio.example:9000",
                                      "endpoint_url: https://admin:hunter2@minio.example:9000"),
     ["serveConfigV2: a value carries credentials: https://***@minio"]),
    ("rs-secret-in-runtime-env", RS, serve_app(lambda a: a.update(runtime_env={"env_vars": {
        "AWS_SECRET_ACCESS_KEY": "x"}})), ["an aws_secret_access_key setting"]),
    ("rs-no-serve-port", RS, sub("                - containerPort: 8000\n                  name: serve", ""),
     ["the head container needs a port named serve, 8000"]),
    ("rs-other-http-port", RS, sub("port: 8000  #", "port: 9000  #"),
     ["the head container needs a port named serve, 9000", "workerGroupSpecs[0]: its port named serve should be 9000"]),
    ("rs-too-many-replicas", RS, sub("replicas: 2  #", "replicas: 5  #"),
     ["args.replicas: 5 replicas of 1 CPU > the cluster's 4 CPUs"]),
    ("rs-replicas-at-max-replicas", RS, chain(sub("replicas: 2  #", "replicas: 6  #"), rs_cluster(lambda c: (
        c.update(enableInTreeAutoscaling=True), c["workerGroupSpecs"][0].update(maxReplicas=3)))), []),
    ("rs-misspelt-spec-field", RS, doc(lambda d: d["spec"].update(rayClusterSpec=d["spec"].pop("rayClusterConfig"))),
     ["spec.rayClusterSpec: not a field", "spec.rayClusterConfig: missing"]),
    ("rs-name-too-long", RS, doc(lambda d: d["metadata"].update(name="x" * 48)), ["1 to 47 characters"]),
    ("rs-rayversion", RS, sub(f'rayVersion: "{RAY}"', 'rayVersion: "2.0.0"'), ["rayVersion '2.0.0' != the pinned Ray"]),
    ("rs-image-other-version", RS, sub("charnn:0.1.0-ray", "charnn:9.9.9-ray"), ["charnn:9.9.9"]),
    ("rs-no-token-auth", RS, rs_cluster(lambda c: c["authOptions"].update(mode="disabled")), ["authOptions.mode"]),
    ("rs-load-balancer", RS, rs_cluster(lambda c: c["headGroupSpec"].update(serviceType="LoadBalancer")),
     ["in-cluster"]),
    ("rs-no-service-account", RS, rs_cluster(lambda c: c["headGroupSpec"]["template"]["spec"].pop(
        "serviceAccountName")), ["serviceAccountName"]),
    ("readme-misses-rayservice", RM, sub(RS, "the serving manifest"), ["does not mention kuberay/rayservice-generate"]),
    # the other files
    ("service-account-name", SA, doc(lambda d: d["metadata"].update(name="other")), ["should be charnn-ray"]),
    ("service-account-role", SA, sub("role/charnn-ray-s3", "role/"), ["eks.amazonaws.com/role-arn"]),
    ("dockerfile-no-constraints", DF, sub("-c constraints.txt -e", "-e"), ["pip install -c constraints.txt"]),
    ("shell-syntax", LC, add("if true; then echo unclosed\n"), ["bash -n"]),
    ("readme-misses-a-file", RM, sub("local-schedule.sh", "the schedule"), ["does not mention local-schedule.sh"]),
    ("unclassified-yaml", "kuberay/extra.yaml", add("a: 1\n"), ["not classified", "does not mention kuberay/extra"]),
]


def test_the_real_files_have_no_problems():
    assert check.check() == []


@pytest.mark.parametrize("rel, change, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_check_catches_its_break(tmp_path, rel, change, expected):
    infra = tmp_path / "infra"
    shutil.copytree(REPO / "infra", infra, ignore=shutil.ignore_patterns("__pycache__"))
    path = infra / rel
    path.write_text(change(path.read_text() if path.exists() else ""))
    problems = check.check(infra)
    assert len(problems) == len(expected) and all(any(e in p for p in problems) for e in expected), problems


@pytest.mark.parametrize("schedule, gap", [
    ("30 2 * * *", 86400), ("*/15 * * * *", 900), ("0 0 * * 1", 7 * 86400), ("0 3 * * 1-5", 86400),
    ("0 0,12 * * *", 12 * 3600), ("@hourly", 3600), ("0 0 1 * *", 28 * 86400), ("0 0 1,15 * 1", 86400),
    ("61 * * * *", None), ("* * * *", None), ("0 0 * * mon", None), ("*/0 * * * *", None), ("", None),
])
def test_cron_min_gap(schedule, gap):
    if gap is None:
        with pytest.raises(ValueError):
            check.cron_min_gap(schedule)
    else:
        assert check.cron_min_gap(schedule) == gap


def test_the_checker_runs_on_its_own():
    result = subprocess.run([sys.executable, "infra/check.py"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr


@pytest.mark.parametrize("old_token", [False, True], ids=["new-token", "token-made-before"])
def test_local_cluster_start_keeps_the_token_private(tmp_path, old_token):
    """`local-cluster.sh start` with a stub `ray` that writes the token as Ray does (umask, no chmod)."""
    repo, home = tmp_path / "repo", tmp_path / "home"
    (repo / "infra").mkdir(parents=True)
    shutil.copy2(REPO / "infra" / "local-cluster.sh", repo / "infra")
    stub = repo / ".venv" / "bin" / "ray"  # the script puts its repository's .venv/bin first on PATH
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\necho "$*" >> "$HOME/ray-calls"\nif [ "$1" = get-auth-token ]; then\n  mkdir -p '
                    '"$HOME/.ray"; [ -f "$HOME/.ray/auth_token" ] || printf t > "$HOME/.ray/auth_token"\nfi\n')
    stub.chmod(0o755)
    if old_token:
        (home / ".ray").mkdir(parents=True)
        (home / ".ray").chmod(0o755)
        (home / ".ray" / "auth_token").write_text("t")
        (home / ".ray" / "auth_token").chmod(0o644)
    else:
        home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    subprocess.run(["bash", "-c", "umask 022 && infra/local-cluster.sh start"], cwd=repo, env=env, check=True)
    assert stat.S_IMODE((home / ".ray").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / ".ray" / "auth_token").stat().st_mode) == 0o600
    assert (home / "ray-calls").read_text().splitlines()[-1].startswith("start --head")
