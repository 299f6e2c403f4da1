"""The one YAML -> dataclass loader: typed fields, errors that name the key and its line, overlays and --set."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from compactlm.core.config import Located, build, load, load_yaml, overlay, part, put, set_values
from compactlm.core.errors import CompactLMError


@dataclass(frozen=True)
class Inner:
    size: int = 4
    names: tuple[str, ...] = ()

    def __post_init__(self):
        if self.size < 1:
            raise CompactLMError(f"size must be >= 1, not {self.size}", key="size")


@dataclass(frozen=True)
class Outer:
    name: str
    lr: float = 1e-4
    seq_len: int = 256
    shape: tuple[int, int] | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    items: dict[str, Inner] = field(default_factory=dict)
    stages: tuple[Inner, ...] = ()
    hidden: str = field(default="", metadata={"config": False})

    @classmethod
    def config_prepare(cls, data: dict) -> dict:
        if isinstance(data.get("shape"), str):  # a shorthand: "128x64"
            data["shape"] = [int(v) for v in data["shape"].split("x")]
        return data


def _file(tmp_path, text: str):
    path = tmp_path / "file.yaml"
    path.write_text(text)
    return path


def test_keys_with_dashes_and_yaml_12_numbers_build_the_dataclass(tmp_path):
    path = _file(tmp_path, "# a comment\nname: a\nseq-len: 32\nlr: 1e-3\nshape: [128, 64]\nflag: true\n")
    value = load(Outer, path, "file")
    assert value == Outer(name="a", lr=1e-3, seq_len=32, shape=(128, 64), flag=True)
    assert load(Outer, _file(tmp_path, "name: b\nlr: 1\nshape: 8x4\n"), "file").lr == 1.0  # ints are numbers
    assert load(Outer, _file(tmp_path, "name: b\nshape: 8x4\n"), "file").shape == (8, 4)  # config_prepare


def test_nested_sections_mappings_and_lists_of_dataclasses(tmp_path):
    text = "name: a\ninner: {size: 2, names: [x, y]}\nitems:\n  one: {size: 3}\nstages:\n  - {size: 5}\n  - {}\n"
    value = load(Outer, _file(tmp_path, text), "file")
    assert value.inner == Inner(2, ("x", "y")) and value.items == {"one": Inner(3)}
    assert value.stages == (Inner(5), Inner())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: a\nseq-lenn: 64\n", r"file.yaml:2: unknown key 'seq-lenn' in the file \(did you mean 'seq_len'\?\)"),
        ("name: a\ninner:\n  sise: 2\n", r"file.yaml:3: unknown key 'sise' in inner \(did you mean 'size'\?\)"),
        ("name: a\nzzz: 1\n", r"file.yaml:2: unknown key 'zzz' in the file; known keys there: flag, inner"),
        ("name: a\nhidden: x\n", r"file.yaml:2: unknown key 'hidden'"),
        ("name: a\nseq_len: many\n", r"file.yaml:2: seq_len must be an integer, not 'many'"),
        ("name: a\nflag: 1\n", r"file.yaml:2: flag must be true or false, not 1"),
        ("name: a\nshape: [1, 2, 3]\n", r"file.yaml:2: shape must have 2 items, not 3"),
        ("name: a\nstages:\n  - {size: 2}\n  - {size: lots}\n", r"file.yaml:4: stages\[1\].size must be an integer"),
        ("name: a\nitems:\n  one:\n    size: 0\n", r"file.yaml:4: size must be >= 1, not 0"),
        ("name: a\ninner: 3\n", r"file.yaml:2: inner must be a mapping, not 3"),
        ("lr: 1.0\n", r"file.yaml: the file needs name"),
    ],
)
def test_bad_values_name_the_key_and_its_line(tmp_path, text, message):
    with pytest.raises(CompactLMError, match=message):
        load(Outer, _file(tmp_path, text), "file")


def test_dashes_name_fields_but_data_keys_stay_as_written(tmp_path):
    value = load(Outer, _file(tmp_path, "name: a\nitems:\n  my-model: {size: 3}\n"), "file")
    assert value.items == {"my-model": Inner(3)}  # a name the user chose, not a field
    with pytest.raises(CompactLMError, match=r"file.yaml:2: unknown key 'si-ze' in inner"):
        load(Outer, _file(tmp_path, "name: a\ninner: {si-ze: 2}\n"), "file")
    with pytest.raises(CompactLMError, match=r"file.yaml:3: 'seq_len' is given twice \(also as 'seq-len'\)"):
        load(Outer, _file(tmp_path, "name: a\nseq-len: 8\nseq_len: 9\n"), "file")


def test_an_unknown_key_with_nothing_close_has_no_suggestion(tmp_path):
    with pytest.raises(CompactLMError) as info:
        load(Outer, _file(tmp_path, "name: a\nzzz: 1\n"), "file")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: [1, 2\n", "is not valid YAML"),
        ("steps: 1\n  lr: 2\n", "is not valid YAML"),
        ("- steps\n- lr\n", "must be a mapping of key: value"),
        ("just a string\n", "must be a mapping of key: value"),
    ],
)
def test_invalid_yaml_and_a_non_mapping_are_refused(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(CompactLMError, match=f"options file {path} {message}"):
        load_yaml(path, "options file")


def test_an_empty_file_is_no_values_where_allowed_and_a_missing_one_is_refused(tmp_path):
    assert load_yaml(_file(tmp_path, "# only a comment\n"), "f", empty_ok=True).data == {}
    with pytest.raises(CompactLMError, match="must be a mapping"):
        load_yaml(_file(tmp_path, ""), "f")
    with pytest.raises(CompactLMError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml", "f")
    with pytest.raises(CompactLMError, match="is a folder"):
        load_yaml(tmp_path, "f")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CompactLMError, match="not a text file"):
        load_yaml(tmp_path / "bin.yaml", "f")


def test_an_overlay_merges_sections_key_by_key_and_lines_follow_the_values(tmp_path):
    base = load_yaml(_file(tmp_path, "name: a\ninner: {size: 2, names: [x]}\nlr: 1e-3\n"), "f")
    top = Located({"inner": {"size": 0}}, {"inner.size": "budgets.big:9"}, "")
    merged = overlay(base, top)
    assert merged.data == {"name": "a", "inner": {"size": 0, "names": ["x"]}, "lr": 1e-3}
    assert base.data["inner"]["size"] == 2  # the inputs are untouched
    with pytest.raises(CompactLMError, match=r"^budgets.big:9: size must be >= 1"):
        build(Outer, merged)


def test_set_values_reads_yaml_values_and_refuses_malformed_ones():
    located = set_values(["inner.size=3", "lr=1e-3", "inner.names=[a, b]", "shape=null"])
    assert located.data == {"inner": {"size": 3, "names": ["a", "b"]}, "lr": 1e-3, "shape": None}
    assert located.where["inner.size"] == "--set inner.size=3"
    with pytest.raises(CompactLMError, match=r"--set 'inner.size': write it as section.key=value"):
        set_values(["inner.size"])
    with pytest.raises(CompactLMError, match=r"--set 'inner.names=\[1': '\[1' is not a YAML value"):
        set_values(["inner.names=[1"])
    with pytest.raises(CompactLMError, match="write it as section.key=value"):
        set_values(["inner..size=1"])


def test_a_set_value_of_the_wrong_kind_names_the_override(tmp_path):
    base = load_yaml(_file(tmp_path, "name: a\n"), "f")
    with pytest.raises(CompactLMError, match=r"--set lr=fast: lr must be a number, not 'fast'"):
        build(Outer, overlay(base, set_values(["lr=fast"])))


def test_part_and_put_move_a_section_with_its_lines(tmp_path):
    located = load_yaml(_file(tmp_path, "name: a\ninner:\n  size: 0\n"), "f")
    inner = part(located, "inner")
    assert inner.data == {"size": 0} and inner.where["size"].endswith("file.yaml:3")
    moved = put(located, "stages", Located([inner.data], {"[0].size": inner.where["size"]}, ""))
    assert moved.data["stages"] == [{"size": 0}]
    assert part(located, "missing").data == {}
