"""``cluster.yaml``'s node types on one machine, for Ray's ``fake_multinode`` autoscaler provider.

Ray's "testing autoscaling locally" recipe runs the real autoscaler against local node processes::

    RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=FAKE.yaml ...

Each worker node the autoscaler launches is a raylet of its own on this machine, with the node type's logical
CPUs and (fake) GPUs. :func:`fake_multinode_config` writes ``FAKE.yaml`` from the project's own ``cluster.yaml``,
so the node types tried locally are the ones ``ray up`` launches: the same names and resources, every worker
type from 0 workers. Only what one machine cannot hold is changed: how many workers of each type
(``max_workers``), the object store of a worker, and how soon an idle worker goes.

    python -m soup_ray.cluster.local_cluster cluster.yaml --gcs-address 127.0.0.1:6390 > fake.yaml

prints such a file, with the ``ray start`` command that uses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this node type name
ENV = {
    "RAY_FAKE_CLUSTER": "1",  # the fake_multinode provider refuses to start without it
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler looks at demand every second (default 5)
    # every node Ray starts here (the autoscaler's too) takes 127.0.0.1 as its address, not the machine's
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
WORKER_OBJECT_STORE_BYTES = 256 * 2**20


class LocalClusterError(ValueError):
    """``cluster.yaml`` cannot be turned into a local cluster (what is wrong, and where)."""


def cluster_node_types(cluster_yaml: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """The head type's name and every node type of a cluster-launcher YAML (its ``available_node_types``)."""
    try:
        data = yaml.safe_load(Path(cluster_yaml).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise LocalClusterError(f"{cluster_yaml}: cannot be read as YAML ({err})") from None
    types = data.get("available_node_types")
    head = data.get("head_node_type")
    if not isinstance(types, dict) or not types or head not in types:
        raise LocalClusterError(
            f"{cluster_yaml}: needs available_node_types and a head_node_type among them (got {head!r})"
        )
    return str(head), types


def fake_multinode_config(
    cluster_yaml: Path,
    gcs_address: str,
    *,
    max_workers: dict[str, int] | None = None,
    idle_timeout_minutes: float = 0.1,
    worker_object_store_bytes: int = WORKER_OBJECT_STORE_BYTES,
) -> dict[str, Any]:
    """The ``--autoscaling-config`` of a local fake cluster with ``cluster_yaml``'s node types.

    ``gcs_address`` is the head's ``127.0.0.1:PORT`` (new worker nodes join it); ``max_workers`` caps a worker
    type's count (types not named keep theirs; 0 keeps a type out). Every worker type starts at 0 workers.
    """
    head, types = cluster_node_types(cluster_yaml)
    caps = dict(max_workers or {})
    unknown = sorted(set(caps) - set(types))
    if unknown:
        raise LocalClusterError(f"max_workers names node type(s) {unknown} that {cluster_yaml} does not declare")
    nodes: dict[str, Any] = {}
    total = 0
    for name, spec in types.items():
        resources = {k: v for k, v in (spec.get("resources") or {}).items() if k != "object_store_memory"}
        if name == head:
            nodes[HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        count = int(caps.get(name, spec.get("max_workers", 0)))
        total += count
        nodes[name] = {
            "resources": {**resources, "object_store_memory": int(worker_object_store_bytes)},
            "node_config": {},
            "min_workers": 0,
            "max_workers": count,
        }
    return {
        "cluster_name": "soup-ray-local",
        "max_workers": total,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": nodes,
        "head_node_type": HEAD_TYPE,
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": float(idle_timeout_minutes),
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def head_resource_args(config: dict[str, Any]) -> list[str]:
    """``ray start --head`` flags that give the head its node type's resources."""
    res = dict(config["available_node_types"][HEAD_TYPE]["resources"])
    args = ["--num-cpus", str(res.pop("CPU", 0)), "--num-gpus", str(res.pop("GPU", 0))]
    if res:
        args += ["--resources", json.dumps(res)]
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cluster_yaml", type=Path, help="the cluster launcher's YAML (e.g. cluster.yaml)")
    ap.add_argument("--gcs-address", default="127.0.0.1:6379", help="the local head's GCS (default 127.0.0.1:6379)")
    ap.add_argument(
        "--max-workers",
        default="",
        help="caps per worker type, e.g. gpu_1x_a10g=2,gpu_8x_a100=0 (default: cluster.yaml's own)",
    )
    ap.add_argument("--idle-timeout-minutes", type=float, default=0.1, help="idle workers go after this (0.1)")
    args = ap.parse_args(argv)
    try:
        caps = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.max_workers.split(",") if kv)}
    except ValueError:
        ap.error(f"--max-workers: expected TYPE=COUNT pairs, got {args.max_workers!r}")
    try:
        config = fake_multinode_config(
            args.cluster_yaml, args.gcs_address, max_workers=caps, idle_timeout_minutes=args.idle_timeout_minutes
        )
    except LocalClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    port = args.gcs_address.rpartition(":")[2]
    env = " ".join(f"{k}={v}" for k, v in ENV.items())
    flags = " ".join(head_resource_args(config))
    print(f"# {env} ray start --head --node-ip-address 127.0.0.1 --port {port} {flags} --autoscaling-config=FILE")
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
