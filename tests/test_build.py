"""The build (issue #12): recipes meet the issue's sizes, every stage runs once and
is skipped when its output exists, and its small pieces do what they say."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("sentencepiece")

from convert.build_default_model import sample_eval_files  # noqa: E402
from convert.code_quality import function_ended  # noqa: E402
from convert.package_size import flag, llama  # noqa: E402
from convert.pretrain import pack_corpus, tokenize_corpus  # noqa: E402
from convert.recipes import CODE, CODE_CPU, RECIPES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _parameters(recipe_args, vocab):
    """Parameters of the Llama a pretrain stage builds (on the meta device: no memory)."""
    return sum(p.numel() for p in llama(recipe_args, vocab).parameters())


def test_code_recipe_has_the_issues_sizes():
    """Issue #12: BPE 16k-32k, a base of >= 30M parameters trained on >= 300M tokens,
    the control fine-tune, drafters, and the quality figure over 50 prompts."""
    vocab = int(flag(CODE.tokenizer, "--vocab-size"))
    assert 16_000 <= vocab <= 32_000
    assert _parameters(CODE.base, vocab) >= 30e6
    tokens = (
        int(flag(CODE.base, "--max-steps"))
        * int(flag(CODE.base, "--batch-size"))
        * int(flag(CODE.base, "--seq-len"))
    )
    assert tokens >= 300e6
    assert _parameters(CODE.draft, vocab) < _parameters(CODE.base, vocab) / 4
    assert CODE.corpus == "code" and CODE.control and CODE.drafters
    assert CODE.quality_prompts == 50
    assert "--quantize" in CODE.convert  # 32M parameters do not fit the package in bfloat16
    # Off CUDA the same tokens per step, in micro-batches that fit 24 GB.
    micro, accumulate = int(flag(CODE.cpu_args, "--batch-size")), int(
        flag(CODE.cpu_args, "--gradient-accumulation-steps")
    )
    assert micro * accumulate == int(flag(CODE.base, "--batch-size")) == 64


def test_cpu_sibling_is_the_code_recipe_smaller():
    """Issue #12 item 6's smaller sibling: the code recipe's corpus and tokenizer, a
    smaller base and draft, and a package in bfloat16 (base, streams and draft) within
    the shipping limit."""
    vocab = int(flag(CODE.tokenizer, "--vocab-size"))
    assert (CODE_CPU.corpus, CODE_CPU.tokenizer) == (CODE.corpus, CODE.tokenizer)
    base, draft = _parameters(CODE_CPU.base, vocab), _parameters(CODE_CPU.draft, vocab)
    assert draft < base / 2 and base < _parameters(CODE.base, vocab) / 3
    assert CODE_CPU.quality_prompts == 50


def test_every_recipe_s_package_fits_the_tree():
    """What each recipe ships, counted from its architectures before any training
    (convert.package_size), stays within its ship limit, and the limit within the 30 MB
    tree beside the tree's other files. The count matches the shipped package's files;
    control: the code recipe as it stood before session 60 (a 4-bit base, a bfloat16 draft
    model) does not fit."""
    from dataclasses import replace

    from convert.package_size import OTHER_FILES_MB, TREE_MB, shipped_bytes

    for r in RECIPES.values():
        assert shipped_bytes(r)["total"] / 1e6 <= r.ship_limit_mb <= TREE_MB - OTHER_FILES_MB
    models = ROOT / "mlx_specstream" / "models"
    tokenizer = sum((models / "default" / f).stat().st_size
                    for f in ("tokenizer.json", "tokenizer_config.json"))  # fmt: skip
    files = sum(f.stat().st_size for f in models.rglob("*") if f.is_file())
    counted = shipped_bytes(RECIPES["stdlib"], tokenizer)["total"]
    assert 0.99 * files < counted <= files  # (configs and prompts are not counted)
    before = replace(CODE, convert=("--quantize", "--q-bits", "4"), draft_convert=())
    assert shipped_bytes(before)["total"] / 1e6 > 30


def test_every_recipe_names_known_flags():
    """Each recipe's arguments parse with the stage's own parser (a typo fails here,
    not hours into a build)."""
    from convert.finetune import setup_arg_parser

    parser = setup_arg_parser()
    base = ["--model", "m", "--data", "d", "--out", "o"]
    for r in RECIPES.values():
        for mode in (r.ss_shared, r.ss_lossless):
            parser.parse_args(base + list(map(str, r.ss_common + mode + r.cpu_args)))


def test_sample_eval_files_is_evenly_spaced(tmp_path):
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)))
    sample_eval_files(src, tmp_path / "s.jsonl", 4)
    got = [json.loads(line)["text"] for line in open(tmp_path / "s.jsonl")]
    assert got == ["0", "2", "5", "7"]
    with pytest.raises(ValueError, match="fewer than 11"):
        sample_eval_files(src, tmp_path / "t.jsonl", 11)


def test_function_ended():
    assert not function_ended("\n    return 1\n", 0)
    assert not function_ended("\n    return 1\n\n", 0)  # blank lines do not end it
    assert function_ended("\n    return 1\n\ndef g", 0)
    assert not function_ended("\n        x = 1\n    ", 4)  # an unfinished line
    assert function_ended("\n        x = 1\n    def g", 4)


class _Tok:
    """A stand-in fast tokenizer: one token per character, EOS 0."""

    eos_token_id = 0

    def __init__(self):
        self.calls = 0

    def __call__(self, texts, add_special_tokens=False, split_special_tokens=False):
        assert split_special_tokens  # "</s>" in source code is text
        self.calls += 1
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_tokenize_corpus_batches_and_caches(tmp_path):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ab", "c", "de"]))
    tok = _Tok()
    ids = tokenize_corpus(corpus, tok, tmp_path / "tokens.npy", batch=2)
    assert ids.tolist() == [97, 98, 0, 99, 0, 100, 101, 0] and tok.calls == 2
    assert tokenize_corpus(corpus, tok, tmp_path / "tokens.npy").tolist() == ids.tolist()
    assert tok.calls == 2  # read back from the cache, not tokenized again
    np.save(tmp_path / "tokens.npy", np.arange(3, dtype=np.int32))  # the cache is what counts
    assert tokenize_corpus(corpus, tok, tmp_path / "tokens.npy").tolist() == [0, 1, 2]


def test_pack_corpus_rows(tmp_path):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": "x" * 9}) + "\n" for _ in range(4)))
    rows = pack_corpus(corpus, _Tok(), 4)  # 40 tokens
    assert rows.shape == (10, 4) and rows.dtype == torch.long
    assert pack_corpus(corpus, _Tok(), 4, max_rows=3).tolist() == rows[[0, 4, 9]].tolist()
    with pytest.raises(ValueError, match="fewer than one row of --seq-len 64"):
        pack_corpus(corpus, _Tok(), 64)


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    """The whole build at toy sizes (``--recipe smoke``) over 80 small standard-library
    modules, shipped into a temporary directory; about 20 s on 2 cores."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    src.mkdir()
    std = Path(sysconfig.get_paths()["stdlib"])
    small = sorted(std.glob("*.py"), key=lambda p: (p.stat().st_size, p.name))
    for p in [p for p in small if p.stat().st_size > 1500][:80]:
        shutil.copy(p, src / p.name)
    cmd = [
        sys.executable, "-m", "convert.build_default_model", "--recipe", "smoke",
        "--work", str(tmp / "work"), "--root", f"stdlib:{src}",
        "--package-models", str(tmp / "models"), "--no-tune",
    ]  # fmt: skip

    def build():
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    return tmp, build(), build


def _stage_lines(log):
    return [line for line in log.splitlines() if line.startswith(("[stage]", "[skip]"))]


def test_smoke_build_runs_every_stage(smoke_build):
    tmp, log, _ = smoke_build
    work = tmp / "work"
    lines = _stage_lines(log)
    assert lines and all(line.startswith("[stage]") for line in lines[:5])
    times = json.loads((work / "stage_times.json").read_text())
    for name in ("corpus", "tokenizer", "base model", "draft model", "shared-mode fine-tune",
                 "shared-mode control fine-tune", "lossless-mode fine-tune", "medusa drafter",
                 "parallelspec drafter", "quality", "choice.json", "ship"):  # fmt: skip
        assert name in times, name
    choice = json.loads((work / "choice.json").read_text())
    assert choice["recipe"] == "smoke" and choice["shipped"] in ("shared", "lossless")
    assert set(choice["shared_vs_control"]) == {"shared", "control", "difference"}
    quality = json.loads((work / "quality.json").read_text())
    assert quality["prompts"] == 2 and 0 <= quality["parse_rate"] <= 1
    base = json.loads((work / "base" / "metrics.json").read_text())
    assert base["train_tokens"] == 4 * 4 * 64 and base["eval_loss"] > 0
    assert (work / "base" / "tokens-train.npy").exists()  # tokenized once, cached
    # What shipped is a model directory the package loads and decodes losslessly.
    from helpers import spec_tokens

    from mlx_specstream import load

    model, _ = load(str(tmp / "models" / "default"))
    assert (
        spec_tokens(model, [5, 6, 7], 12)[0]
        == spec_tokens(model, [5, 6, 7], 12, speculative=False)[0]
    )


def test_smoke_build_skips_every_stage_when_done_and_resumes_one(smoke_build):
    tmp, first, build = smoke_build
    work = tmp / "work"
    times = (work / "stage_times.json").read_text()
    again = build()
    lines = _stage_lines(again)
    assert len(lines) == len(_stage_lines(first))
    assert all(line.startswith("[skip]") for line in lines), lines
    assert "\n+ " not in again  # no command ran
    assert (work / "stage_times.json").read_text() == times
    # An interrupted stage (its output missing) runs again, and only it.
    shutil.rmtree(work / "ss-control")
    resumed = _stage_lines(build())
    assert [line for line in resumed if line.startswith("[stage]")] == [
        "[stage] shared-mode control fine-tune"
    ]


def test_stop_after_a_stage(smoke_build):
    tmp, _, _ = smoke_build
    cmd = [sys.executable, "-m", "convert.build_default_model", "--recipe", "smoke",
           "--work", str(tmp / "work"), "--no-tune",
           "--package-models", str(tmp / "models")]  # fmt: skip
    done = subprocess.run(cmd + ["--stop-after", "base model"], cwd=ROOT, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert _stage_lines(done.stdout)[-1].startswith("[skip] base model")
    assert "stopped after stage base model" in done.stdout
    wrong = subprocess.run(cmd + ["--stop-after", "no such stage"], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
    assert wrong.returncode != 0 and "no stage of that name" in wrong.stderr


def test_time_limit_stops_training_and_says_so(smoke_build, tmp_path):
    """A run cut short by --time-limit still writes its model, and its metrics say so;
    the smoke build's base (no limit) ran every step."""
    from convert.recipes import SMOKE

    work = smoke_build[0] / "work"
    args = list(SMOKE.base)
    args[args.index("--max-steps") + 1] = "50"
    cmd = [sys.executable, "-m", "convert.pretrain", "--corpus", str(work / "corpus"),
           "--tokenizer", str(work / "tokenizer"), "--out", str(tmp_path / "base"), *args,
           "--time-limit", "0.0001"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
    cut = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert cut["stopped_at_time_limit"] and cut["steps"] < 50
    assert (tmp_path / "base" / "model" / "model.safetensors").exists()
    full = json.loads((work / "base" / "metrics.json").read_text())
    assert not full["stopped_at_time_limit"] and full["steps"] == full["max_steps"] == 4


def _tensors(d):
    from safetensors.torch import load_file

    return {
        k: v for f in sorted(d.glob("model*.safetensors")) for k, v in load_file(str(f)).items()
    }


def test_carry_to_a_machine_that_kept_nothing(smoke_build, tmp_path):
    """A build's working directory collected into small parts, restored elsewhere, and
    resumed there: only what every machine rebuilds (corpus, MLX conversions) runs."""
    from convert.carry import FROM_BASE, collect, restore

    tmp, _, _ = smoke_build
    work = tmp / "work"
    written = collect(work, tmp_path / "out", part_mb=0.2)
    assert {"top", "base", "tokenizer", "ss-lossless", "distilled", "medusa"} <= set(written)
    assert "corpus" not in written and "mlx" not in written
    parts = list((tmp_path / "out").glob("*/*.part*"))
    assert all(p.stat().st_size <= 200_000 for p in parts)
    # The base travels as its 8-bit pack, a frozen base's copy not at all.
    assert sum(p.stat().st_size for p in parts) < 0.5 * sum(
        f.stat().st_size for f in work.rglob("*.safetensors")
    )
    there = tmp_path / "there"
    restore(tmp_path / "out", there)
    assert (there / "ss-lossless" / FROM_BASE).exists()
    for d in ("base/model", "draft/model", "ss-lossless", "ss-shared", "medusa"):
        a, b = _tensors(work / d), _tensors(there / d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d
    src = next(iter(json.loads((work / "corpus" / "manifest.json").read_text())["roots"]))
    cmd = [sys.executable, "-m", "convert.build_default_model", "--recipe", "smoke",
           "--work", str(there), "--root", src, "--no-tune",
           "--package-models", str(tmp / "models")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ran = [line for line in _stage_lines(done.stdout) if line.startswith("[stage]")]
    assert ran == ["[stage] corpus", "[stage] held-out sample"] + [
        f"[stage] convert {m}" for m in ("shared", "lossless", "draft", "medusa", "parallelspec")
    ]
    # Every stage that trains (PyTorch alone) comes before the first that needs MLX.
    order = [line.split("] ", 1)[1].split(":")[0] for line in _stage_lines(done.stdout)]
    assert order.index("parallelspec drafter") < order.index("convert shared")


def test_a_later_session_trains_on_the_base_the_package_shipped(smoke_build, tmp_path):
    """Only the committed tree outlives a session: the next one restores the base and its
    tokenizer from the shipped package (``convert.from_package``) and trains there. The
    restored base is the package's weights, and a draft model and a fine-tune train from it."""
    tmp, _, _ = smoke_build
    package, work = tmp / "models" / "default", tmp_path / "work"
    done = subprocess.run([sys.executable, "-m", "convert.from_package", str(package), str(work)],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    restored, shipped = _tensors(work / "base" / "model"), _tensors(package)
    assert restored.keys() == shipped.keys()
    assert all(torch.equal(restored[k], shipped[k]) for k in shipped)
    src = next(iter(json.loads((tmp / "work" / "corpus" / "manifest.json").read_text())["roots"]))
    stages = "corpus,held-out sample,draft model,shared-mode fine-tune"
    cmd = [sys.executable, "-m", "convert.build_default_model", "--recipe", "smoke",
           "--work", str(work), "--root", src, "--no-tune", "--only", stages]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ran = [line for line in _stage_lines(done.stdout) if line.startswith("[stage]")]
    assert ran == [f"[stage] {s}" for s in stages.split(",")]
    draft = json.loads((work / "draft" / "model" / "config.json").read_text())
    assert draft["vocab_size"] == json.loads((package / "config.json").read_text())["vocab_size"]
    assert (work / "ss-shared" / "adapter" / "adapter_model.safetensors").exists()


def test_a_frozen_base_restored_from_a_package_converts_with_its_tensors(tmp_path):
    """Where the base came from a quantized package, the lossless streams and drafters
    convert with that package's tensors (``--quantized-like``) instead of quantizing anew;
    elsewhere (a base trained here, an unquantized recipe) with the recipe's arguments."""
    from convert.build_default_model import frozen_base_convert

    assert frozen_base_convert(tmp_path, CODE) == CODE.convert
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "from-package.json").write_text(json.dumps({"from": "/pkg"}))
    assert frozen_base_convert(tmp_path, CODE) == ("--dtype", "bfloat16", "--quantized-like",
                                                   "/pkg")  # fmt: skip
    assert frozen_base_convert(tmp_path, RECIPES["smoke"]) == RECIPES["smoke"].convert


def test_a_different_corpus_is_refused_after_carrying(smoke_build, tmp_path):
    from convert.carry import collect, restore

    tmp, _, _ = smoke_build
    collect(tmp / "work", tmp_path / "out", items=["top", "tokenizer"])
    restore(tmp_path / "out", tmp_path / "there")
    src = tmp_path / "src"
    shutil.copytree(tmp / "src", src)
    next(src.glob("*.py")).unlink()  # another machine's sources
    cmd = [sys.executable, "-m", "convert.build_default_model", "--recipe", "smoke",
           "--work", str(tmp_path / "there"), "--root", f"stdlib:{src}",
           "--stop-after", "tokenizer"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "differs from" in done.stderr
    # Negative control: the same sources pass the check.
    shutil.rmtree(tmp_path / "there" / "corpus")
    cmd[cmd.index(f"stdlib:{src}")] = f"stdlib:{tmp / 'src'}"
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)


def test_carry_damage_is_named(smoke_build, tmp_path):
    from convert.carry import collect, restore

    collect(smoke_build[0] / "work", tmp_path / "out", items=["tokenizer"], part_mb=0.2)
    part = sorted((tmp_path / "out" / "tokenizer").glob("tokenizer.tar.xz.part*"))[0]
    part.write_bytes(part.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="sha256 differs"):
        restore(tmp_path / "out", tmp_path / "w")
    part.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        restore(tmp_path / "out", tmp_path / "w")


# benchmarks/gpu_build.sh's plan: (stages, items it brings back, items it carries in).
GPU_PLAN = [
    ("tokenizer", "top,tokenizer", []),
    ("base model,base round trip", "top,base", ["tokenizer"]),
    (
        "draft model,draft round trip,self-distilled train data,self-distilled eval data",
        "top,draft,distilled",
        ["base", "tokenizer"],
    ),
    ("shared-mode fine-tune", "top,ss-shared", ["base", "tokenizer"]),
    (
        "lossless-mode fine-tune,shared-mode control fine-tune",
        "top,ss-lossless,ss-control",
        ["base", "tokenizer", "distilled"],
    ),
    ("medusa drafter,parallelspec drafter", "top,medusa,parallelspec", ["base", "distilled"]),
]


def test_gpu_build_plan_on_machines_that_keep_nothing(smoke_build, tmp_path):
    """benchmarks/gpu_build.sh's planned runs, each on a fresh working directory that
    gets only the items the plan carries in, make the same models as one local build."""
    tmp, _, _ = smoke_build
    src = json.loads((tmp / "work" / "corpus" / "manifest.json").read_text())["roots"][0]
    returned = {}  # item -> folder, the latest run's
    for n, (stages, items, needs) in enumerate(GPU_PLAN):
        carried = tmp_path / f"carry{n}"
        carried.mkdir()
        for item in needs + (["top"] if n else []):
            shutil.copytree(returned[item], carried / item)
        env = {**__import__("os").environ, "OUT": str(tmp_path / f"out{n}"), "RECIPE": "smoke",
               "WORK": str(tmp_path / f"machine{n}" / "work"), "CARRIED": str(carried),
               "PYTHON": sys.executable, "BUILD_ARGS": f"--root {src}"}  # fmt: skip
        done = subprocess.run(["bash", "benchmarks/gpu_build.sh", stages, "5", items], cwd=ROOT,
                              env=env, capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        for item in items.split(","):
            returned[item] = tmp_path / f"out{n}" / item
        assert len(list((tmp_path / f"out{n}").rglob("*"))) <= 8 + len(items.split(","))
    # Everything on one last machine: the same tensors as the local build made.
    final = tmp_path / "final"
    for item, folder in returned.items():
        shutil.copytree(folder, tmp_path / "all" / item)
    from convert.carry import restore

    restore(tmp_path / "all", final)
    for d in ("base/model", "draft/model", "ss-lossless", "ss-control", "medusa"):
        a, b = _tensors(tmp / "work" / d), _tensors(final / d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d
    from safetensors.torch import load_file

    for f in ("ss-lossless/speculative_streams.safetensors", "parallelspec/drafter.safetensors",
              "ss-shared/adapter/adapter_model.safetensors"):  # fmt: skip
        a, b = load_file(str(tmp / "work" / f)), load_file(str(final / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    times = json.loads((final / "stage_times.json").read_text())
    assert {"base model", "shared-mode fine-tune", "parallelspec drafter"} <= set(times)


def test_training_stages_import_without_mlx():
    """The GPU machine has PyTorch but not MLX until three install runs: every module
    of a training stage (runs 1-5 of benchmarks/gpu_build.sh) must import without it."""
    code = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('mlx', 'mlx_lm'):\n"
        "            raise ImportError('no ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "for m in sys.argv[1:]:\n"
        "    importlib.import_module(m)\n"
    )
    modules = ["convert.build_default_model", "convert.code_corpus", "convert.tokenizer",
               "convert.pretrain", "convert.distill", "convert.finetune", "convert.train_drafter",
               "convert.carry", "convert.transport", "convert.from_package",
               "convert.package_size"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # Negative control: a module that needs MLX fails under the same block.
    bad = subprocess.run([sys.executable, "-c", code, "convert.convert"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "no mlx" in bad.stderr


def test_round_trip_recovers_from_an_interrupted_one(tmp_path):
    """Leftovers of an interrupted round trip (a partial pack, a stale trained copy) are
    replaced; the trained weights end in model-trained, their round trip in model."""
    from hf_helpers import hf_model, hf_tokenizer

    from convert.build_default_model import round_trip

    hf_model("llama", vocab_size=256).save_pretrained(str(tmp_path / "model"))
    hf_tokenizer(256).save_pretrained(str(tmp_path / "model"))
    trained = _tensors(tmp_path / "model")
    (tmp_path / "transport.tmp").mkdir()
    (tmp_path / "transport.tmp" / "partial").write_text("")
    (tmp_path / "model-trained").mkdir()  # stale
    round_trip(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-trained", "transport"]
    kept = _tensors(tmp_path / "model-trained")
    assert all(torch.equal(kept[k], trained[k]) for k in trained)
    rt = _tensors(tmp_path / "model")
    assert any(not torch.equal(rt[k], trained[k].float()) for k in trained)  # 8-bit, lossy


def test_shipping_sets_the_draft_settings_of_untuned_devices(tmp_path):
    """``ship`` gives the shipped model the recipe's draft settings for devices no
    tuner measured (the stdlib recipe: a chain of 3); a bad setting is refused by
    name and leaves the file as it was; tuned entries stay."""
    from convert.build_default_model import set_untuned_tree
    from convert.recipes import STDLIB
    from mlx_specstream.config import SpecStreamConfig

    tuned = {"cpu:Linux-x86_64": {"tree_depth": 0}}
    section = SpecStreamConfig(tuned=tuned).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"speculative_streaming": section}))
    set_untuned_tree(tmp_path, STDLIB.untuned_tree)
    saved = json.loads((tmp_path / "config.json").read_text())["speculative_streaming"]
    assert (saved["top_k"], saved["max_tree_nodes"], saved["tuned"]) == (1, 4, tuned)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="max_tree_nodes=0"):
        set_untuned_tree(tmp_path, {"max_tree_nodes": 0})
    with pytest.raises(ValueError, match="Unknown key.*'treedepth'"):
        set_untuned_tree(tmp_path, {"treedepth": 1})
    assert (tmp_path / "config.json").read_text() == before


def test_a_stage_runs_as_python_m_and_its_failures_raise(tmp_path, capfd):
    """``run`` starts each stage as ``python -m`` would (forked from a server process that
    imported the training libraries once): the module runs as ``__main__`` with its
    arguments, and its exit status is the stage's (argparse's 2, an import's 1)."""
    from convert.build_default_model import run

    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    run("json.tool", good, "--compact")
    assert '{"a":[1,2]}' in capfd.readouterr().out
    with pytest.raises(subprocess.CalledProcessError) as bad:
        run("json.tool", "--no-such-flag")
    assert bad.value.returncode == 2 and "--no-such-flag" in capfd.readouterr().err
    with pytest.raises(subprocess.CalledProcessError) as missing:
        run("convert.no_such_stage")
    assert missing.value.returncode == 1 and "no_such_stage" in capfd.readouterr().err
