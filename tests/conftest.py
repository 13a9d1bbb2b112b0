"""Shared fixtures: a real local S3 endpoint, a local Ray cluster, small image sources.

``s3_endpoint`` (session)
    moto's S3 server in a child process on ``127.0.0.1:<free port>`` — a real HTTP endpoint,
    not an in-process mock. Creates the bucket ``s3_endpoint.bucket`` and sets the standard
    environment for the session (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``/``SECRET`` =
    ``testing``, ``AWS_DEFAULT_REGION``, ``MLFLOW_S3_ENDPOINT_URL``), restoring it at the end.
    Use ``s3_endpoint.uri("some/prefix")`` for a fresh ``s3://`` location.

``ray_cluster`` (session)
    ``ray.init(num_cpus=4, include_dashboard=False)`` bound to 127.0.0.1, progress bars off,
    usage stats off, shut down at the end. It starts after ``s3_endpoint`` so Ray's worker
    processes inherit the endpoint and test credentials. More logical CPUs than cores on
    purpose: two Train workers at 1 CPU each still leave Ray Data room to read (RUNNING-HERE.md).

``fmnist_idx`` (session)
    A folder with a small Fashion-MNIST in idx format (the first 241 train / 59 test images of
    the real files when /usr/share/datasets/fashion-mnist exists, random pixels otherwise) and
    the arrays it holds, for pixel-exact round trips.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Read by Ray when it is imported: with the 127.0.0.1 node address below, every Ray port then
# binds to loopback (without it Ray listens on all interfaces). Set before any test imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray Train's controller polls its workers every 2 s, and a worker's ray.train.report() waits
# while the previous report is still unread (a queue of one): with the tests' sub-second epochs
# that wait, not the training, sets a run's pace. Poll every 0.25 s in the tests (and in the
# pipelines they start as subprocesses, which inherit this environment): the train/resume/NaN
# test ran 65 s -> 52 s. Real runs keep Ray's default; their epochs take tens of seconds.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))

from s3_server import LocalS3Server  # noqa: E402

# --------------------------------------------------------------------------------------------
# Markers
# --------------------------------------------------------------------------------------------

SERVICE_FIXTURES = ("s3_endpoint", "ray_cluster")  # real local services: such tests are integration tests


def pytest_collection_modifyitems(config, items):
    """Refuse a test that uses a service fixture (directly or through another fixture) without
    ``@pytest.mark.integration``: ``pytest -m "not integration"`` (make test-fast) would start
    the S3 endpoint or Ray for it."""
    unmarked = [f"{item.nodeid} (uses {', '.join(f for f in SERVICE_FIXTURES if f in item.fixturenames)})"
                for item in items
                if any(f in getattr(item, "fixturenames", ()) for f in SERVICE_FIXTURES)
                and item.get_closest_marker("integration") is None]
    if unmarked:
        raise pytest.UsageError("tests that use a real local service must be marked @pytest.mark.integration: "
                                + "; ".join(unmarked))


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------


@dataclass
class S3Endpoint:
    url: str
    bucket: str
    env: dict[str, str]
    server: LocalS3Server

    def uri(self, prefix: str = "") -> str:
        """A fresh ``s3://bucket/<prefix>-<random>`` location for one test."""
        return f"s3://{self.bucket}/{prefix or 'test'}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def s3_endpoint():
    server = LocalS3Server(bucket="test-bucket", die_with_parent=True).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    saved["AWS_ENDPOINT_URL"] = os.environ.pop("AWS_ENDPOINT_URL", None)
    saved["AWS_PROFILE"] = os.environ.pop("AWS_PROFILE", None)
    os.environ.update(server.env())
    try:
        yield S3Endpoint(server.url, "test-bucket", server.env(), server)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    import ray

    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # with the 127.0.0.1 node address: loopback only
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_V2_ENABLED": "1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "RAY_ADDRESS"]}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)  # always a private local cluster
    temp_dir = f"/tmp/ray-tests-{os.getpid()}"  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _release_placement_groups(request):
    """Remove the placement groups a test on the shared cluster leaves behind.

    A Train run whose controller fails, or a trial that ASHA stops, can leave its worker group's
    placement group reserved after the test (Ray releases it with the driver process that created
    it, which here is the whole pytest session). On the 4-CPU session cluster two such leftovers
    starve later tests: a Ray Data read then waits forever for a CPU. Each test starts from the
    reservations that existed before it."""
    if "ray_cluster" not in request.fixturenames:
        yield
        return
    from ray.util import placement_group_table

    before = set(placement_group_table())
    yield
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id, info in placement_group_table().items():
        if pg_id not in before and info.get("state") != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write ``array`` (uint8) in LeCun's idx format, gzipped when ``compress``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


def _read_real(name: str, n: int) -> np.ndarray:
    from pipelines.data.sources import read_idx

    return read_idx((REAL_FMNIST / f"{name}.gz").read_bytes(), name)[:n]


@dataclass
class IdxSource:
    folder: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@pytest.fixture(scope="session")
def fmnist_idx(tmp_path_factory) -> IdxSource:
    folder = tmp_path_factory.mktemp("fmnist-idx")
    n_train, n_test = 241, 59  # odd on purpose: uneven splits across 2 workers
    if (REAL_FMNIST / "train-images-idx3-ubyte.gz").exists():
        arrays = {
            "train-images-idx3-ubyte": _read_real("train-images-idx3-ubyte", n_train),
            "train-labels-idx1-ubyte": _read_real("train-labels-idx1-ubyte", n_train),
            "t10k-images-idx3-ubyte": _read_real("t10k-images-idx3-ubyte", n_test),
            "t10k-labels-idx1-ubyte": _read_real("t10k-labels-idx1-ubyte", n_test),
        }
    else:
        rng = np.random.default_rng(0)
        arrays = {
            "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
        }
    for name, arr in arrays.items():
        compress = not name.startswith("t10k-labels")  # exercise both the .gz and the plain form
        write_idx(folder / (f"{name}.gz" if compress else name), arr, compress=compress)
    return IdxSource(folder, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"],
                     arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])
