"""S3 server fixtures (a pytest plugin listed in tests/conftest.py).

The server is the real one CI starts with `bash ci/infra/s3-up.sh` (SeaweedFS on 127.0.0.1:9000, env file
/tmp/s3-local/env). Tests ask for:

- `s3_env`: the AWS environment of the server (from the process env, else from the env file), applied to
  os.environ for the test; skips when no server answers, or FAILS when REQUIRE_S3=1 or CI=true.
- `s3_bucket`: an `s3://argen-test-<uuid>` URL of a fresh bucket, deleted with its contents afterwards.
- `s3_server`: an object with `.restart()`, `.stop()` and `.start()` that run the ci/infra scripts (data on disk
  survives a restart), for tests of a reader that must ride through a server restart.
"""
from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UP = REPO / "ci" / "infra" / "s3-up.sh"
DOWN = REPO / "ci" / "infra" / "s3-down.sh"
ENV_FILE = Path(os.environ.get("S3_HOME", "/tmp/s3-local")) / "env"
_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "S3_TEST_BACKEND")


def _required() -> bool:
    return os.environ.get("REQUIRE_S3") == "1" or os.environ.get("CI", "").lower() == "true"


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    env: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("export "):
                line = line[len("export "):]
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip().strip("'\"")
    return env


def server_env() -> dict[str, str]:
    """The environment of the test server: the process's AWS_* variables win over the env file."""
    env = read_env_file()
    for k in _KEYS:
        if os.environ.get(k):
            env[k] = os.environ[k]
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return env


def answers(endpoint: str, timeout: float = 2.0) -> bool:
    """True if an S3 server answers GET / (SeaweedFS says 403 to anonymous requests, moto 200)."""
    try:
        urllib.request.urlopen(endpoint.rstrip("/") + "/", timeout=timeout)
        return True
    except urllib.error.HTTPError as e:
        return e.code in (200, 403)
    except (urllib.error.URLError, OSError):
        return False


def _unavailable(reason: str):
    if _required():
        pytest.fail(f"S3 server required (REQUIRE_S3=1 or CI=true) but {reason}; "
                    f"start it with `bash ci/infra/s3-up.sh && . {ENV_FILE}`", pytrace=False)
    pytest.skip(f"no S3 server: {reason} (start one with `bash ci/infra/s3-up.sh`)")


@pytest.fixture
def s3_env(monkeypatch):
    env = server_env()
    endpoint = env.get("AWS_ENDPOINT_URL")
    if not endpoint:
        _unavailable(f"AWS_ENDPOINT_URL is not set and {ENV_FILE} does not exist")
    if not answers(endpoint):
        _unavailable(f"{endpoint} does not answer")
    for k, v in env.items():
        if k in _KEYS:
            monkeypatch.setenv(k, v)
    return env


def _client(env: dict[str, str]):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}))


def delete_bucket(env: dict[str, str], bucket: str) -> None:
    s3 = _client(env)
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": objs})
        s3.delete_bucket(Bucket=bucket)
    except Exception as e:  # teardown must not mask the test's own result
        print(f"s3_fixture: could not delete bucket {bucket}: {e}")


@pytest.fixture
def s3_bucket(s3_env):
    """`s3://argen-test-<uuid>`: a fresh bucket on the test server, removed (with its objects) afterwards."""
    bucket = f"argen-test-{uuid.uuid4().hex[:12]}"
    s3 = _client(s3_env)
    s3.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    delete_bucket(s3_env, bucket)


class S3Server:
    """Stop/start/restart the test server through ci/infra (only a server those scripts started)."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def _run(self, script: Path, timeout: float = 120) -> None:
        p = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{script.name} failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")

    def stop(self) -> None:
        self._run(DOWN)

    def start(self, timeout: float = 60) -> None:
        self._run(UP)
        end = time.time() + timeout
        while not answers(self.env["AWS_ENDPOINT_URL"]):
            if time.time() > end:
                raise RuntimeError(f"S3 server at {self.env['AWS_ENDPOINT_URL']} did not come back")
            time.sleep(0.2)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def s3_server(s3_env):
    server = S3Server(s3_env)
    if not (Path(os.environ.get("S3_HOME", "/tmp/s3-local")) / "server.pid").is_file():
        _unavailable("the server was not started by ci/infra/s3-up.sh, so it cannot be restarted")
    yield server
    if not answers(s3_env["AWS_ENDPOINT_URL"]):  # leave the server up for the next test whatever happened
        server.start()
