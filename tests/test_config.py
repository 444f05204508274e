from pathlib import Path

import pytest
import yaml

from cmevlm.config import ConfigError, RunConfig, dump_config, load_config, parse_override

ROOT = Path(__file__).resolve().parent.parent


def test_demo_config_loads_with_defaults():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.workdir == str(Path.cwd() / "runs/demo")  # relative paths resolve once, on the driver
    assert cfg.data.overlay_color == (0, 255, 0)
    assert cfg.sources[0].layout == "cmevlm"


def test_every_config_starts_with_the_command_that_runs_it():
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        first = f.read_text().splitlines()[0]
        assert first.startswith("# ") and ("cmevlm " in first or "jobs/" in first), f
        load_config(f)  # and every shipped config is valid


def test_nested_list_and_mapping_overrides():
    cfg = load_config(overrides=[
        "data.image_size=224",
        "data.holdout_sites=[site_b, site_c]",
        "sources=[{uri: /data, layout: dsad, site: a}, {uri: 's3://x/y', site: b}]",
        "storage={endpoint: 'http://127.0.0.1:9000', region: eu-west-1}",
        "workdir=s3://bucket/run1",
    ])
    assert cfg.data.image_size == 224
    assert cfg.data.holdout_sites == ["site_b", "site_c"]
    assert [s.layout for s in cfg.sources] == ["dsad", "cmevlm"]
    assert cfg.storage.endpoint == "http://127.0.0.1:9000" and cfg.storage.region == "eu-west-1"
    assert cfg.workdir == "s3://bucket/run1"
    assert cfg.sources[0].uri == "/data"


def test_later_override_wins():
    assert load_config(overrides=["seed=1", "seed=7"]).seed == 7


def test_unknown_key_is_an_error_listing_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.imgsize=224"])
    msg = str(e.value)
    assert "data.imgsize" in msg and "image_size" in msg and "overlay_alpha" in msg


def test_unknown_top_level_key_in_a_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# cmevlm ingest --config c.yaml\nworkdir: /tmp/x\ntypo_section: {a: 1}\n")
    with pytest.raises(ConfigError, match="unknown key 'typo_section'.*workdir"):
        load_config(f)


def test_unknown_key_inside_a_list_item():
    with pytest.raises(ConfigError, match="sources.0.url.*layout, site, uri"):
        load_config(overrides=["sources=[{url: /data}]"])


@pytest.mark.parametrize("override, fragment", [
    ("data.image_size=100", "multiple of 28"),
    ("data.overlay_alpha=1.5", "overlay_alpha"),
    ("data.resize=stretch", "data.resize"),
    ("sources=[{uri: /d, layout: coco}]", "sources.0.layout"),
    ("data.image_size=big", "data.image_size"),
])
def test_invalid_values_say_which_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides=[override])


@pytest.mark.parametrize("bad", ["noequals", "=1", "data.x=[unclosed"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        load_config(overrides=[bad])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(overrides=["workdir.sub=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_parse_override_reads_yaml():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_dump_masks_secrets_and_round_trips(tmp_path):
    cfg = load_config(overrides=["storage.secret_access_key=hunter2", "seed=5"])
    text = dump_config(cfg)
    assert "hunter2" not in text and "***" in text
    f = tmp_path / "again.yaml"
    f.write_text(dump_config(load_config(overrides=["seed=5"])))
    assert load_config(f).seed == 5


def test_config_command_masks_every_secret_field_and_public_dict_drops_them(capsys):
    from cmevlm.cli import main
    from cmevlm.config import SECRET_FIELDS, public_dict

    sets = ["storage.access_key_id=AKIA-1", "storage.secret_access_key=hunter2", "serve.api_keys=[key-a, key-b]"]
    assert main(["config", *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert not any(word in out for word in ("AKIA-1", "hunter2", "key-a", "key-b"))
    assert out.count("'***'") == 4
    public = yaml.safe_dump(public_dict(load_config(overrides=sets)))
    assert not any(f"{field}:" in public for field in SECRET_FIELDS) and "hunter2" not in public
