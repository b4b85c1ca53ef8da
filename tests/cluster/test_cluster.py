"""The cluster side: cluster.yaml validated offline by Ray's own validator, node types against the GPU
sweep, security and token auth, and ``soup-ray sweep CONFIG --dry-run`` on every shipped config."""

from __future__ import annotations

import copy
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from soup_ray.cluster.dryrun import (
    NodeShape,
    check_storage,
    dry_run,
    fit_count,
    node_types_from_launcher_config,
    trials_beside_actor,
)
from soup_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
GPU_CONFIG = ROOT / "tune_configs" / "vitb32_imagenet.yaml"
TEMPLATE = ROOT / "tune_configs" / "imagefolder.yaml"
LOCAL = ROOT / "tune_configs" / "local.yaml"
DASHBOARD_PORT, SERVE_PORT = 8265, 8000
WORLD = {"0.0.0.0/0", "::/0"}


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def shapes() -> dict[str, NodeShape]:
    """Node types of cluster.yaml keyed by their name in the file."""
    return {s.name.split(" ")[0]: s for s in node_types_from_launcher_config(CLUSTER)}


def _gpu_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cluster["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}


def _type_with_gpus(cluster: dict[str, Any], n: int) -> str:
    (name,) = [k for k, v in _gpu_types(cluster).items() if v["resources"]["GPU"] == n]
    return name


# ---------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_own_validator(cluster: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_config (AWS defaults merged, setup commands merged, min/max workers filled) + validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validating cluster.yaml must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad file
    assert prepared["cluster_name"] == "soup-ray"
    assert prepared["provider"]["type"] == "aws" and "cache_stopped_nodes" in prepared["provider"]
    assert prepared["auth"]["ssh_user"] == "ubuntu"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert any("pip install" in c and "-e" in c for c in prepared["worker_setup_commands"])
    assert any("pip install" in c and "-e" in c for c in prepared["head_setup_commands"])


def test_the_validator_is_real(cluster: dict[str, Any]) -> None:
    """A misspelt node-type key is rejected by the same call, so the test above means something."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster)
    name = _type_with_gpus(bad, 1)
    bad["available_node_types"][name]["resource"] = bad["available_node_types"][name].pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_docker_image_matches_the_pinned_ray(cluster: dict[str, Any]) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    (version,) = re.findall(r'"ray\[[^\]]*\]==([0-9.]+)"', pyproject)
    image = cluster["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{version}-py311") and image.endswith("-gpu"), image


def test_node_types(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must have no GPU"
    assert head.get("min_workers", 0) == 0 and head.get("max_workers", 0) == 0
    one, eight = types[_type_with_gpus(cluster, 1)], types[_type_with_gpus(cluster, 8)]
    assert one["node_config"]["InstanceType"] == "g5.2xlarge" and one["resources"] == {"CPU": 8, "GPU": 1}
    assert eight["node_config"]["InstanceType"] == "p4d.24xlarge" and eight["resources"] == {"CPU": 96, "GPU": 8}
    for t in (one, eight):
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cluster["max_workers"]
    assert one["max_workers"] + eight["max_workers"] <= cluster["max_workers"]


def test_gpu_sweep_fits_the_node_types(cluster: dict[str, Any], shapes: dict[str, NodeShape]) -> None:
    cfg = load_config(GPU_CONFIG)
    trial = (cfg.trial_resources.cpu, cfg.trial_resources.gpu)
    actor = (cfg.soup.resources.cpu, cfg.soup.resources.gpu)
    assert trial[1] == 1 and 0 < actor[1] < 1, "one GPU per trial; the soup actor on a GPU fraction"
    one, eight = shapes[_type_with_gpus(cluster, 1)], shapes[_type_with_gpus(cluster, 8)]
    head = shapes[cluster["head_node_type"]]
    # by hand, then through the dry run's own arithmetic
    assert trial[0] <= one.cpu and trial[1] <= one.gpu
    assert 8 * trial[0] <= eight.cpu and 8 * trial[1] <= eight.gpu
    assert 7 * trial[0] + actor[0] <= eight.cpu and 7 * trial[1] + actor[1] <= eight.gpu
    assert fit_count(one, *trial) == 1
    assert fit_count(eight, *trial) == 8
    assert trials_beside_actor(eight, trial, actor) == 7, "the soup actor fits beside 7 trials on the 8-GPU node"
    assert fit_count(head, *trial) == 0 and fit_count(head, *actor) == 0, "nothing GPU-bound lands on the head"
    gpus = sum(s.gpu * (s.max_workers or 0) for s in shapes.values())
    assert cfg.tune.max_concurrent_trials is not None and cfg.tune.max_concurrent_trials <= gpus
    assert cfg.tune.num_samples == 72


def test_no_world_open_dashboard_or_serve_port(cluster: dict[str, Any]) -> None:
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        world = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if not world & WORLD:
            continue
        if str(rule.get("IpProtocol")) == "-1":
            pytest.fail(f"a rule opens every port to the world: {rule}")
        lo, hi = int(rule.get("FromPort", 0)), int(rule.get("ToPort", 65535))
        for port in (DASHBOARD_PORT, SERVE_PORT):
            assert not lo <= port <= hi, f"port {port} is open to the world: {rule}"
    for t in cluster["available_node_types"].values():
        assert "SecurityGroupIds" not in t["node_config"], "only the launcher-made group (SSH + intra-cluster)"
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert not [o for o in cluster["docker"].get("run_options", []) if re.match(r"^(-p|--publish)\b", o)]


@pytest.mark.slow
def test_token_auth_on_every_ray_start(cluster: dict[str, Any]) -> None:
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        # token auth set for `ray start` itself, with any other environment settings beside it
        assert re.search(r"RAY_AUTH_MODE=token\s+(?:[A-Z_]+=\S+\s+)*ray start", cmd), cmd
    # the token travels from outside the repository (never with `--working-dir .`) to every node
    mounts = cluster["file_mounts"]
    token_dirs = [remote for remote, local in mounts.items() if "auth" in remote]
    assert token_dirs and all(mounts[r].startswith("~") for r in token_dirs)
    setup = " ".join(cluster["setup_commands"])
    assert "~/.ray/auth_token" in setup and "RAY_AUTH_MODE=token" in setup


def test_the_mounted_s3_bucket_is_the_gpu_sweeps_storage(cluster: dict[str, Any]) -> None:
    """The bucket is mounted at the config's storage path on every node and passed into the container."""
    cfg = load_config(GPU_CONFIG)
    mount = cfg.storage
    assert mount.startswith("/") and "://" not in mount
    init = " ".join(cluster["initialization_commands"])
    assert re.search(rf"s3fs CHANGE-ME-soup-ray-runs {re.escape(mount)} ", init), "the bucket is mounted at storage"
    assert "iam_role=auto" in init and "allow_other" in init
    assert f"--mount type=bind,src={mount},dst={mount},bind-propagation=rslave" in cluster["docker"]["run_options"]
    assert "uid=1000 -o gid=100" in init  # the rayproject image's `ray` user
    exported = re.findall(r"SOUP_RAY_RUNS=(\S+?)'", " ".join(cluster["setup_commands"]))
    assert exported == [mount]
    for name in _gpu_types(cluster):
        assert "IamInstanceProfile" in cluster["available_node_types"][name]["node_config"], (
            "GPU workers write checkpoints to the bucket"
        )


def test_gpu_config_is_the_papers_sweep() -> None:
    cfg = load_config(GPU_CONFIG)
    s = cfg.search_space
    assert (cfg.model.name, cfg.model.pretrained) == ("ViT-B-32", "openai")
    assert cfg.data.kind == "imagefolder" and cfg.data.templates == "openai_imagenet"
    assert cfg.data.heldout_index is not None and len(cfg.data.classnames or []) == 1000
    assert set(cfg.data.shift_dirs) == {"imagenet_v2", "imagenet_sketch", "imagenet_r", "imagenet_a", "objectnet"}
    assert s.lr.loguniform == (1e-6, 1e-4) and s.weight_decay.loguniform[1] == pytest.approx(0.5)
    assert s.epochs.randint == (4, 16)
    assert s.label_smoothing.uniform == (0.0, 0.25) and s.label_smoothing.p_off == 0.5
    assert s.mixup_alpha.uniform == (0.0, 0.9) and s.mixup_alpha.p_off == 0.5
    assert s.randaug_n.randint == (0, 2) and s.randaug_m.randint == (1, 20)
    assert (s.batch_size.value, s.warmup_steps.value, s.grad_clip.value) == (512, 500, 1.0)
    assert cfg.ray.address == "auto"


# ---------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def local_ray():
    """One embedded local Ray (2 CPUs, no GPU) that every dry run in this module reuses."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            namespace="soup-ray-dryrun-test",
            log_to_driver=False,
        )
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny ImageFolder trees: train/val with 3 classes of 8x8 PNGs, two shifts, a held-out index."""
    import numpy as np
    from PIL import Image

    from soup_ray.data import write_heldout_index

    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    layout = {
        "train": (["a_cat", "b_dog", "c_fish"], 4),
        "val": (["a_cat", "b_dog", "c_fish"], 2),
        "sketch": (["a_cat", "b_dog", "c_fish"], 1),
        "rendition": (["b_dog", "c_fish"], 1),
    }
    for split, (classes, n) in layout.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    index = root / "heldout.json"
    write_heldout_index(index, root / "train", 1)
    return {
        "root": root,
        "train": root / "train",
        "val": root / "val",
        "index": index,
        "sketch": root / "sketch",
        "rendition": root / "rendition",
    }


def _by_name(report) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


def _text(check) -> str:
    return check.summary + "\n" + "\n".join(check.details)


@pytest.mark.slow
def test_dry_run_local_yaml(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUP_RAY_CACHE", str(tmp_path / "empty-cache"))  # the stand-in is not built here
    out = tmp_path / "run"
    report = dry_run(LOCAL, out=str(out), cpu_batch_cap=2, log=lambda m: None)
    checks = _by_name(report)
    assert report.exit_code == 0, report.format()
    assert checks["data"].status == "ok" and "no path to check" in checks["data"].summary
    assert checks["resources"].status == "ok"
    assert checks["model"].status == "warn" and "RANDOM INIT" in _text(checks["model"])
    assert checks["steps"].status == "ok" and "batch 2" in _text(checks["steps"])
    assert not out.exists(), "a dry run writes no run folder"


@pytest.mark.slow
def test_dry_run_gpu_config_on_tiny_imagefolders(local_ray, tiny_folders: dict[str, Path]) -> None:
    overrides = {
        "data.train_dir": str(tiny_folders["train"]),
        "data.test_dir": str(tiny_folders["val"]),
        "data.heldout_index": str(tiny_folders["index"]),
        "data.classnames": None,
        "data.shift_dirs": {
            "imagenet_sketch": str(tiny_folders["sketch"]),
            "imagenet_r": str(tiny_folders["rendition"]),
        },
    }
    report = dry_run(GPU_CONFIG, overrides, cpu_batch_cap=2, log=lambda m: None)
    checks = _by_name(report)
    text = report.format()
    assert report.exit_code == 1
    # storage is the bucket's mount point, which this machine lacks: a problem only if its parent is read-only here
    assert {c.name for c in report.problems} - {"storage"} == {"resources", "model"}, text
    assert checks["placeholders"].status == "ok"  # the bucket and account placeholders live in cluster.yaml
    assert checks["data"].status == "ok" and "3 classes" in checks["data"].summary
    assert "/mnt/soup-ray-runs/vitb32-imagenet-<timestamp>" in _text(checks["storage"])
    # a 1-GPU trial on a 2-CPU, 0-GPU Ray: does not fit here, and what it needs
    res = _text(checks["resources"])
    assert "does not fit here" in res and "6 CPU + 1 GPU" in res and "0.25 GPU" in res
    # HF_HUB_OFFLINE=1 (conftest): the weights are unreachable, random init is used and said
    assert "HF_HUB_OFFLINE=1" in _text(checks["model"]) and "RANDOM INIT of ViT-B-32" in _text(checks["model"])
    steps = _text(checks["steps"])
    assert checks["steps"].status == "ok" and "batch 2 (batch_size 512 capped to 2" in steps and "224px" in steps


@pytest.mark.slow
def test_dry_run_names_every_missing_data_path(local_ray) -> None:
    report = dry_run(GPU_CONFIG, check_model_steps=False, log=lambda m: None)
    data = _by_name(report)["data"]
    assert data.status == "fail" and "9 path(s) missing on this machine" in data.summary
    cfg = load_config(GPU_CONFIG)
    for path in [cfg.data.train_dir, cfg.data.test_dir, cfg.data.heldout_index, *cfg.data.shift_dirs.values()]:
        assert any(str(path) in d for d in data.details), path
    assert report.exit_code == 1


@pytest.mark.slow
def test_dry_run_imagefolder_template(local_ray, tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    overrides = {
        "data.train_dir": str(tiny_folders["train"]),
        "data.test_dir": str(tiny_folders["val"]),
        "trial_resources.cpu": 1,
        "trial_resources.gpu": 0,
        "soup.resources.cpu": 0.5,
        "storage": str(tmp_path / "runs"),
    }
    report = dry_run(TEMPLATE, overrides, cpu_batch_cap=2, log=lambda m: None)
    checks = _by_name(report)
    # offline, so only the pretrained weights are a problem; random init stands in and the steps run
    assert [c.name for c in report.problems] == ["model"], report.format()
    assert "RANDOM INIT" in _text(checks["model"])
    assert checks["data"].status == "ok" and checks["storage"].status == "ok" and checks["resources"].status == "ok"
    assert checks["steps"].status == "ok"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cli_dry_run_with_missing_data_still_steps_and_starts_nothing(
    local_ray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from soup_ray.cli import main

    cfg = {
        "name": "tiny-folder",
        "model": {"name": "soupray-digits-tiny", "pretrained": None},
        "data": {
            "kind": "imagefolder",
            "train_dir": str(tmp_path / "nope" / "train"),
            "test_dir": str(tmp_path / "nope" / "test"),
            "heldout_fraction": 0.2,
        },
        "search_space": {"lr": 1e-3, "weight_decay": 0.1, "epochs": 1, "batch_size": 4, "warmup_steps": 2},
        "trial_resources": {"cpu": 1},
        "storage": str(tmp_path / "runs"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in ("sweep", "run"):
        rc = main([command, str(path), "--dry-run", "--out", str(tmp_path / "run")])
        printed = capsys.readouterr().out
        assert rc == 1, printed
        assert f"data.train_dir: {tmp_path / 'nope' / 'train'}" in printed
        assert f"data.test_dir: {tmp_path / 'nope' / 'test'}" in printed
        assert re.search(r"\[ OK \] steps", printed), printed
        assert "Traceback" not in printed
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_dry_run_invalid_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        json.dumps({"search_space": {"lr": 0.1, "weight_decay": 0.1, "epochs": 1}, "tune": {"num_sample": 3}})
    )
    report = dry_run(bad, log=lambda m: None)
    assert report.exit_code == 2 and "tune.num_sample" in report.format()


def test_storage_check_on_a_cluster_wants_a_shared_filesystem(tmp_path: Path) -> None:
    shared, local = tmp_path / "shared", tmp_path / "local"
    shared.mkdir()
    local.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(
        f"overlay / overlay rw 0 0\ns3fs {shared} fuse.s3fs rw,nosuid,nodev 0 0\n10.0.0.5:/ {shared}/nfs nfs4 rw 0 0\n"
    )
    on_cluster = {"ray.address": "auto"}
    check = check_storage(load_config(TEMPLATE, {"storage": str(local), **on_cluster}), mounts_file=mounts)
    assert check.status == "warn" and "overlay" in _text(check) and "shared" in _text(check)
    check = check_storage(load_config(TEMPLATE, {"storage": str(shared / "runs"), **on_cluster}), mounts_file=mounts)
    assert check.status == "ok" and "fuse.s3fs" in check.summary
    (shared / "nfs").mkdir()
    check = check_storage(load_config(TEMPLATE, {"storage": str(shared / "nfs"), **on_cluster}), mounts_file=mounts)
    assert check.status == "ok" and "nfs4" in check.summary  # the longest mount point wins
    # on an embedded local Ray any writable folder will do
    assert check_storage(load_config(TEMPLATE, {"storage": str(local)}), mounts_file=mounts).status == "ok"
    # a URI is not a folder
    assert check_storage(load_config(TEMPLATE), out="s3://bucket/run").status == "fail"


def test_gcs_probe_answers_in_seconds_for_a_stopped_cluster() -> None:
    from soup_ray.cluster.dryrun import gcs_unreachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert gcs_unreachable(f"127.0.0.1:{port}") is None
    why = gcs_unreachable(f"127.0.0.1:{port}", timeout_s=2.0)  # closed now
    assert why is not None and f"127.0.0.1:{port}" in why
    assert gcs_unreachable("ray://127.0.0.1:10001") is None  # Ray Client addresses are left to Ray
    assert gcs_unreachable("http://127.0.0.1:8265") is None
    assert f"::1:{port}" in (gcs_unreachable(f"[::1]:{port}", timeout_s=2.0) or "")  # brackets stripped, probed


def test_filesystem_of_decodes_octal_escapes_in_mount_points(tmp_path: Path) -> None:
    from soup_ray.cluster.dryrun import filesystem_of

    spaced = tmp_path / "my runs"
    spaced.mkdir()
    mounts = tmp_path / "mounts"
    escaped = str(spaced).replace(" ", "\\040")
    mounts.write_text(f"overlay / overlay rw 0 0\nfs:/ {escaped} nfs4 rw 0 0\n")
    assert filesystem_of(spaced / "x", mounts) == (str(spaced), "nfs4")


# Ray's launcher gives the head this profile when the head's node_config names none: EC2 and IAM
# rights to start workers, far more than a worker needs.
HEAD_DEFAULT_PROFILE = "ray-autoscaler-v1"


def _profile_name(node_config: dict[str, Any]) -> str | None:
    arn = (node_config.get("IamInstanceProfile") or {}).get("Arn") or (node_config.get("IamInstanceProfile") or {}).get(
        "Name"
    )
    return str(arn).rsplit("/", 1)[-1] if arn else None


def test_workers_run_on_a_narrower_instance_profile_than_the_head(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    head = _profile_name(types[cluster["head_node_type"]]["node_config"]) or HEAD_DEFAULT_PROFILE
    for name, t in types.items():
        if name == cluster["head_node_type"]:
            continue
        worker = _profile_name(t["node_config"])
        assert worker is not None, f"{name}: workers need their own profile for the bucket"
        assert worker != head and "autoscaler" not in worker, f"{name} runs with the head's profile {worker}"


CREDENTIALS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "bearer token": re.compile(r"Authorization:\s*Bearer\s+[A-Za-z0-9._~+/-]{20,}"),
}


def test_no_credentials_in_any_tracked_file() -> None:
    import subprocess

    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    found = []
    for rel in filter(None, listed.stdout.split("\0")):
        path = ROOT / rel
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        found += [f"{rel}: {what}" for what, pattern in CREDENTIALS.items() if pattern.search(text)]
    assert not found, found
    cluster = yaml.safe_load(CLUSTER.read_text())
    assert "ssh_private_key" not in cluster.get("auth", {}), "keys stay on the user's machine, never in the repo"
    assert all(str(local).startswith("~") or str(local) == "." for local in cluster["file_mounts"].values())


@pytest.mark.slow
def test_dry_run_names_a_custom_resource_that_no_node_offers(
    local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOUP_RAY_CACHE", str(tmp_path / "empty-cache"))
    overrides = {"trial_resources.custom": {"gpu_worker": 1}, "soup.resources.custom": {"gpu_worker": 1}}
    report = dry_run(LOCAL, overrides, cpu_batch_cap=2, log=lambda m: None)
    check = _by_name(report)["resources"]
    assert check.status == "fail" and report.exit_code != 0
    assert "a trial fits on no node and the soup actor fits on no node" in check.summary
    text = _text(check)
    assert "a trial asks for custom resource(s) gpu_worker: 1 that no node offers" in text
    assert "ray start --resources" in text


def test_the_local_autoscaling_cluster_has_cluster_yamls_node_types(tmp_path: Path) -> None:
    """The fake_multinode config is generated from cluster.yaml: same types and resources, every worker from 0."""
    import yaml

    from soup_ray.cluster.local_cluster import HEAD_TYPE, LocalClusterError, fake_multinode_config, head_resource_args

    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    fake = fake_multinode_config(ROOT / "cluster.yaml", "127.0.0.1:6390", max_workers={"gpu_8x_a100": 0})
    assert fake["provider"]["type"] == "fake_multinode" and fake["provider"]["gcs_address"] == "127.0.0.1:6390"
    types = fake["available_node_types"]
    head = launcher["head_node_type"]
    assert set(types) == (set(launcher["available_node_types"]) - {head}) | {HEAD_TYPE}
    assert types[HEAD_TYPE]["resources"] == launcher["available_node_types"][head]["resources"]
    assert "GPU" not in types[HEAD_TYPE]["resources"]  # the head trains nothing
    for name, spec in launcher["available_node_types"].items():
        if name == head:
            continue
        got = dict(types[name]["resources"])
        assert got.pop("object_store_memory") > 0 and got == spec["resources"], name
        assert types[name]["min_workers"] == 0
    assert types["gpu_8x_a100"]["max_workers"] == 0
    assert types["gpu_1x_a10g"]["max_workers"] == launcher["available_node_types"]["gpu_1x_a10g"]["max_workers"]
    assert head_resource_args(fake)[:4] == ["--num-cpus", "8", "--num-gpus", "0"]
    with pytest.raises(LocalClusterError, match="gpu_9x"):
        fake_multinode_config(ROOT / "cluster.yaml", "127.0.0.1:1", max_workers={"gpu_9x": 1})
    broken = tmp_path / "broken.yaml"
    broken.write_text("available_node_types: {a: {}}\nhead_node_type: b\n")
    with pytest.raises(LocalClusterError, match="head_node_type"):
        fake_multinode_config(broken, "127.0.0.1:1")


def test_dry_run_names_a_missing_cluster_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from soup_ray.cli import main

    missing = tmp_path / "nope.yaml"
    assert main(["run", str(ROOT / "tune_configs" / "local.yaml"), "--dry-run", "--cluster-config", str(missing)]) == 2
    assert f"--cluster-config {missing}: no such file" in capsys.readouterr().err
