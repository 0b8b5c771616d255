"""Credentials must not leak: redact()'s patterns, the spec Ray Train records, Ray's token file, and
one job on a real cluster whose source password comes from ``${NAME}``."""
from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest

from support.env import REPO
from support.jobs import last_json, run_job, write_corpus
from charnn.spec_loader import dump_spec, load_spec, spec_from_dict
from charnn.storage import redact, redact_urls

# --- redact() -------------------------------------------------------------------------------

MASKED = [
    # the audit's examples (F-18)
    ("https://user:p@ss@host/x", "https://***@host/x"),
    ("http://user:pa/ss@host/x", "http://***@host/x"),
    ("https://host/x?access_token=ya29.a0AfH6SM&y=1", "https://host/x?access_token=***&y=1"),
    ("gs://b/x?key=AIzaSyA1234567890abcdefghijklmnopqrstuv", "gs://b/x?key=***"),
    ("https://api.example.com/v1?apikey=0123abcd", "https://api.example.com/v1?apikey=***"),
    ("Authorization: Bearer eyJhbGciOi.J9eyJzdWIi.OiIxMjM0", "Authorization: Bearer ***"),
    ("retrying with bearer abc123DEF", "retrying with bearer ***"),
    ("aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key: ***"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY=***"),
    # userinfo, however odd
    ("https://user:pass@host/x", "https://***@host/x"),
    ("https://ghp_tokenAsUserName@github.com/o/r.txt", "https://***@github.com/o/r.txt"),
    ("redis://:p4ss@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("https://u:p%40ss@host:8443/x", "https://***@host:8443/x"),
    ("https://u:p?ss@host/x", "https://***@host/x"),
    ("https://u:p#ss@host/x", "https://***@host/x"),
    ("http://u:123/abc@host/x", "http://***@host/x"),
    ("http://user:p/a@ss@host/x?y=1", "http://***@host/x?y=1"),
    ("cannot read http://u:secret@h/x: 404", "cannot read http://***@h/x: 404"),
    ("[http://h/x,http://u:secret@h2/y]", "[http://h/x,http://***@h2/y]"),
    ("{'url': 'https://u:pw@h/x'}", "{'url': 'https://***@h/x'}"),
    # tokens in query strings, headers, environment and config lines
    ("https://h/x?X-Amz-Security-Token=FQoGZX&X-Amz-Signature=9f8e", "https://h/x?X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("s3://b/x?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F2024", "s3://b/x?X-Amz-Credential=***"),
    ("https://h/x?sig=abc&token=def&password=ghi", "https://h/x?sig=***&token=***&password=***"),
    ("https://h/x?api_key=k1&client_secret=s1&refresh_token=r1", "https://h/x?api_key=***&client_secret=***&refresh_token=***"),
    ("https://h/x?auth=abc", "https://h/x?auth=***"),
    ("aws_session_token = IQoJb3JpZ2luX2Vj", "aws_session_token = ***"),
    ('{"password": "hunter2", "user": "me"}', '{"password": "***", "user": "me"}'),
    ("curl -H 'Authorization: Bearer abc'", "curl -H 'Authorization: Bearer ***'"),
    ("authorization: basic dXNlcjpwYXNz", "authorization: basic ***"),
    ("Authorization: tok123", "Authorization: ***"),
    ("key id AKIAIOSFODNN7EXAMPLE", "key id AKIA***"),
    ("api key AIzaSyA1234567890abcdefghijklmnopqrstuv in a message", "api key AIza*** in a message"),
    # the second audit's residue (F-18)
    ("https://h/x?jwt=eyJhbGciOi.J9eyJzdWIi", "https://h/x?jwt=***"),
    ("https://h/x?passphrase=open-sesame&y=1", "https://h/x?passphrase=***&y=1"),
    ("Cookie: session=abc123; csrftoken=def", "Cookie: ***"),
    ("set-cookie: id=a3fWa; Max-Age=2592000", "set-cookie: ***"),
    ("cloning with ghp_16C7e42F292c6912E7710c838347Ae178B4a", "cloning with ghp_***"),
    ("token github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "token github_pat_***"),
    ("HF hub says hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345 is invalid", "HF hub says hf_*** is invalid"),
]

UNCHANGED = [
    "s3://bucket/key", "s3://bucket/keys/a.txt", "s3://bucket/runs?versionId=3", "https://host/path?x=1",
    "https://host:8443/a/b.txt", "http://127.0.0.1:8265", "/home/u/corpus/*.txt", "corpus:shakespeare",
    "https://registry.npmjs.org/@scope/pkg", "https://cdn.jsdelivr.net/npm/pkg@1.0/f.txt",
    "https://host/x?email=a@b.com",
    # Email addresses are not credentials: left as they are (only URLs' userinfo is masked).
    "mail a@b.com about it",
    "The specified key does not exist.", "NoSuchKey", "monkey=1", "train.steps=4", "key: value",
    "expected dotted.key=value", "sort_key=url", "s3://b/t/key=1/part-0.txt",
    '{"steps": 4, "tokens_per_s": 12.5, "train_loss": 1.25}', "seq_len: 30",
    "endpoint_url: http://127.0.0.1:9000", "the bearer of bad news", "",
]


@pytest.mark.parametrize("text, masked", MASKED)
def test_redact_masks(text, masked):
    assert redact(text) == masked


@pytest.mark.parametrize("text", UNCHANGED)
def test_redact_leaves_ordinary_text(text):
    assert redact(text) == text


@pytest.mark.parametrize("text", [t for t, _ in MASKED] + UNCHANGED)
def test_redact_is_idempotent(text):
    assert redact(redact(text)) == redact(text)


@pytest.mark.parametrize("text", [t for t, _ in MASKED] + UNCHANGED)
def test_redact_urls_agrees_with_redact(text):
    # redact_urls skips arrays that its prefilter says hold no credentials: it must never skip one.
    assert redact_urls(pa.array([text], pa.string())).to_pylist() == [redact(text)]
    many = [text, "s3://bucket/key"] * 3
    assert redact_urls(pa.array(many, pa.string())).to_pylist() == [redact(t) for t in many]


@pytest.mark.parametrize("text", [
    "data.sources" + ".a" * 50_000 + "=1", "_" * 100_000 + "=", "a-" * 50_000 + "token", "http://" + "u:" * 50_000 + "@",
    "http://" * 20_000 + "@", "bearer " * 20_000, "authorization: " * 20_000, "@" * 100_000 + "://",
])
def test_redact_takes_linear_time(text):
    # redact sees whatever a log line or an error holds; a pattern that backtracks would hang a job.
    import time

    start = time.perf_counter()
    redact(text)
    assert time.perf_counter() - start < 1.0


def test_describe_error_masks_before_it_cuts_the_message_short():
    from charnn.storage import describe_error

    exc = OSError("x" * 263 + " while reading http://charnn:FAKEpassword0123456789@host/a.txt")
    line = describe_error("http://charnn:FAKEpassword0123456789@host/a.txt", exc)
    assert "FAKEpass" not in line and line.startswith("http://***@host/a.txt: OSError: xxx")


# --- what Ray Train records (F-17 a) --------------------------------------------------------

def test_train_loop_config_holds_no_credentials(tmp_path, monkeypatch):
    from charnn.train.launch import make_trainer

    monkeypatch.setenv("CHARNN_TEST_TOKEN", "FAKEtok9931")
    spec = load_spec(str(REPO / "jobs" / "specs" / "smoke.yaml"), [
        "data.sources=[https://u:${CHARNN_TEST_TOKEN}@h/x, 'https://h/y?token=FAKEtok9932', /data/z]",
        f"run.storage={tmp_path / 'runs'}"])
    assert spec.data.sources[0] == "https://u:FAKEtok9931@h/x"  # the driver lists with the real one
    config = make_trainer(spec, str(tmp_path / "dataset")).train_loop_config
    text = json.dumps(config)
    assert "FAKEtok993" not in text
    assert config["spec"]["data"]["sources"] == ["https://***@h/x", "https://h/y?token=***", "/data/z"]
    worker_spec = spec_from_dict(config["spec"])  # what each worker builds
    assert dump_spec(worker_spec) == dump_spec(spec)  # the checkpoints' spec is the run's spec.yaml
    assert worker_spec.run == spec.run and worker_spec.storage == spec.storage


@pytest.mark.ray  # jobs (they stop before Ray starts, but take a job's start-up each)
@pytest.mark.parametrize("override", [
    "run.storage=s3://AKIAIOSFODNN7EXAMPLE:FAKEsecret7781@bucket/runs",
    "data.dataset_root=https://charnn:FAKEsecret7781@host/datasets",
    "storage.endpoint_url=http://minio:FAKEsecret7781@127.0.0.1:9000",
    "run.storage=s3://bucket/runs?X-Amz-Security-Token=FAKEsecret7781",
])
def test_jobs_refuse_credentials_that_workers_would_receive(tmp_path, override):
    proc, _ = run_job("train.py", "--spec", "jobs/specs/smoke.yaml", "--set", override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "FAKEsecret7781" not in proc.stderr + proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"charnn: error: {override.split('=')[0]} must not carry credentials"), line


# --- Ray's token file (F-19) ----------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_protect_token_tightens_modes(tmp_path, monkeypatch):
    from charnn.cli.runtime import protect_token

    monkeypatch.setenv("HOME", str(tmp_path))
    own = tmp_path / "elsewhere" / "token"
    own.parent.mkdir()
    own.write_text("t")
    own.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(own))
    protect_token()  # no ~/.ray yet: nothing to do, nothing created
    assert not (tmp_path / ".ray").exists() and _mode(own) == 0o600
    (tmp_path / ".ray").mkdir(mode=0o755)
    (tmp_path / ".ray" / "auth_token").write_text("t")
    (tmp_path / ".ray" / "auth_token").chmod(0o644)
    protect_token()
    assert _mode(tmp_path / ".ray") == 0o700 and _mode(tmp_path / ".ray" / "auth_token") == 0o600
    assert _mode(own.parent) == 0o755  # a custom token's directory is the user's own business


@pytest.mark.ray
def test_embedded_ray_leaves_its_token_private(tmp_path):
    """A real embedded Ray writes ~/.ray/auth_token 0644 under the usual umask; init_ray fixes it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="charnn-ray-") as temp_dir:  # Ray's socket paths must be short
        code = (
            "import functools, os, ray\n"
            "os.umask(0o022)\n"
            f"ray.init = functools.partial(ray.init, num_cpus=1, include_dashboard=False, _temp_dir={temp_dir!r})\n"
            "from charnn.cli.runtime import init_ray\n"
            "assert init_ray() is True\n"
            "ray.shutdown()\n")
        env = {**os.environ, "HOME": str(tmp_path / "home")}
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    token = tmp_path / "home" / ".ray" / "auth_token"
    assert token.is_file(), "Ray made no token: is token auth still its default for local clusters?"
    assert _mode(token.parent) == 0o700 and _mode(token) == 0o600


# --- a job on a real cluster (F-17 b, c) ----------------------------------------------------

# The job's driver inherits the environment of `ray start`: the cluster fixture copies os.environ
# when it starts, after every test module is imported.  (Ray records --runtime-env-json env_vars
# in the job's metadata, so a secret must not travel that way.)
PASSWORD = "FAKEpw" + secrets.token_hex(8)
os.environ["CHARNN_TEST_CORPUS_PASSWORD"] = PASSWORD


class _BasicAuthFiles(http.server.SimpleHTTPRequestHandler):
    expected = ""

    def send_head(self):
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="corpus"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return super().send_head()

    def log_message(self, *args):
        pass


def _dashboard_json(address: str, path: str):
    headers = {}
    token = os.environ.get("RAY_AUTH_TOKEN") or Path(
        os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").read_text().strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(address + path, headers=headers), timeout=30) as response:
            return response.read().decode()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')[-2000:]}") from None


@pytest.mark.ray
def test_a_secret_from_the_environment_never_reaches_ray_or_the_records(ray_cluster, tmp_path):
    write_corpus(tmp_path / "site" / "plays", documents=1, lines=300)
    handler = functools.partial(type("H", (_BasicAuthFiles,), {
        "expected": "Basic " + base64.b64encode(f"charnn:{PASSWORD}".encode()).decode()}),
        directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    source = f"http://charnn:${{CHARNN_TEST_CORPUS_PASSWORD}}@127.0.0.1:{port}/plays/doc-000.txt"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError):  # the source does need the password
        opener.open(f"http://127.0.0.1:{port}/plays/doc-000.txt", timeout=10)
    # Ray Train keeps runs (train_loop_config included) for its dashboard view only with state
    # tracking on: off by default in Ray 2.60, on wherever that view is wanted.
    submission_id = f"charnn-test-{secrets.token_hex(5)}"
    command = ray_cluster.job_command(
        submission_id, "train.py", "--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[{source}]",
        "--set", f"run.storage={tmp_path / 'runs'}", "--set", f"data.dataset_root={tmp_path / 'datasets'}",
        "--set", "run.name=secret", "--set", "train.steps=4", "--set", "train.checkpoint_every=0")
    split = command.index("--")
    command[split:split] = ["--runtime-env-json", json.dumps({"env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}})]
    try:
        proc = subprocess.run(command, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
        logs = ray_cluster.logs(submission_id)
        train_runs = _dashboard_json(ray_cluster.address, "/api/train/v2/runs/v1")
        jobs = _dashboard_json(ray_cluster.address, "/api/jobs/")
    finally:
        server.shutdown()
    result = last_json(logs)
    assert proc.returncode == 0 and result and result["steps"] == 4, logs[-4000:] + proc.stderr[-2000:]
    records = [p for p in tmp_path.rglob("*") if p.is_file() and "site" not in p.parts]
    assert any(p.name == "spec.yaml" for p in records) and any(p.name == "manifest.json" for p in records)
    for where, text in [("ray job logs", logs), ("/api/train/v2/runs/v1", train_runs), ("/api/jobs/", jobs),
                        *((str(p), p.read_bytes().decode("latin-1")) for p in records)]:
        assert PASSWORD not in text, f"the password leaked into {where}"
    assert "${CHARNN_TEST_CORPUS_PASSWORD}" in logs  # "Running entrypoint ...": the reference, not the value
    assert "http://***@127.0.0.1" in train_runs  # Ray Train's record of the run's train_loop_config
    # Ray's own logs and state on the head node: every process's log, the GCS's, the dashboard's.
    ray_files = [p for p in Path(ray_cluster.temp_dir).rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.startswith("job-driver-") for p in ray_files)
    leaked = [str(p) for p in ray_files if p.stat().st_size < 1 << 28 and PASSWORD.encode() in p.read_bytes()]
    assert not leaked, f"the password leaked into Ray's files: {leaked}"
