"""The model repository: what ``load_repository`` reads from model.toml files,
and how it refuses a file that cannot be served (a ConfigError naming it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from batching import BatchPolicy
from server.repository import ConfigError, ModelConfig, TensorSpec, load_repository
from tests.servers import ROOT

VALID = """\
name = "{name}"
kind = "tensor"
max_batch_size = 8

[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]

[[outputs]]
name = "y"
datatype = "INT64"
shape = [-1]
"""


def write(root: Path, folder: str, text: str) -> Path:
    (root / folder).mkdir(parents=True)
    toml = root / folder / "model.toml"
    toml.write_text(text)
    return toml


def valid(name: str = "m") -> str:
    return VALID.format(name=name)


# -- the real repository ---------------------------------------------------------


def test_the_weights_folder_serves_digits_and_minilm_with_their_declared_tensors() -> None:
    digits, minilm = load_repository(ROOT / "weights")
    assert (digits.name, digits.kind, digits.folder) == (
        "digits",
        "tensor",
        ROOT / "weights/digits",
    )
    assert digits.inputs == (TensorSpec("pixels", "FP32", (-1, 64)),)
    assert digits.outputs == (
        TensorSpec("probabilities", "FP32", (-1, 10)),
        TensorSpec("label", "INT64", (-1,)),
    )
    assert digits.options["class"] == "DigitsNet"
    assert (minilm.name, minilm.kind) == ("minilm", "text")
    assert minilm.inputs == (TensorSpec("text", "BYTES", (-1,)),)
    assert minilm.outputs == (TensorSpec("embedding", "FP32", (-1, 384)),)


# -- a valid file -------------------------------------------------------------------


def test_a_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    toml = write(tmp_path, "m", valid())
    (config,) = load_repository(tmp_path)
    assert config == ModelConfig(
        name="m",
        kind="tensor",
        folder=toml.parent,
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "INT64", (-1,)),),
        policy=BatchPolicy(max_batch_size=8),
    )
    assert (config.max_batch_size, config.max_queue) == (8, 256)
    assert (config.queue_timeout_ms, config.device, config.instances, config.version) == (
        5000.0,
        "auto",
        1,
        "1",
    )


# -- the batching keys ----------------------------------------------------------

EVERY_KNOB = """\
max_batch_size = 16
max_wait_ms = 7
max_queue = 99
eager = false
isolate_errors = false
shrink_ms = 1500
hang_timeout_ms = 2500.0
"""


def test_a_file_without_batching_keys_gets_batch_policys_own_defaults(tmp_path: Path) -> None:
    write(tmp_path, "m", valid().replace("max_batch_size = 8\n", ""))
    (config,) = load_repository(tmp_path)
    assert config.policy == BatchPolicy()


def test_the_batching_defaults_are_the_ones_the_readme_documents(tmp_path: Path) -> None:
    write(tmp_path, "m", valid().replace("max_batch_size = 8\n", ""))
    (config,) = load_repository(tmp_path)
    assert config.policy == BatchPolicy(
        max_batch_size=32,
        max_wait=0.002,
        max_queue=256,
        eager=True,
        isolate_errors=True,
        shrink_seconds=60.0,
        hang_seconds=30.0,
    )


def test_every_batching_key_reaches_the_policy_with_milliseconds_as_seconds(
    tmp_path: Path,
) -> None:
    write(tmp_path, "m", EVERY_KNOB + valid().replace("max_batch_size = 8\n", ""))
    (config,) = load_repository(tmp_path)
    assert config.policy == BatchPolicy(
        max_batch_size=16,
        max_wait=0.007,
        max_queue=99,
        eager=False,
        isolate_errors=False,
        shrink_seconds=1.5,
        hang_seconds=2.5,
    )
    assert (config.max_batch_size, config.max_queue) == (16, 99)


def test_shrink_ms_sets_how_long_the_cap_after_running_out_of_memory_lasts(
    tmp_path: Path,
) -> None:
    write(tmp_path, "m", "shrink_ms = 250\n" + valid())
    (config,) = load_repository(tmp_path)
    assert config.policy.shrink_seconds == 0.25
    assert config.policy == BatchPolicy(max_batch_size=8, shrink_seconds=0.25)


def test_a_hang_timeout_of_zero_never_gives_up_on_a_forward(tmp_path: Path) -> None:
    write(tmp_path, "m", "hang_timeout_ms = 0\n" + valid())
    (config,) = load_repository(tmp_path)
    assert config.policy.hang_seconds is None


def test_models_are_listed_by_name_whatever_their_folders(tmp_path: Path) -> None:
    write(tmp_path, "a", valid("zeta"))
    write(tmp_path, "b", valid("alpha"))
    assert [config.name for config in load_repository(tmp_path)] == ["alpha", "zeta"]


def test_a_tensor_spec_reads_its_item_shape_and_v2_metadata() -> None:
    spec = TensorSpec("x", "FP32", (-1, 2, 3))
    assert spec.item_shape == (2, 3)
    assert spec.metadata() == {"name": "x", "datatype": "FP32", "shape": [-1, 2, 3]}


# -- a bad file is a ConfigError naming it -------------------------------------------

BAD_FILES = [
    pytest.param('colour = "red"\n' + valid(), ["colour"], id="unknown-key"),
    pytest.param(valid().replace('"INT64"', '"FLOAT"'), ["'FLOAT'", "y"], id="bad-datatype"),
    pytest.param(valid().replace("[-1, 4]", "[4]"), ["x", "[4]", "-1"], id="shape-not-from--1"),
    pytest.param(valid().replace("[-1, 4]", "[-1, 0]"), ["x"], id="shape-with-zero"),
    pytest.param(valid().replace("[-1, 4]", "[-1, -2]"), ["x"], id="shape-negative"),
    pytest.param(valid().replace("[-1, 4]", "[]"), ["x"], id="shape-empty"),
    pytest.param(valid().replace("[-1, 4]", '"-1, 4"'), ["x"], id="shape-a-string"),
    pytest.param(
        valid().replace("max_batch_size = 8", 'max_batch_size = "8"'),
        ["max_batch_size", "'8'"],
        id="max-batch-size-a-string",
    ),
    pytest.param(
        valid().replace("max_batch_size = 8", "max_batch_size = 8.5"),
        ["max_batch_size"],
        id="max-batch-size-a-float",
    ),
    pytest.param(
        valid().replace("max_batch_size = 8", "max_batch_size = true"),
        ["max_batch_size"],
        id="max-batch-size-a-bool",
    ),
    pytest.param(
        valid().replace("max_batch_size = 8", "max_batch_size = 0"),
        ["max_batch_size"],
        id="max-batch-size-zero",
    ),
    pytest.param("eager = 1\n" + valid(), ["eager"], id="eager-an-int"),
    pytest.param("max_wait_ms = -1\n" + valid(), ["max_wait_ms", "-1"], id="negative-wait"),
    pytest.param('max_wait_ms = "2"\n' + valid(), ["max_wait_ms", "'2'"], id="wait-a-string"),
    pytest.param("max_queue = 0\n" + valid(), ["max_queue = 0"], id="max-queue-zero"),
    pytest.param("isolate_errors = 1\n" + valid(), ["isolate_errors"], id="isolate-an-int"),
    pytest.param("shrink_ms = -1\n" + valid(), ["shrink_ms = -1"], id="negative-shrink"),
    pytest.param('shrink_ms = "60s"\n' + valid(), ["shrink_ms", "'60s'"], id="shrink-a-string"),
    pytest.param("shrink_ms = true\n" + valid(), ["shrink_ms"], id="shrink-a-bool"),
    pytest.param("hang_timeout_ms = -5\n" + valid(), ["hang_timeout_ms = -5"], id="negative-hang"),
    pytest.param(
        "queue_timeout_ms = 0\n" + valid(), ["queue_timeout_ms = 0"], id="queue-timeout-zero"
    ),
    pytest.param("instances = 0\n" + valid(), ["instances = 0"], id="no-instances"),
    pytest.param('device = "tpu"\n' + valid(), ["'tpu'"], id="bad-device"),
    pytest.param("options = 3\n" + valid(), [], id="options-not-a-table"),
    pytest.param(
        'name = "m"\nkind = "tensor"\ninputs = "x"\n'
        + "[[outputs]]"
        + valid().split("[[outputs]]")[1],
        [],
        id="inputs-not-a-list",
    ),
    pytest.param(valid("has space"), ["'has space'"], id="bad-name"),
    pytest.param(valid().replace('name = "m"\n', ""), ["'name'"], id="no-name"),
    pytest.param(valid().split("[[outputs]]")[0], ["'outputs'"], id="no-outputs"),
    pytest.param(valid().replace('datatype = "FP32"\n', ""), ["'datatype'"], id="no-datatype"),
    pytest.param("name = [", [], id="not-toml"),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_FILES)
def test_a_bad_model_toml_is_a_config_error_naming_the_file(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    write(tmp_path, "good", valid("good"))
    toml = write(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as raised:
        load_repository(tmp_path)
    message = str(raised.value)
    assert str(toml) in message
    for fragment in fragments:
        assert fragment in message


def test_two_models_with_one_name_are_a_config_error(tmp_path: Path) -> None:
    write(tmp_path, "a", valid("same"))
    write(tmp_path, "b", valid("same"))
    with pytest.raises(ConfigError, match="'same'") as raised:
        load_repository(tmp_path)
    assert str(tmp_path) in str(raised.value)


def test_two_models_with_one_name_are_a_config_error_naming_both_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a", valid("same"))
    second = write(tmp_path, "b", valid("same"))
    with pytest.raises(ConfigError) as raised:
        load_repository(tmp_path)
    assert str(first) in str(raised.value)
    assert str(second) in str(raised.value)


def test_two_inputs_with_one_name_are_a_config_error_naming_the_file(tmp_path: Path) -> None:
    text = valid().replace(
        "[[outputs]]", '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1]\n\n[[outputs]]'
    )
    toml = write(tmp_path, "m", text)
    with pytest.raises(ConfigError) as raised:
        load_repository(tmp_path)
    assert str(toml) in str(raised.value)
    assert "'x'" in str(raised.value)


def test_a_boolean_dimension_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    toml = write(tmp_path, "m", valid().replace("[-1, 4]", "[-1, true]"))
    with pytest.raises(ConfigError) as raised:
        load_repository(tmp_path)
    assert str(toml) in str(raised.value)


def test_a_repository_without_models_is_a_config_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no \*/model\.toml") as raised:
        load_repository(tmp_path)
    assert str(tmp_path) in str(raised.value)


def test_a_repository_that_is_not_a_folder_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as raised:
        load_repository(missing)
    assert str(missing) in str(raised.value)
