from pathlib import Path

import pytest

from fed.config import ConfigError, RunConfig
from fed.config.sources import from_run_config, load_preset, parse_override, preset_names, resolve

ROOT = Path(__file__).parents[2]


def test_presets_resolve_and_round_trip():
    assert {"quickstart", "instruct"} <= set(preset_names())
    for name in preset_names():
        cfg = resolve(name)
        assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_overrides_are_typed():
    cfg = resolve(
        "quickstart",
        [
            "adapter.kind=ffa-lora",
            "dp.enabled=true",
            "dp.target_epsilon=8",
            "adapter.targets=query,key",
            "federation.rounds=2",
        ],
    )
    assert cfg.adapter.kind == "ffa-lora" and cfg.dp.enabled and cfg.dp.target_epsilon == 8.0
    assert cfg.adapter.targets == ("query", "key") and cfg.federation.rounds == 2


@pytest.mark.parametrize(
    "override, named",
    [
        ("adapter.kind=dora", "'dora' is not one of: lora, dynamic-lora, ffa-lora"),
        ("data.partition=random", "'random' is not one of: iid, dirichlet, pathological"),
        ("adapter.rnak=4", "unknown key 'adapter.rnak'"),
        ("train.lr=fast", "train.lr='fast'"),
        ("federation.fraction_train=0", "federation.fraction_train=0.0 must be in (0.0, 1.0]"),
        ("adapter.rank=0", "adapter.rank=0 must be >= 1"),
        ("task=translation", "'translation' is not one of: classification, causal-lm"),
        ("dp.head_clip_share=1", "dp.head_clip_share=1.0 must be in [0, 1)"),
        ("train.lr_schedule=step", "train.lr_schedule='step' is not one of: constant, cosine"),
        ("model.layers=-2", "model.layers=-2 must be >= 0"),
    ],
)
def test_bad_values_are_named_with_what_is_accepted(override, named):
    with pytest.raises(ConfigError) as err:
        resolve("quickstart", [override])
    assert named in str(err.value)


def test_per_layer_clipping_needs_hooks():
    with pytest.raises(ConfigError, match="needs dp.grad_sample_mode='hooks'"):
        resolve("private", ["dp.head_clip_share=0.5", "dp.grad_sample_mode=ghost"])
    assert resolve("private", ["dp.head_clip_share=0.5"]).dp.head_clip_share == 0.5


def test_dp_needs_exactly_one_of_target_or_noise():
    with pytest.raises(ConfigError, match="needs dp.target_epsilon"):
        resolve("quickstart", ["dp.enabled=true"])
    with pytest.raises(ConfigError, match="both set"):
        resolve("quickstart", ["dp.enabled=true", "dp.target_epsilon=3", "dp.noise_multiplier=1.0"])


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        resolve("quickstart", ["adapter.kind=dora", "data.partition=random", "train.batch_size=0"])
    assert str(err.value).count("\n  - ") == 3


def test_flower_run_config_reaches_the_same_config():
    cfg = from_run_config({"preset": "quickstart", "adapter.rank": 4, "dp.enabled": True, "dp.noise_multiplier": 1.1})
    assert cfg == resolve("quickstart", ["adapter.rank=4", "dp.enabled=true", "dp.noise_multiplier=1.1"])


def test_unknown_preset_lists_shipped_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        load_preset("nope")


def test_override_syntax():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("model.name=/tmp/x") == ("model.name", "/tmp/x")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("adapter.rank")


def test_flower_app_declares_every_config_key():
    """Flower refuses run-config keys the app does not declare; pyproject must list them all, as generated."""
    import tomllib

    from fed.config.reference import flower_block
    from fed.config.sources import flatten

    text = (ROOT / "pyproject.toml").read_text()
    declared = flatten(tomllib.loads(text)["tool"]["flwr"]["app"]["config"])
    assert set(declared) == set(RunConfig().to_flat()) | {"preset", "out", "name", "resume"}
    assert from_run_config(declared) == resolve("quickstart")
    start = text.index("[tool.flwr.app.config]\n")
    block = text[start : _block_end(text, start)]
    assert block.rstrip() + "\n" == flower_block(), (
        "pyproject's run-config declarations drifted: paste `fed config --pyproject`"
    )


def _block_end(text: str, start: int) -> int:
    """Where the tables under [tool.flwr.app.config] that begin at ``start`` end: the next other table."""
    position = start
    while (position := text.find("\n[", position + 1)) != -1:
        if not text.startswith("\n[tool.flwr.app.config", position):
            return position
    return len(text)


def test_reference_page_is_generated_from_the_dataclasses():
    from fed.config.reference import MARKDOWN_PATH, markdown

    assert (ROOT / MARKDOWN_PATH).read_text() == markdown(), (
        "docs/configuration.md drifted: run fed config --markdown > docs/configuration.md"
    )


def test_every_key_and_section_has_a_docstring():
    from fed.config import keys, sections
    from fed.config.reference import docs

    assert set(keys()) | set(sections()) <= {name for name, doc in docs().items() if doc}


def test_choices_come_from_the_field_types():
    from fed.adapters import registry
    from fed.config import keys

    assert keys()["wire.dtype"].choices == ("float32", "bfloat16") and keys()["wire.dtype"].kind is str
    assert keys()["adapter.kind"].choices == registry.kinds()
    assert keys()["adapter.targets"].kind is tuple and not keys()["adapter.targets"].choices
    assert resolve("quickstart", ["train.optimizer=sgd", "strategy.clip=off"]).train.optimizer == "sgd"


def test_each_section_checks_its_own_values():
    from fed.config import DPConfig, StrategyConfig

    assert StrategyConfig(clip="fixed").problems() == ["strategy.clip='fixed' needs strategy.max_delta_norm > 0"]
    assert DPConfig().problems() == [] and "needs dp.target_epsilon" in DPConfig(enabled=True).problems()[0]


def test_fed_config_lists_every_key_with_a_preset(capsys, monkeypatch):
    from fed.config import keys
    from simulations.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # rich's width off a terminal; 80 would fold the values

    assert main(["config", "--list", "--preset", "private"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in keys()) and '"sms-spam"' in out


def test_cli_stops_on_a_bad_value_before_any_work(capsys):
    from simulations.cli import main

    assert main(["simulate", "--set", "adapter.kind=dora", "--out", "/nonexistent/never-created"]) == 2
    err = capsys.readouterr().err
    assert "adapter.kind='dora' is not one of: lora, dynamic-lora, ffa-lora" in err


def test_simulation_section_sizes_the_ray_actors():
    from simulations.run import backend_config

    default = backend_config(RunConfig().simulation, verbose=False)
    assert default["client_resources"]["num_cpus"] == 1 and "num_cpus" not in default["init_args"]  # one per core
    one_wide = RunConfig.from_flat({"simulation.actors": 1, "simulation.threads": 2}).simulation
    sized = backend_config(one_wide, verbose=False)
    assert sized["init_args"]["num_cpus"] // sized["client_resources"]["num_cpus"] == 1  # Flower's pool size
    assert sized["client_resources"]["num_cpus"] == 2
    with pytest.raises(ConfigError, match="simulation.threads=0"):
        RunConfig.from_flat({"simulation.threads": 0})


def test_the_adapter_sections_option_keys_are_the_families_own():
    """Every ``adapter.*`` key beyond the common ones is an option some family declares, with the same default;
    and every option a family declares is a key (else no config could set it)."""
    import dataclasses

    from fed.adapters import family, kinds
    from fed.config import AdapterConfig

    common = {"kind", "rank", "alpha", "dropout", "targets"}
    config = {f.name: f.default for f in dataclasses.fields(AdapterConfig) if f.name not in common}
    declared: dict[str, object] = {}
    for kind in kinds():
        for option in dataclasses.fields(family(kind).Options):
            assert declared.setdefault(option.name, option.default) == option.default, (kind, option.name)
    assert config == declared
