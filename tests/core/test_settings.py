"""One truth per setting: SETTINGS declares each setting once, and TrainConfig, the checks, the
command line of the kernel and `dogkit train`, the model check and the kernel's settings block all
follow it."""
import ast
import dataclasses
import inspect
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dogkit.cli import main as cli
from dogkit.core import registry
from dogkit.core.kernel import config_from_options, parse_args
from dogkit.core.settings import (SETTING, SETTINGS, Choices, TrainConfig, model_settings, setting_problem,
                                  unread_settings, with_settings)

ROOT = Path(__file__).resolve().parents[2]
SOME_MODELS = [row for row in SETTINGS if row[3] is not None]  # the settings only some models read


def another_value(row):
    """A valid value of the setting other than its default."""
    name, default, values, _, _ = row
    if isinstance(values, Choices):
        return next(v for v in values if v != default)
    low, high = values
    value = default + 1 if isinstance(default, int) else (default + high) / 2 if high is not None else default + 1.0
    value = (low + default) / 2 if value == default else value  # a default at the top of its range
    assert setting_problem(name, value) is None, (name, value)
    return value


def test_trainconfig_is_the_table():
    assert [f.name for f in dataclasses.fields(TrainConfig)] == [row[0] for row in SETTINGS]
    assert all(getattr(TrainConfig(), n) == d and type(getattr(TrainConfig(), n)) is type(d) for n, d, *_ in SETTINGS)
    for name, default, *_ in SETTINGS:
        assert setting_problem(name, default) is None, name  # every default passes its own check


@pytest.mark.parametrize("model", registry.MODEL_NAMES)
@pytest.mark.parametrize("row", SOME_MODELS, ids=[row[0] for row in SOME_MODELS])
def test_a_setting_the_model_does_not_read_is_refused_naming_those_that_do(model, row):
    """On the kernel's and dogkit train's path (config_from_options with the model), before any work."""
    name, models = row[0], row[3]
    value = another_value(row)
    entry = registry.get(model)
    opts = vars(parse_args(["--data", "x.npz", "--" + name.replace("_", "-"), str(value)]))
    if model in models:
        assert getattr(config_from_options(entry.settings, opts, presets=entry.presets, model=model), name) == value
    else:
        with pytest.raises(ValueError) as err:
            config_from_options(entry.settings, opts, presets=entry.presets, model=model)
        reader = f"({', '.join(models)} {'does' if len(models) == 1 else 'do'})"
        assert str(err.value) == f"{name}={value!r}: model {model} does not read it {reader}"


@pytest.mark.parametrize("model", registry.MODEL_NAMES)
def test_the_models_column_is_what_each_model_reads(model):
    """A setting only some models read is read (cfg.NAME) in the source of each model named for it
    and of no other: the table cannot drift from the code."""
    source = inspect.getsource(sys.modules[registry.get(model).cls.__module__])
    read = set(re.findall(r"\bcfg\.([a-z_0-9]+)", source))
    for name, _, _, models, _ in SOME_MODELS:
        assert (name in read) == (model in models), f"{model} and {name}"


def test_diffaugment_is_refused_for_a_model_without_it():
    cfg = with_settings(TrainConfig(), {"augment": "flip+diffaug"})
    assert unread_settings(cfg, "gan") == ["augment='flip+diffaug': model gan does not apply DiffAugment "
                                           "(biggan and dcgan do)"]
    assert unread_settings(cfg, "biggan") == []


def test_ranges_and_choices_agree_with_the_data_path():
    """Cleaning makes 64, 80, 96 and 128-pixel crops: image_size takes exactly those."""
    from dogkit.core.data import CROP_SIZES

    assert tuple(SETTING["image_size"][2]) == CROP_SIZES
    with pytest.raises(ValueError, match=r"image_size=72: choose from 64, 80, 96, 128"):
        with_settings(TrainConfig(), {"image_size": 72})
    with pytest.raises(ValueError, match=r"^lr_final=-1.0: must be a finite number from 0.0 to 10.0; "
                                         r"strategy='crop': choose from box, square, aspect, pad$"):
        with_settings(TrainConfig(), {"lr_final": -1.0, "strategy": "crop"})


def test_every_setting_is_an_option_of_the_kernel_and_of_dogkit_train():
    """Both command lines come from the table: every setting but the model and Kaggle's wall, with
    the table's help; a value given there wins over the model's."""
    names = [n for n, *_ in SETTINGS if n not in ("model", "hard_limit")]
    args = parse_args(["--data", "x", "--lr-final", "0.5", "--image-size", "96", "--loss", "hinge"])
    assert (args.lr_final, args.image_size, args.loss) == (0.5, 96, "hinge")
    assert all(hasattr(args, n) for n in names)
    text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
    for name in names:
        assert "--" + name.replace("_", "-") in text, name
    assert "half-lives (kimg) of extra EMA copies" in text and "read by wgan-gp" in text


def test_a_model_registered_with_a_setting_it_does_not_read_is_refused():
    from dogkit.core.models.gan import GAN

    with pytest.raises(TypeError, match=r"settings: gp_weight=5.0: model gan does not read it \(wgan-gp does\)"):
        registry.register(GAN, {"gp_weight": 5.0}, "a GAN with a gradient penalty it never applies")
    assert registry.MODELS["gan"].settings.get("gp_weight") is None


@pytest.mark.parametrize("model", ["biggan", "cvae"])
def test_the_kernel_settings_block_lists_every_other_setting_the_model_reads(model):
    sys.path.insert(0, str(ROOT / "tools"))
    import build_kernel

    text = build_kernel.build(model)
    front = text[:text.index("# MACHINERY.")]
    entry = registry.get(model)
    listed = re.findall(r"^#   ([a-z_0-9]+)=", front, flags=re.M)
    assert listed == [row[0] for row in model_settings(model) if row[0] not in entry.settings]
    assert set(listed) | set(entry.settings) >= {row[0] for row in model_settings(model)}
    assert "#   gp_weight=" not in front and ("#   lecam=" in front) == (model == "biggan")
    ast.parse(text)


@pytest.mark.parametrize("t", [0.01, -0.5, float("nan"), float("inf"), 101.0])
def test_one_truncation_rule_for_every_sampling_path(t, tmp_path):
    """0 (none) or 0.04 to 100, checked by sample.truncation_problem alone: sampling itself, the
    settings (which add -1, from the plan) and `dogkit sample` refuse the same values in its words."""
    from dogkit.core.sample import truncated_normal, truncation_problem

    why = truncation_problem(t)
    assert why == (f"truncation {t!r}: give 0 (none) or a number from 0.04 to 100 (a smaller one keeps almost no z "
                   f"value and would never finish redrawing)")
    with pytest.raises(ValueError) as err:
        truncated_normal((2,), t)
    assert str(err.value) == why
    with pytest.raises(ValueError) as err:
        with_settings(TrainConfig(), {"truncation": t})
    assert str(err.value) == f"truncation={t!r}: {why.split(': ', 1)[1]}, or -1: from the planned passes"
    (tmp_path / "c.pt").write_bytes(b"never read")
    res = CliRunner().invoke(cli, ["sample", str(tmp_path / "c.pt"), "-o", str(tmp_path / "s.zip"),
                                        "--truncation", str(t)])
    assert res.exit_code == 1 and res.stderr.strip() == f"Error: --{why}", res.output


def test_truncation_zero_or_none_is_the_plain_normal_and_the_bounds_are_allowed():
    from dogkit.core.sample import truncation_problem

    assert [truncation_problem(t) for t in (None, 0, 0.0, 0.04, 1, 100.0)] == [None] * 6
    assert truncation_problem(True) and truncation_problem("1")
