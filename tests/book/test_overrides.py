"""Profile overrides from the command line (fbsembook.overrides) and one's own profile YAML:
parsing, validation errors, what they change in the cache keys, the parameters table, and a
chapter executed with both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from fbsemlib.config import from_dict, load_experiment
from fbsemlib.data import DataConfig, recipe_hash
from fbsemlib.errors import UserError
from fbsemlib.training import OPERATIONAL_FIELDS, TrainConfig
from fbsembook import execute, experiments as ex, memory, overrides, profiles
from myst_chapter import myst_chapter

REPO = Path(__file__).resolve().parents[2]
FBSEM = [sys.executable, "-c", "import sys; from fbsemlib.cli import main; sys.exit(main())"]


@pytest.fixture
def no_env_overrides(monkeypatch):
    monkeypatch.delenv(overrides.OVERRIDES_ENV, raising=False)


def _smoke_copy(tmp_path: Path, num_iterations: int) -> Path:
    """A copy of data/smoke.yaml with another K (num_iterations x num_subsets)."""
    doc = yaml.safe_load((REPO / "data" / "smoke.yaml").read_text())
    doc["data"]["num_iterations"] = num_iterations
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_dotted_parameters_are_overrides():
    v = execute.parse_parameter_values([("data.counts_range", "[1e5, 1e6]"), ("model.width", "32"),
                                       ("seeds", "[0, 1]"), ("data.phantom.pet_hot_contrast", "2.5")])
    assert v["data.counts_range"] == [1e5, 1e6] and v["model.width"] == 32
    params, ov = overrides.split_overrides(v)
    assert params == {"seeds": [0, 1]}
    assert ov == {"data.counts_range": [1e5, 1e6], "model.width": 32, "data.phantom.pet_hot_contrast": 2.5}
    with pytest.raises(UserError, match="dotted identifiers"):
        execute.parse_parameter_values([("data..width", "1")])
    sections = overrides.apply_overrides({"data": {"phantom": {"a": 1}}}, ov)
    assert sections["data"]["phantom"] == {"a": 1, "pet_hot_contrast": 2.5}
    assert sections["model"] == {"width": 32}


@pytest.mark.parametrize("key, value, message", [
    ("model.widht", 32, r"unknown key 'widht' in section 'model' \(did you mean 'width'\?\)"),
    ("modle.width", 32, r"unknown profile section 'modle' \(did you mean 'model'\?\)"),
    ("train.epoch", 3, r"did you mean 'epochs'\?"),
    ("train.epochs", "three", r"-p train.epochs \"three\": .*expected an integer"),
    ("data.phantom.pet_hot_contrats", 2.0, r"did you mean 'pet_hot_contrast'\?"),
    ("data.counts_range", [1e6], r"data.counts_range"),
    ("data.scanner.rings", 2, r"'data.scanner' is 'tiny2d', not a section"),
])
def test_misspelt_or_invalid_overrides_are_refused(key, value, message):
    sections = load_experiment(ex.profile_path("smoke"))
    with pytest.raises(UserError, match=message):
        overrides.validate_overrides(sections, {key: value})


def test_valid_overrides_pass(no_env_overrides):
    sections = load_experiment(ex.profile_path("smoke"))
    ov = {"data.counts_range": [1e5, 1e6], "model.width": 32, "train.epochs": 3, "data.num_subsets": 2,
          "baselines.fwhm_mm": [4.0]}
    assert overrides.validate_overrides(sections, ov) == ov


def test_overrides_key_the_cache_by_what_depends_on_them(monkeypatch):
    def keys():
        s = ex.load_profile("smoke")
        train = {k: v for k, v in from_dict(TrainConfig, s["train"], "train").to_dict().items()
                 if k not in OPERATIONAL_FIELDS}
        return recipe_hash(from_dict(DataConfig, s["data"], "data")), ex.config_hash(train)

    monkeypatch.delenv(overrides.OVERRIDES_ENV, raising=False)
    data0, train0 = keys()
    monkeypatch.setenv(overrides.OVERRIDES_ENV, json.dumps({"train.epochs": 7}))
    data1, train1 = keys()
    assert data1 == data0 and train1 != train0  # retrain, reuse the dataset
    monkeypatch.setenv(overrides.OVERRIDES_ENV, json.dumps({"data.counts_range": [1e5, 1e6]}))
    data2, train2 = keys()
    assert data2 != data0 and train2 == train0
    # a named run's own overrides win over the reader's (the "original" run is a shared network)
    monkeypatch.setenv(overrides.OVERRIDES_ENV, json.dumps({"model.shared": False, "model.width": 4}))
    s = ex.load_profile("smoke", ex.NAMED_RUNS["original"][1])
    assert s["model"]["shared"] is True and s["model"]["width"] == 4
    monkeypatch.setenv(overrides.OVERRIDES_ENV, "{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ex.load_profile("smoke")


def test_parameters_table_lists_the_overrides(monkeypatch):
    monkeypatch.setenv(overrides.OVERRIDES_ENV, json.dumps({"model.width": 32}))
    p = profiles.profile_params({"n": {"smoke": 8, "cpu": 64, "paper": 172}}, "smoke", {"n": None})
    assert dict(p) == {"n": 8} and p.profile_overrides == {"model.width": 32}
    assert any(r[0] == "model.width" and r[1] == "32" and r[2].startswith("override") for r in p._rows())
    assert "<code>model.width</code></td><td><code>32</code></td><td>override" in p._repr_html_()


def test_own_profile_yaml(tmp_path, monkeypatch, no_env_overrides):
    path = _smoke_copy(tmp_path, num_iterations=3)
    monkeypatch.chdir(tmp_path)
    assert profiles.resolve_profile("my.yaml") == str(path.resolve())
    assert profiles.base_profile(str(path)) == "smoke"
    assert ex.load_profile(str(path))["data"]["num_iterations"] == 3
    p = profiles.profile_params({"n": {"smoke": 8, "cpu": 64}}, "my.yaml", {"n": None})
    assert p.n == 8 and p.profile == str(path.resolve())
    assert "chapter defaults of smoke" in repr(p)
    assert memory.memory_3d_kwargs(str(path)) == memory.memory_3d_kwargs("smoke")
    with pytest.raises(ValueError, match="does not exist"):
        profiles.resolve_profile("missing.yaml")
    with pytest.raises(ValueError, match="unknown profile 'gpu'"):
        profiles.resolve_profile("gpu")


OWN_PROFILE_CHAPTER = myst_chapter(
    "Knobs", "from fbsembook import experiments as ex\nfrom fbsembook.profiles import profile_params", "n = None",
    'p = profile_params({"n": {"smoke": 1, "cpu": 2, "paper": 3}}, profile, globals())\np',
    's = ex.load_profile(profile)\nprint("K =", s["data"]["num_iterations"] * s["data"]["num_subsets"], "epochs =", '
    's["train"]["epochs"], "n =", p.n)')


def test_chapter_runs_with_own_profile_and_overrides(tmp_path):
    """`fbsem book run --profile my.yaml -p train.epochs 5`: the chapter sees the file's K and
    the override, lists the override in its table; a misspelt override is exit 2, nothing run."""
    root = tmp_path / "b"
    (root / "book").mkdir(parents=True)
    for f in ("_config.yml",):
        (root / f).write_text((REPO / f).read_text())
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/_executed/01_knobs\n")
    (root / "book" / "01_knobs.md").write_text(OWN_PROFILE_CHAPTER)
    own = _smoke_copy(root, num_iterations=3)
    env = {k: v for k, v in os.environ.items() if k not in (profiles.PROFILE_ENV, overrides.OVERRIDES_ENV)}

    def fbsem(*args):
        return subprocess.run([*FBSEM, *args], cwd=root, env=env, text=True, timeout=300,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    bad = fbsem("book", "run", "1", "--profile", "my.yaml", "-p", "train.epohcs", "5")
    assert bad.returncode == 2 and "did you mean 'epochs'?" in bad.stdout, bad.stdout
    assert not (root / "book" / "_executed" / "01_knobs.ipynb").exists()

    proc = fbsem("book", "run", "1", "--profile", "my.yaml", "-p", "train.epochs", "5")
    assert proc.returncode == 0, proc.stdout[-4000:]
    nb = nbformat.read(root / "book" / "_executed" / "01_knobs.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    out = "".join(o.get("text", "") for o in code[-1].outputs)
    assert out.strip() == "K = 12 epochs = 5 n = 1"  # 3 iterations x 4 subsets; smoke's chapter defaults
    html = next(o["data"]["text/html"] for c in code for o in c.outputs if "text/html" in o.get("data", {}))
    assert "<code>train.epochs</code></td><td><code>5</code></td><td>override" in html
    assert "chapter defaults of smoke" in html
    meta = nb.metadata["fbsem"]
    assert meta["profile"] == str(own.resolve()) and meta["overrides"] == {"train.epochs": 5}
