"""A code-quality figure a user understands: the share of held-out function headers
whose greedy completion, cut at the function's end, parses as Python.

Prompts come from held-out files (``eval.jsonl`` of :mod:`convert.code_corpus`):
for each chosen function, the prompt is the file's text up to the end of the
function's header (its ``def`` line or lines, through the colon), at most
``context_chars`` of it. A completion is cut where the function ends: at the
first non-blank line indented no deeper than the ``def`` (the next statement
of the enclosing block). The header plus the cut body, dedented, must then
pass ``ast.parse``.

Example: for the header ``    def area(self):`` the completion
``"\\n        return self.w * self.h\\n\\n    def next(self):\\n"`` is cut to
``"\\n        return self.w * self.h\\n"``, and
``"def area(self):\\n    return self.w * self.h\\n"`` parses.
"""

import ast
import json
import random
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Sequence


@dataclass
class HeaderPrompt:
    path: str
    prompt: str  # the file's text through the header's colon (its tail)
    header: str  # the def line(s), as in the file
    indent: int  # columns of indentation of the def


def _header_end(node: ast.FunctionDef) -> int:
    """0-based index of the header's last line: the line before the body's first one."""
    return node.body[0].lineno - 2


def function_headers(path: str, text: str, context_chars: int = 1000) -> List[HeaderPrompt]:
    """Every function of ``text`` whose body starts on a line after its header."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.body[0].lineno <= node.lineno:
            continue  # one-line functions have no body to complete
        first, last = node.lineno - 1, _header_end(node)
        header = "".join(lines[first : last + 1]).rstrip("\n")
        if not header.rstrip().endswith(":"):
            continue  # a comment after the colon: skip rather than guess
        prefix = "".join(lines[:first]) + header
        indent = len(lines[first]) - len(lines[first].lstrip())
        out.append(HeaderPrompt(path, prefix[-context_chars:], header, indent))
    return out


def sample_prompts(eval_jsonl: Path, n: int = 50, seed: int = 0, **kwargs) -> List[HeaderPrompt]:
    """``n`` header prompts drawn (seeded) from held-out files, at most one per file."""
    per_file = []
    for line in open(eval_jsonl):
        record = json.loads(line)
        found = function_headers(record["path"], record["text"], **kwargs)
        if found:
            per_file.append(found)
    rng = random.Random(seed)
    rng.shuffle(per_file)
    if len(per_file) < n:
        raise ValueError(f"{eval_jsonl}: only {len(per_file)} files with functions; need {n}.")
    return [rng.choice(found) for found in per_file[:n]]


def _ends_function(line: str, indent: int) -> bool:
    """A non-blank line indented no deeper than the ``def`` (``indent`` columns)."""
    return bool(line.strip()) and len(line) - len(line.lstrip()) <= indent


def cut_at_function_end(completion: str, indent: int) -> str:
    """The completion up to the first non-blank line indented ``<= indent`` columns."""
    lines = completion.split("\n")
    kept = [lines[0]]  # the rest of the header's line (normally empty)
    for line in lines[1:]:
        if _ends_function(line, indent):
            break
        kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def parses(prompt: HeaderPrompt, completion: str) -> bool:
    """Whether the header and the completion cut at the function's end parse."""
    source = textwrap.dedent(prompt.header + cut_at_function_end(completion, prompt.indent))
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def parse_rate(complete: Callable[[str], str], prompts: Sequence[HeaderPrompt]) -> float:
    """Share of ``prompts`` whose completion by ``complete(prompt_text)`` parses."""
    return sum(parses(p, complete(p.prompt)) for p in prompts) / len(prompts)


def function_ended(completion: str, indent: int) -> bool:
    """Whether ``completion`` already holds a line that ends the function (see
    :func:`cut_at_function_end`), so generating further cannot change the cut."""
    return any(_ends_function(line, indent) for line in completion.split("\n")[1:])


def evaluate_model(
    model_dir: str, eval_jsonl: Path, n: int = 50, max_tokens: int = 256, seed: int = 0
) -> dict:
    """Greedy completions by mlx-lm (plain decoding) of ``n`` held-out headers: the
    share that parses, and every prompt's header and cut completion."""
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(model_dir))
    prompts = sample_prompts(Path(eval_jsonl), n=n, seed=seed)
    records = []
    for p in prompts:
        text = ""
        for r in stream_generate(model, tokenizer, p.prompt, max_tokens=max_tokens):
            text += r.text
            if function_ended(text, p.indent):
                break
        records.append(
            {
                "path": p.path,
                "header": p.header,
                "completion": cut_at_function_end(text, p.indent),
                "parses": parses(p, text),
            }
        )
    rate = sum(r["parses"] for r in records) / len(records)
    return {"model": str(model_dir), "prompts": n, "max_tokens": max_tokens, "parse_rate": rate,
            "records": records}  # fmt: skip


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="MLX or HF model directory (mlx-lm loads it)")
    p.add_argument("--eval-data", required=True, help="eval.jsonl of convert.code_corpus")
    p.add_argument("--num-prompts", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Write the figures and completions to this JSON")
    args = p.parse_args(argv)
    result = evaluate_model(
        args.model, args.eval_data, args.num_prompts, args.max_tokens, args.seed
    )
    print(f"{result['parse_rate']:.0%} of {args.num_prompts} held-out function headers: "
          "the greedy completion, cut at the function's end, parses")  # fmt: skip
    if args.out:
        out = Path(args.out)
        if out.exists():
            raise FileExistsError(f"{out} exists; refusing to overwrite it.")
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
