"""The real-code corpus (issue #12): held-out packages never written, duplicates
dropped, evaluation split by whole packages; and the parse-rate quality measure."""

import json
import textwrap
from pathlib import Path

import pytest

from convert.code_corpus import build, is_eval_package, is_held_out
from convert.code_quality import (
    cut_at_function_end,
    function_headers,
    parse_rate,
    parses,
    sample_prompts,
)

SECRET = "EVALUATION_MATERIAL_{}"


def _tree(tmp_path):
    """A fake interpreter: a standard library and a site-packages with held-out packages."""
    std, site, repo = tmp_path / "lib", tmp_path / "lib" / "site-packages", tmp_path / "repo"
    files = {
        std / "json" / "decoder.py": "def decode(s):\n    return s\n",
        std / "abc.py": "X = 1\n",
        std / "copy_of_abc.py": "X = 1\n",  # a duplicate
        site / "numpy" / "core.py": "def add(a, b):\n    return a + b\n",
        site / "requests" / "api.py": "def get(url):\n    return url\n",
        site / "mlx" / "core.py": SECRET.format("mlx") + " = 1\n",
        site / "mlx_lm" / "generate.py": SECRET.format("mlx_lm") + " = 1\n",
        site / "mlx_specstream" / "decode.py": SECRET.format("ours") + " = 1\n",
        site / "__editable___mlx_specstream_0_1_0_finder.py": SECRET.format("finder") + " = 1\n",
        site / "mlx_lm-0.32.2.dist-info" / "x.py": SECRET.format("dist") + " = 1\n",
        repo / "benchmarks" / "bench.py": SECRET.format("repo") + " = 1\n",
        # A virtual environment inside the repository: its packages are not the repository's.
        repo / ".venv" / "site-packages" / "tqdm" / "std.py": "def trange(n):\n    return n\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # This repository on the path (as an editable install puts it): held out by location.
    roots = [
        ("stdlib", std),
        ("site", site),
        ("site", repo),
        ("site", repo / ".venv" / "site-packages"),
    ]
    return roots, repo


def _texts(out):
    return [
        json.loads(line) for split in ("train", "eval") for line in open(out / f"{split}.jsonl")
    ]


def test_held_out_packages_and_the_repository_are_never_written(tmp_path):
    roots, repo = _tree(tmp_path)
    manifest = build(tmp_path / "corpus", roots, repo=repo, eval_every=2)
    records = _texts(tmp_path / "corpus")
    assert not any("EVALUATION_MATERIAL" in r["text"] for r in records)
    packages = {r["package"] for r in records}
    assert packages == {"json", "abc", "numpy", "requests", "tqdm"}  # copy_of_abc: a duplicate
    assert manifest["files"]["held_out"] == 5
    assert manifest["files"]["duplicates"] == 1
    assert set(manifest["held_out_packages"]) >= {"mlx", "mlx_lm", "mlx_specstream", "benchmarks"}


def test_negative_control_without_the_hold_out_evaluation_material_leaks(tmp_path):
    roots, repo = _tree(tmp_path)
    build(tmp_path / "corpus", roots, held_out=(), repo=None, eval_every=2)
    assert any("EVALUATION_MATERIAL" in r["text"] for r in _texts(tmp_path / "corpus"))


def test_eval_split_takes_whole_packages_and_builds_are_deterministic(tmp_path):
    roots, repo = _tree(tmp_path)
    a = build(tmp_path / "a", roots, repo=repo, eval_every=2)
    b = build(tmp_path / "b", roots, repo=repo, eval_every=2)
    assert a["sha256"] == b["sha256"] and a["eval_packages"]
    split = {}
    for name in ("train", "eval"):
        for line in open(tmp_path / "a" / f"{name}.jsonl"):
            split.setdefault(json.loads(line)["package"], set()).add(name)
    assert all(len(s) == 1 for s in split.values())
    assert {p for p, s in split.items() if s == {"eval"}} == set(a["eval_packages"])
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build(tmp_path / "a", roots, repo=repo)


def test_a_packages_split_does_not_depend_on_the_others(tmp_path):
    """Another machine with one more package installed holds out the same packages."""
    roots, repo = _tree(tmp_path)
    a = build(tmp_path / "a", roots, repo=repo, eval_every=2)
    extra = roots[1][1] / "aaa_extra" / "mod.py"
    extra.parent.mkdir()
    extra.write_text("def f():\n    return 0\n")
    b = build(tmp_path / "b", roots, repo=repo, eval_every=2)
    assert set(b["eval_packages"]) - {"aaa_extra"} == set(a["eval_packages"])
    # The rule is a fixed function of the name: about one package in N.
    names = [f"pkg{i}" for i in range(2000)]
    assert 80 < sum(is_eval_package(n, 20) for n in names) < 120
    assert not any(is_eval_package(n, 0) for n in names)


def test_held_out_names():
    nowhere, held = Path("/nonexistent/x.py"), ("mlx", "mlx_lm", "mlx_specstream")
    for name in ["mlx", "mlx_lm", "mlx_specstream", "MLX-LM", "__editable___mlx_specstream_x"]:
        assert is_held_out(name, nowhere, held, None), name
    for name in ["numpy", "mlxtend", "json"]:
        assert not is_held_out(name, nowhere, held, None), name


SOURCE = textwrap.dedent('''\
    import math


    class Box:
        def __init__(self, w, h):
            self.w, self.h = w, h

        def area(self):
            """The area."""
            return self.w * self.h


    def hyp(a,
            b):
        return math.sqrt(a * a + b * b)


    def one(): return 1
    ''')


def test_headers_prompts_and_the_cut():
    found = {p.header.strip(): p for p in function_headers("box.py", SOURCE)}
    assert set(found) == {"def __init__(self, w, h):", "def area(self):", "def hyp(a,\n        b):"}
    area = found["def area(self):"]
    assert area.indent == 4 and area.prompt.endswith("    def area(self):")
    completion = "\n        return self.w * self.h\n\n    def next(self):\n        pass\n"
    assert cut_at_function_end(completion, 4) == "\n        return self.w * self.h\n"
    assert parses(area, completion)
    assert not parses(area, "\n        return (self.w *\n    x = 1\n")


def test_parse_rate_of_a_perfect_and_a_broken_model(tmp_path):
    eval_jsonl = tmp_path / "eval.jsonl"
    with open(eval_jsonl, "w") as f:
        for i in range(3):
            f.write(json.dumps({"path": f"f{i}.py", "text": SOURCE}) + "\n")
    prompts = sample_prompts(eval_jsonl, n=3, seed=0)
    truth = {p.prompt: SOURCE[len(SOURCE) - len(SOURCE.split(p.header, 1)[1]) :] for p in prompts}
    assert parse_rate(lambda text: truth[text], prompts) == 1.0
    assert parse_rate(lambda text: "\n        return (((\n", prompts) == 0.0  # control
    with pytest.raises(ValueError, match="only 3 files"):
        sample_prompts(eval_jsonl, n=4)
