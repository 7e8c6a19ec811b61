"""docs.py: how a README block is matched against fresh output (elisions, masked timings), and the
cheap check CI runs on the real README: every command in it parses, its tables agree with RESULTS.md.

Run: python -m pytest tests/test_docs.py -q
"""

import pytest

import docs
from conftest import TINY_TRAIN, tiny_text
from eemini import EEminiError

QUOTED = """Some text.

<!-- output: tiny -->
```
$ python train.py {args}
data: 5,400 chars of /somewhere/tiny.txt [:90%] | 600 chars of /somewhere/tiny.txt [90%:] | vocab 18 | 0 valid chars unseen in train -> unknown id
...
done: 6 steps in 0m00s | best val PPL (full depth) {ppl} | peak memory 999 MiB RSS | saved c.pt
```
"""


def test_excerpt_follows_elisions_and_anchors():
    actual = ["head 1", "head 2", "step 1 | a", "step 2 | b", "step 3 | c", "tail"]
    assert docs.excerpt(["head 1", "...", "step 3 | x", "tail"], actual) == ["head 1", "...", "step 3 | c", "tail"]
    assert docs.excerpt(["head 1", "head 2", "step 1 | a"], actual) == ["head 1", "head 2", *actual[2:]]  # to the end
    assert docs.excerpt(["head 1", "...", "step 9 | x"], actual) is None
    assert docs.excerpt(["head 1", "...", "step 2 | x", "...", ], actual) == ["head 1", "...", "step 2 | b", "..."]


def test_masking_hides_what_changes_between_runs_and_nothing_else():
    a = "step    100/2000 | loss 2.5440 | lr 3.00e-03 |    66.9 ms |    61,258 tok/s | ETA 2m07s"
    b = "step    100/2000 | loss 2.5440 | lr 3.00e-03 |   101.2 ms |    40,001 tok/s | ETA 3m17s"
    assert docs.mask(a) == docs.mask(b) and docs.mask(a) != docs.mask(b.replace("2.5440", "2.5441"))
    assert docs.mask("data: 5 chars of /work/shared/data/wikitext-2/wiki.train.raw") == \
        docs.mask("data: 5 chars of /home/u/data/wikitext-2/wiki.train.raw")


def test_a_block_is_rerun_compared_and_rewritten(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text(tiny_text())
    args = f"--data {tmp_path / 'tiny.txt'} --out c.pt {' '.join(TINY_TRAIN)}"
    readme = tmp_path / "README.md"
    readme.write_text(QUOTED.format(args=args, ppl="1.000"))
    assert docs.main(docs.parse_args(["--readme", str(readme)])) == ["tiny"]  # the quoted PPL is wrong
    assert "README: done: 6 steps" in capsys.readouterr().out
    docs.main(docs.parse_args(["--readme", str(readme), "--write"]))
    text = readme.read_text()
    assert "best val PPL (full depth) 1.000" not in text and "\n...\ndone: 6 steps" in text
    assert docs.main(docs.parse_args(["--readme", str(readme)])) == []  # now it matches


def test_the_readme_commands_parse_and_its_tables_agree_with_results(capsys):
    """What CI checks without training anything."""
    assert docs.main(docs.parse_args(["--cheap"])) == [], capsys.readouterr().out


def test_a_slow_block_keeps_a_checkpoint_trained_before(tmp_path, monkeypatch, capsys):
    """In a slow block, a training whose --out is already beside the README is not run again (it would
    take long); what follows it reads that checkpoint. Anywhere else the training runs."""
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    (tmp_path / "k.pt").write_bytes(b"12345")
    (tmp_path / "size.py").write_text("import os, sys\ndef parse_args(argv):\n    return argv\n"
                                      "if __name__ == '__main__':\n    print(sys.argv[1], os.path.getsize(sys.argv[1]))\n")
    block = "```\n$ python train.py --data nowhere --out k.pt\n...\n$ python size.py k.pt\nk.pt 5\n```\n"
    readme = tmp_path / "README.md"
    readme.write_text("<!-- output: again slow -->\n" + block)
    assert docs.main(docs.parse_args(["--readme", str(readme), "--slow"])) == []
    assert "kept k.pt, trained before" in capsys.readouterr().out
    readme.write_text("<!-- output: again -->\n" + block)
    with pytest.raises(EEminiError, match="train.py --data nowhere --out k.pt` failed"):
        docs.main(docs.parse_args(["--readme", str(readme)]))


@pytest.mark.parametrize("cpu, exact, preset, want", [
    ("AVX512", True, None, "avx2"),  # the README's figures were made with AVX2's kernels
    ("AVX512", False, None, None),  # timings keep the machine's own
    ("AVX2", True, None, None),  # nothing to change
    ("AVX512", True, "default", "default"),  # the caller's choice stands
])
def test_exact_blocks_run_with_avx2_kernels(monkeypatch, cpu, exact, preset, want):
    monkeypatch.setattr(docs.torch.backends.cpu, "get_cpu_capability", lambda: cpu)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    if preset:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", preset)
    assert docs.kernels(exact).get("ATEN_CPU_CAPABILITY") == want
