"""Property tests: no input makes a parser fail with anything but its documented error.

Data files (``safealign.rows``, ``safealign.data``): :class:`DataError`. Settings from a
mapping (every command's ``Settings.from_dict``): :class:`SettingsError`. Merge configs:
:class:`MergeConfigError`. Option specs (``safealign.registry``): :class:`RegistryError`, and
``parse_value`` never raises. Sizes (``checkpoint.parse_size``): ``ValueError``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safealign.checkpoint import parse_size
from safealign.data import DataError, load_pairs, load_prompts, load_task
from safealign.registry import RegistryError, parse_options, parse_value, split_items
from safealign.rows import FORMATS, Row, read_rows
from safealign.settings import SettingsError

EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

FIELDS = ["prompt", "goal", "Behavior", "answer", "response", "messages", "label", "type", "text"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", 3]), "content": scalars}
    ),
    max_size=4,
)
rows = st.dictionaries(st.sampled_from(FIELDS), json_values | messages, max_size=4) | json_values


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("property")


#: (loader, the texts of one loaded item): every text a loader returns is non-blank.
LOADERS = [
    (load_prompts, lambda prompt: [prompt]),
    (lambda path: load_prompts(path, label="safe"), lambda prompt: [prompt]),
    (load_task, lambda example: [example.prompt, example.answer]),
    (load_pairs, lambda pair: [pair.prompt, pair.response]),
]


def _file(folder: Path, suffix: str, data: bytes) -> Path:
    path = folder / f"data{suffix}"
    path.write_bytes(data)
    return path


def _jsonl(values: list) -> bytes:
    return "".join(json.dumps(v) + "\n" for v in values).encode()


@EXAMPLES
@given(suffix=st.sampled_from([*FORMATS, ".yaml", ""]), data=st.binary(max_size=300))
def test_read_rows_takes_any_bytes(folder, suffix, data):
    try:
        result = read_rows(_file(folder, suffix, data))
    except DataError as error:
        assert str(error).endswith(str(folder / f"data{suffix}")) or ":" in str(error)
        return
    assert result and all(isinstance(r, Row) for r in result)


@EXAMPLES
@given(
    suffix=st.sampled_from(list(FORMATS)),
    text=st.text(alphabet=st.sampled_from('{}[]",:\t\n\r\\ab1-e.\x00é'), max_size=200),
)
def test_read_rows_takes_any_near_miss_text(folder, suffix, text):
    try:
        read_rows(_file(folder, suffix, text.encode()))
    except DataError:
        pass


@EXAMPLES
@given(
    values=st.lists(rows, max_size=5),
    garbage=st.sampled_from(["", "{", "[" * 5000, "1" * 5000, "\ud800", "NaN", "[1e999]"]),
)
def test_loaders_take_any_json_rows(folder, values, garbage):
    path = _file(folder, ".jsonl", _jsonl(values) + garbage.encode("utf-8", "surrogatepass"))
    for load, texts in LOADERS:
        try:
            items = list(load(path))
        except DataError:
            continue
        assert items
        assert all(isinstance(t, str) and t.strip() for item in items for t in texts(item))


@EXAMPLES
@given(data=st.lists(st.dictionaries(st.sampled_from(FIELDS), scalars, max_size=3), max_size=4))
def test_loaders_take_any_csv(folder, data):
    import csv
    import io

    buffer = io.StringIO()
    names = sorted({k for row in data for k in row})
    writer = csv.DictWriter(buffer, fieldnames=names or ["x"])
    writer.writeheader()
    writer.writerows(data)
    path = _file(folder, ".csv", buffer.getvalue().encode())
    for load, texts in LOADERS:
        try:
            items = list(load(path))
        except DataError:
            continue
        assert all(isinstance(t, str) and t.strip() for item in items for t in texts(item))


def _settings_classes():
    from safealign.compare.settings import CompareSettings
    from safealign.eval.settings import EvalSettings
    from safealign.merge.settings import MergeSettings
    from safealign.recover.settings import RecoverSettings
    from safealign.retrain.settings import RetrainSettings

    return [RecoverSettings, MergeSettings, RetrainSettings, EvalSettings, CompareSettings]


SETTINGS_CLASSES = _settings_classes()


@EXAMPLES
@given(
    cls=st.sampled_from(SETTINGS_CLASSES),
    data=st.data(),
)
def test_settings_from_any_mapping(cls, data):
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    keys = st.sampled_from(names) | st.text(max_size=8)
    mapping = data.draw(st.dictionaries(keys, json_values, max_size=4))
    try:
        cls.from_dict(mapping, where="cfg.yaml")
    except SettingsError:
        pass


@EXAMPLES
@given(text=st.text(alphabet=st.sampled_from("abc:[]{}-,'\"\n 1.#&*!|>@"), max_size=120))
def test_merge_config_from_any_yaml(folder, text):
    from safealign.merge.config import MergeConfigError, load_config

    path = _file(folder, ".yaml", text.encode())
    try:
        load_config(path)
    except MergeConfigError:
        pass


@EXAMPLES
@given(
    data=st.dictionaries(
        st.sampled_from(
            ["merge_method", "models", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer",
             "tokenizer_source", "slices", "x"]
        ),
        json_values
        | st.sampled_from(["linear", "ties", "safemerge", "resta"])
        | st.lists(st.dictionaries(st.sampled_from(["model", "parameters"]), json_values)),
        max_size=5,
    )
)  # fmt: skip
def test_merge_config_from_any_mapping(folder, data):
    from safealign.merge.config import MergeConfigError, load_config

    (folder / "config.yaml").write_text(yaml.safe_dump(data))
    try:
        load_config(folder / "config.yaml")
    except MergeConfigError:
        pass


OPTION_TEXT = st.text(alphabet=st.sampled_from('ab=,[]:{} 1.-e"tru'), max_size=60)


@EXAMPLES
@given(text=OPTION_TEXT | st.text(max_size=40) | st.just("[" * 3000))
def test_option_parsers(text):
    parse_value(text)  # never raises: anything it cannot read stays text
    items = split_items(text)
    assert all(item == item.strip() and item for item in items)
    try:
        options = parse_options(text)
    except RegistryError:
        return
    assert all(isinstance(k, str) and k == k.strip() and k for k in options)


@EXAMPLES
@given(size=st.integers(-(10**20), 10**20) | st.text(max_size=12) | st.sampled_from(
    ["5GB", "1.5GiB", "0MB", " 20 kb", "1e3", "GB", "-1", "nan", "inf", "9" * 400]
))  # fmt: skip
def test_parse_size(size):
    try:
        value = parse_size(size)
    except ValueError:
        return
    assert isinstance(value, int) and value > 0
