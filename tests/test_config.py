import pytest

from xmodal.config import Config, load_config, save
from xmodal.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["optim.lr=2e-4", "train.steps=7", "model.image.args={image_size: 64}"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.train.steps == 7
    assert cfg.model.image.args == {"image_size": 64}
    assert cfg.model.image.name == "efficientnet_lite0"  # partial section keeps defaults


def test_include_and_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 10, batch_size: 4}\noptim: {lr: 0.5}\n")
    (tmp_path / "exp.yaml").write_text("include: base.yaml\ntrain: {steps: 20}\n")
    cfg = load_config(tmp_path / "exp.yaml", ["optim.name=adamax"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.optim.lr, cfg.optim.name) == (20, 4, 0.5, "adamax")


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.amp=[1]", "train.amp: expected a string"),
    ("nokey", "expected KEY=VALUE"),
    ("train.tensorboard=3", "expected true/false"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_unknown_key_lists_valid(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: {fromat: table}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.yaml")
    assert "data.fromat" in str(err.value) and "format" in str(err.value)


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "broken.yaml").write_text("train: {steps: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_save_roundtrip(tmp_path):
    cfg = load_config(None, ["name=x", "loss.args={margin: 0.3}"])
    save(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
