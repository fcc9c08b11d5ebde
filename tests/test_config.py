"""Recipe loading: defaults, `--set` overrides with types, and every way a recipe can be wrong (cdmtransfer/config.py)."""

import pytest

from cdmtransfer.config import Config, adapt_defaults, apply_override, dump_config, load_config, resolve_adapt
from cdmtransfer.errors import CdmError, ConfigError


def test_defaults_load():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.suite.name == "gaussian" and cfg.adapt.mode == "frozen"
    assert cfg.adapt.m == 32 and cfg.adapt.steps is None and cfg.adapt.batch_size is None  # the m-aware rule's
    resolved = resolve_adapt(cfg).adapt
    assert (resolved.steps, resolved.batch_size, resolved.lr) == tuple(adapt_defaults(32)[k]
                                                                       for k in ("steps", "batch_size", "lr"))
    assert cfg.pretrain.steps == 10000 and cfg.pretrain.batch_size == 128
    assert 0 < cfg.diffusion.T0 < cfg.diffusion.T
    assert cfg.model.time_dim % 2 == 0
    assert cfg.tracking.uri is None


def test_overrides_apply_with_types():
    cfg = load_config(None, ["adapt.m=16", "model.d=3", "diffusion.T0=1e-3", "pretrain.lr=0.01",
                             "tracking.log_artifacts=false", "adapt.mode=oracle", "suite.file.sources=1,2",
                             "sweep.m=[4, 8]", "tracking.uri=file:/tmp/x", "suite.gaussian.noise=1",
                             "adapt.steps=20.0"])
    assert cfg.adapt.m == 16 and type(cfg.adapt.m) is int
    assert cfg.model.d == 3
    assert cfg.diffusion.T0 == 1e-3 and type(cfg.diffusion.T0) is float  # "1e-3" is a YAML string: parsed as a number
    assert cfg.pretrain.lr == 0.01
    assert cfg.tracking.log_artifacts is False
    assert cfg.adapt.mode == "oracle"
    assert cfg.suite.file.sources == [1, 2]
    assert cfg.sweep.m == [4, 8]
    assert cfg.tracking.uri == "file:/tmp/x"
    assert cfg.suite.gaussian.noise == 1.0 and type(cfg.suite.gaussian.noise) is float
    assert cfg.adapt.steps == 20 and type(cfg.adapt.steps) is int
    # untouched keys keep their defaults
    assert cfg.model.head_width == load_config(None).model.head_width
    assert cfg.pretrain.steps == load_config(None).pretrain.steps


def test_setting_one_adapt_key_keeps_other_adapt_defaults():
    default = resolve_adapt(load_config(None)).adapt
    assert (default.steps, default.batch_size, default.val_every) == (adapt_defaults(32)["steps"],
                                                                      adapt_defaults(32)["batch_size"], 25)
    cfg = resolve_adapt(load_config(None, ["adapt.m=16", "adapt.lr=1e-3"]))
    assert cfg.adapt.m == 16 and cfg.adapt.lr == 1e-3
    assert (cfg.adapt.steps, cfg.adapt.batch_size) == (adapt_defaults(16)["steps"], adapt_defaults(16)["batch_size"])


def test_apply_override_builds_nested_dict():
    data = {}
    apply_override(data, "adapt.m=16")
    apply_override(data, "adapt.mode=finetune")
    apply_override(data, "suite.gaussian.d_x=5")
    assert data == {"adapt": {"m": 16, "mode": "finetune"}, "suite": {"gaussian": {"d_x": 5}}}


@pytest.mark.parametrize("item", ["adapt.m", "=3", "  =3"])
def test_apply_override_rejects_malformed_items(item):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, item)


def test_apply_override_into_non_section_rejected():
    data = {"adapt": 3}
    with pytest.raises(ConfigError, match="adapt"):
        apply_override(data, "adapt.m=4")


def test_recipe_file_then_overrides_precedence(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: demo\nadapt:\n  m: 8\n  lr: 0.5\nmodel:\n  d: 2\n")
    cfg = load_config(p, ["adapt.m=16"])
    assert cfg.name == "demo"
    assert cfg.adapt.m == 16  # --set beats the recipe
    assert cfg.adapt.lr == 0.5 and cfg.model.d == 2  # recipe beats the defaults
    assert load_config(p).adapt.m == 8


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(None, ["adapt.m=7", "suite.file.sources=[3]", "tracking.uri=null"])
    p = tmp_path / "dump.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_empty_recipe_is_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == load_config(None)


# --------------------------------------------------------------------------------------------------------------
# Bad values from --set


@pytest.mark.parametrize("item,bad_key,suggestion", [
    ("adapt.lr_encoder=1e-3", "adapt.lr_encoder", "adapt.encoder_lr"),
    ("pretrian.steps=3", "pretrian", "pretrain"),
    ("model.head_widht=3", "model.head_widht", "model.head_width"),
    ("suite.gaussian.dx=3", "suite.gaussian.dx", "suite.gaussian.d_x"),
    ("evaluate.sampler_step=3", "evaluate.sampler_step", "evaluate.sampler_steps"),
])
def test_unknown_key_suggests_close_match(item, bad_key, suggestion):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [item])
    msg = str(exc.value)
    assert f"unknown key '{bad_key}'" in msg
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_key_suggestions_exact():
    with pytest.raises(ConfigError, match=r"unknown key 'adapt\.lr_encoder'; did you mean 'adapt\.encoder_lr'\?"):
        load_config(None, ["adapt.lr_encoder=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown key 'pretrian'; did you mean 'pretrain'\?"):
        load_config(None, ["pretrian.steps=3"])


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["adapt.zzzzzz=1"])
    assert "zzzzzz" in str(exc.value) and "encoder_lr" in str(exc.value)


@pytest.mark.parametrize("item,key", [
    ("adapt.m=abc", "adapt.m"),
    ("adapt.m=1.5", "adapt.m"),
    ("adapt.m=true", "adapt.m"),
    ("adapt.m=[1]", "adapt.m"),
    ("tracking.log_artifacts=3", "tracking.log_artifacts"),
    ("tracking.log_artifacts=yes please", "tracking.log_artifacts"),
    ("pretrain.lr=fast", "pretrain.lr"),
    ("pretrain.lr=.nan", "pretrain.lr"),
    ("pretrain.lr=.inf", "pretrain.lr"),
    ("name=[1, 2]", "name"),
    ("suite.file.sources=[a]", "suite.file.sources[0]"),
    ("suite.gaussian=3", "suite.gaussian"),
])
def test_wrong_type_names_the_key(item, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [item])
    assert key in str(exc.value)
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("item,key", [
    ("adapt.m=0", "adapt.m"),
    ("adapt.m=-3", "adapt.m"),
    ("diffusion.T0=0", "diffusion.T0"),
    ("diffusion.T0=-0.1", "diffusion.T0"),
    ("pretrain.lr=0", "pretrain.lr"),
    ("pretrain.ema_decay=1.5", "pretrain.ema_decay"),
    ("suite.file.test_fraction=0", "suite.file.test_fraction"),
    ("suite.file.test_fraction=1.2", "suite.file.test_fraction"),
    ("model.time_dim=1", "model.time_dim"),
    ("sweep.m=[4, 0]", "sweep.m"),
])
def test_out_of_range_rejected(item, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [item])
    assert key in str(exc.value)


def test_range_bounds_are_inclusive_where_documented():
    cfg = load_config(None, ["adapt.m=1", "pretrain.ema_decay=1.0", "pretrain.weight_decay=0",
                             "suite.file.test_fraction=1.0", "threads=0"])
    assert cfg.adapt.m == 1 and cfg.pretrain.ema_decay == 1.0 and cfg.suite.file.test_fraction == 1.0


@pytest.mark.parametrize("item,key,suggestion", [
    ("adapt.mode=froze", "adapt.mode", "frozen"),
    ("adapt.mode=finetuen", "adapt.mode", "finetune"),
    ("suite.name=gausian", "suite.name", "gaussian"),
    ("evaluate.sampler=sd", "evaluate.sampler", "sde"),
    ("sweep.modes=[frozen, scrath]", "sweep.modes", "scratch"),
])
def test_literal_typo_suggests_choice(item, key, suggestion):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [item])
    msg = str(exc.value)
    assert key in msg and f"did you mean '{suggestion}'" in msg


@pytest.mark.parametrize("items", [["diffusion.T=0.01", "diffusion.T0=0.01"], ["diffusion.T=0.5", "diffusion.T0=1"]])
def test_T_must_exceed_T0(items):
    with pytest.raises(ConfigError, match="diffusion.T"):
        load_config(None, items)
    assert load_config(None, ["diffusion.T=0.02", "diffusion.T0=0.01"]).diffusion.T == 0.02


def test_time_dim_must_be_even():
    with pytest.raises(ConfigError, match="time_dim"):
        load_config(None, ["model.time_dim=15"])
    assert load_config(None, ["model.time_dim=14"]).model.time_dim == 14


def test_file_suite_requires_path():
    with pytest.raises(ConfigError, match="suite.file.path"):
        load_config(None, ["suite.name=file"])


# --------------------------------------------------------------------------------------------------------------
# Bad recipe files


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: demo\nadapt:\n  m: 8\n   steps: 3\n")  # line 4 is mis-indented
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert str(p) in msg and "line 4" in msg


def test_non_mapping_recipe_rejected(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- adapt\n- model\n")
    with pytest.raises(ConfigError, match="mapping") as exc:
        load_config(p)
    assert str(p) in str(exc.value)


def test_section_not_a_mapping_rejected(tmp_path):
    p = tmp_path / "sect.yaml"
    p.write_text("adapt: 3\n")
    with pytest.raises(ConfigError, match="adapt must be a mapping"):
        load_config(p)


def test_missing_recipe_file_rejected(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as exc:
        load_config(p)
    assert str(p) in str(exc.value)


def test_binary_recipe_rejected(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00\x81\x82garbage")
    with pytest.raises(ConfigError):
        load_config(p)


def test_recipe_errors_name_the_file(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("adapt:\n  mode: froze\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value) and "frozen" in str(exc.value)


def test_config_error_exit_code_is_2():
    assert ConfigError.exit_code == 2
    assert issubclass(ConfigError, CdmError)
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["adapt.m=0"])
    assert exc.value.exit_code == 2


def test_yaml_cannot_execute_code(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.yaml"
    p.write_text(f'adapt: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value)
    assert not marker.exists()
    # nor through --set: the tag fails to parse, so the value stays text (and an int key rejects it)
    with pytest.raises(ConfigError, match="adapt.m"):
        load_config(None, [f'adapt.m=!!python/object/apply:os.system ["touch {marker}"]'])
    cfg = load_config(None, [f'name=!!python/object/apply:os.system ["touch {marker}"]'])
    assert isinstance(cfg.name, str) and cfg.name.startswith("!!python")
    assert not marker.exists()
