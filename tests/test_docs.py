"""The docs stay true: the CLI reference equals the parser, every relative link and anchor
resolves, and the library guide's examples run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _has_embedded

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md",
                *(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "papers").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter: the parser as a user's `qalign` builds it, without the
    methods other tests register in this process."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_reference_is_the_parser():
    done = fresh_python("from recipes.cli_reference import main; main(['--check', 'docs/cli.md'])")
    assert done.returncode == 0, done.stderr[-2000:]


def test_cli_reference_documents_every_flag_of_every_command():
    done = fresh_python("""
import argparse, json
from recipes.cli import build_parser
sub = next(a for a in build_parser()._actions if a.dest == "command")
print(json.dumps({name: [f for a in p._actions if not isinstance(a, argparse._HelpAction)
                         for f in a.option_strings] for name, p in sub.choices.items()}))
""")
    assert done.returncode == 0, done.stderr[-2000:]
    page = (ROOT / "docs" / "cli.md").read_text()
    for name, flags in json.loads(done.stdout).items():
        assert f"### `qalign {name}`" in page
        missing = [f for f in flags if f"`{f}`" not in page]
        assert not missing, f"qalign {name}: {missing} are not in docs/cli.md"


def test_the_check_fails_on_a_stale_page(tmp_path):
    stale = tmp_path / "cli.md"
    stale.write_text((ROOT / "docs" / "cli.md").read_text().replace("`--spec`", "`--spek`"))
    done = fresh_python("from recipes.cli_reference import main; "
                        f"main(['--check', {str(stale)!r}])")
    assert done.returncode == 1
    assert "is out of date: run python -m recipes.cli_reference" in done.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not a link
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_plugin_example_is_the_shipped_file():
    shipped = (ROOT / "recipes" / "examples" / "diag_clip.py").read_text()
    assert shipped in python_blocks(ROOT / "docs" / "library.md")


def test_the_plugin_example_registers_and_beats_rtn_on_its_own_objective(tmp_path):
    """The guide's method file, as written, in a fresh interpreter (a name registers once per
    process): it loads as a plug-in, runs through the block-by-block driver on a tiny model, and
    its calibration-weighted error is at most RTN's (shrink factor 1 is RTN's own range)."""
    block = next(b for b in python_blocks(ROOT / "docs" / "library.md") if "diag-clip" in b)
    method_file = tmp_path / "my_method.py"
    method_file.write_text(block)
    script = f"""
import json, torch, ptq
from compare.models import tiny_model
from ptq.formats import sum_blocks
ptq.registry.load_plugin({str(method_file)!r})
m = ptq.get_method("diag-clip")
spec = ptq.parse_spec("int3-g16")
g = torch.Generator().manual_seed(0)
W = torch.randn(32, 64, generator=g)
X = torch.randn(256, 8, generator=g) @ torch.randn(8, 64, generator=g)  # correlated inputs
X = X + 0.1 * torch.randn(256, 64, generator=g)
H = 2 / 256 * X.T @ X
d = H.diagonal()
res = m.fn(W, ptq.LayerStats(H=H), spec, m.options())
rtn = ptq.fake_quantize(W, spec)
err = lambda Wq: float(sum_blocks((Wq - W) ** 2 * d, spec).sum())
model = tiny_model("llama", vocab_size=256)
calib = torch.randint(0, 256, (4, 32), generator=g)
out = ptq.quantize_model(model, spec, "diag-clip", calib=calib, progress=False)
print(json.dumps({{"diag": err(res.weight), "rtn": err(rtn), "layers": len(out.layers),
                  "linears": len(list(ptq.quantizable_linears(model)))}}))
"""
    done = fresh_python(script)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["diag"] < got["rtn"]  # strictly: on a correlated H some block shrinks
    assert got["layers"] == got["linears"] > 0  # every linear of every block went through it


@pytest.mark.real
@pytest.mark.skipif(not _has_embedded(), reason="embedded model not installed")
def test_the_library_tour_runs_as_written(tmp_path, monkeypatch):
    """The tour on the embedded model, in a scratch folder (it saves runs/gptq-int3)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks(ROOT / "docs" / "library.md"):
        if "diag-clip" not in block:  # the method file runs in its own test
            exec(compile(block, "docs/library.md", "exec"), namespace)
    fp, gptq = namespace["fp"].perplexity, namespace["gptq"].perplexity
    assert fp < gptq < 3 * fp  # int3-g64 GPTQ costs perplexity, but far from a collapse
    assert (tmp_path / "runs" / "gptq-int3" / "qalign.safetensors").is_file()
    assert namespace["res"]["local_fp_mean"] > 0  # the QAFT solution is off the FP weights
