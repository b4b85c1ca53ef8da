"""Config validation: bad files fail before Ray starts, naming the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from soup_ray.config import ConfigError, load_config, parse_config
from tests.conftest import tiny_config_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.tune.num_samples >= 1


def test_local_config_has_at_least_24_trials() -> None:
    assert load_config(ROOT / "tune_configs" / "local.yaml").tune.num_samples >= 24


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    data = tiny_config_dict()
    data["search_space"]["learning_rate"] = 0.1
    p = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "search_space.learning_rate" in msg and "unknown key" in msg


def test_bad_range_names_key_and_allowed_values(tmp_path: Path) -> None:
    data = tiny_config_dict()
    data["search_space"]["lr"] = {"loguniform": [1e-3, 0]}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    assert "search_space.lr" in str(e.value) and "0 < low <= high" in str(e.value)


def test_wrong_type_and_missing_required(tmp_path: Path) -> None:
    data = tiny_config_dict()
    data["tune"]["num_samples"] = "many"
    del data["search_space"]["lr"]
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    msg = str(e.value)
    assert "tune.num_samples" in msg and "search_space.lr" in msg and "required key is missing" in msg


def test_unknown_shift_lists_available(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(tiny_config_dict(**{"data.shifts": ["rotate", "sepia"]}), "x.yaml")
    assert "sepia" in str(e.value) and "rotate" in str(e.value) and "noise" in str(e.value)


def test_imagefolder_needs_exactly_one_heldout_source(tmp_path: Path) -> None:
    data = tiny_config_dict(data={"kind": "imagefolder", "train_dir": str(tmp_path), "test_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as e:
        parse_config(data, "f.yaml")
    assert "heldout_fraction or heldout_index" in str(e.value)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_scalars_become_constants() -> None:
    cfg = parse_config(tiny_config_dict())
    assert cfg.search_space.weight_decay.value == 0.1


def test_ray_address_env_overrides_local(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(tiny_config_dict())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cfg.resolved_address() == "local"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert cfg.resolved_address() == "http://127.0.0.1:8265"


def test_cli_reports_bad_config_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from soup_ray.cli import main

    data = tiny_config_dict()
    data["tune"]["num_sample"] = 3
    p = write(tmp_path, data)
    assert main(["sweep", str(p), "--out", str(tmp_path / "run")]) == 2  # an exception would fail the test
    err = capsys.readouterr().err
    assert "tune.num_sample" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists(), "nothing may be written for a bad config"


def test_storage_must_be_a_folder_not_a_uri(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, tiny_config_dict(storage="s3://my-bucket/runs")))
    assert "storage" in str(err.value) and "mount the bucket" in str(err.value)
    assert load_config(write(tmp_path, tiny_config_dict(storage="/mnt/soup-ray-runs"))).storage == "/mnt/soup-ray-runs"


def test_set_overrides_are_dotted_yaml_values(tmp_path: Path) -> None:
    import argparse

    from soup_ray.cli import build_parser, parse_set

    assert parse_set("trial_resources.gpu=0.5") == ("trial_resources.gpu", 0.5)
    assert parse_set("search_space.lr={loguniform: [1.0e-5, 1.0e-3]}") == (
        "search_space.lr",
        {"loguniform": [1e-5, 1e-3]},
    )
    # YAML 1.1 would leave 1e-4 a string: it must reach the config as a number
    assert parse_set("search_space.lr=1e-4") == ("search_space.lr", 1e-4)
    assert parse_set("search_space.lr={loguniform: [1e-5, 1e-3]}") == ("search_space.lr", {"loguniform": [1e-5, 1e-3]})
    assert parse_set("name=run-1e") == ("name", "run-1e")
    for bad in ("no_equals", "=1", "a..b=1", "x=[unclosed"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_set(bad)
    args = build_parser().parse_args(
        [
            "sweep",
            str(write(tmp_path, tiny_config_dict())),
            "--set",
            "tune.num_samples=5",
            "--set",
            "search_space.epochs=3",
            "--num-samples",
            "7",
        ]
    )
    from soup_ray.cli import overrides_from_args

    cfg = load_config(args.config, overrides_from_args(args))
    assert cfg.tune.num_samples == 7  # --num-samples wins over --set for the same key
    assert cfg.search_space.epochs.value == 3
    with pytest.raises(ConfigError, match="search_space.batch_size is a single value"):
        load_config(args.config, {"search_space.batch_size.x": 1})
    with pytest.raises(ConfigError, match="trial_resources.gpux: unknown key"):
        load_config(args.config, {"trial_resources.gpux": 1})


def test_out_must_not_be_a_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from soup_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(write(tmp_path, tiny_config_dict())), "--out", "s3://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "is a URI" in err and "Traceback" not in err
    assert not (tmp_path / "s3:").exists()


def test_hyperparameters_are_numbers() -> None:
    cfg = parse_config(tiny_config_dict(**{"search_space.lr": "1e-3"}))  # YAML 1.1 leaves 1e-3 a string
    assert cfg.search_space.lr.value == pytest.approx(1e-3) and isinstance(cfg.search_space.lr.value, float)
    with pytest.raises(ConfigError, match=r"lr: 'fast' is not a number"):
        parse_config(tiny_config_dict(**{"search_space.lr": "fast"}))
    with pytest.raises(ConfigError, match="search_space.epochs"):
        parse_config(tiny_config_dict(**{"search_space.epochs": {"choice": ["two", "four"]}}))


def test_custom_resources_are_ray_custom_resources_with_a_positive_amount() -> None:
    cfg = parse_config(
        tiny_config_dict(**{"trial_resources.custom": {"worker": 1}, "soup.resources.custom": {"a": 0.5}})
    )
    assert cfg.trial_resources.custom == {"worker": 1.0} and cfg.soup.resources.custom == {"a": 0.5}
    assert parse_config(tiny_config_dict()).trial_resources.custom == {}
    for bad, says in (({"GPU": 1}, "not a custom resource"), ({"worker": 0}, "above 0"), ({"node:x": 1}, "custom")):
        with pytest.raises(ConfigError, match=says):
            parse_config(tiny_config_dict(**{"trial_resources.custom": bad}))
