"""The throughput benchmark harness (``benchmarks.throughput``): it runs end to end and produces its table.

Only the harness is tested, never the speed: its ``--quick`` setup trains a tiny model for a few steps with each
recipe, once per test session (the ``tiny_gpu_check`` fixture, which runs it inside the GPU check).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import torch

from benchmarks import throughput as bench


def test_quick_bench_runs_all_three_recipes_end_to_end(tiny_gpu_check):
    """The three recipes, trained for real on the ``--quick`` setup (the GPU check's tiny run: the same
    ``run_bench(QUICK)``, see tests/unit/conftest.py): every ratio and figure the table is made of."""
    result = tiny_gpu_check.result["bench"]
    assert result["setup"] == asdict(bench.QUICK)
    summary = result["summary"]
    assert set(summary) == set(bench.RECIPES)
    for metric in bench.METRICS:
        assert summary["reference"][metric]["ratio_median"] == 1.0
        for recipe in bench.RECIPES:
            assert summary[recipe][metric]["median"] > 0
    # One process: nothing all-reduced, no time in communication; a full fine-tune would all-reduce the base.
    for recipe in bench.RECIPES:
        assert summary[recipe]["sync_bytes"] == 0 and summary[recipe]["comm_s"] == 0.0
        assert summary[recipe]["full_bytes"] == summary["reference"]["full_bytes"] > 0
    # Packing leaves less padding than batches padded to their longest example.
    assert summary["qlora_dist_packed"]["pad_fraction"] < summary["reference"]["pad_fraction"]


def test_quick_command_line_prints_the_table_and_writes_the_results(tiny_gpu_check, tmp_path, monkeypatch, capsys):
    """``python -m benchmarks.throughput --quick``: the setup it asks for, the table it prints and the JSON it
    writes, from the real results of the run above (training the recipes again would prove nothing more)."""
    recorded = tiny_gpu_check.result["bench"]
    asked = []

    def run_bench(setup, work, data):
        asked.append((setup, work, data))
        return recorded

    monkeypatch.setattr(bench, "run_bench", run_bench)
    results = tmp_path / "results.json"
    assert bench.main(["--quick", "--work", str(tmp_path), "--json", str(results)]) == 0
    assert asked == [(bench.QUICK, tmp_path, bench.DEFAULT_DATA)]
    out = capsys.readouterr().out
    table = out[out.index("recipe") :].splitlines()
    assert [line.split("  ")[0] for line in table[1:4]] == [bench.LABELS[r] for r in bench.RECIPES]
    assert table[1].count("1.00 [1.00-1.00]") == 3, "(a) is the reference: every ratio of its row is 1"
    assert "targets: (b) no slower than (a)" in out
    assert json.loads(results.read_text())["summary"] == recorded["summary"]
    assert not (tmp_path / "BENCHMARKS.md").exists()  # --quick writes no section unless asked


def _result() -> dict:
    raw = [
        {
            "reference": {"step_s": 2.0, "tokens_per_s": 100.0, "peak_mem": 2**30, "pad_fraction": 0.3},
            "qlora_dist": {"step_s": 1.8, "tokens_per_s": 111.0, "peak_mem": 2**30, "pad_fraction": 0.3},
            "qlora_dist_packed": {"step_s": 5.0, "tokens_per_s": 160.0, "peak_mem": 2**31, "pad_fraction": 0.05},
        }
    ]
    for r in raw:
        for v in r.values():
            v["tokens_per_step"] = v["tokens_per_s"] * v["step_s"]
            v.update(sync_bytes=256 * 1024, full_bytes=2 * 2**20, comm_s=0.05)
    return {"setup": vars(bench.Setup()).copy(), "raw": raw, "summary": bench.summarize(raw), "wall_s": 60.0}


def test_summary_ratios_and_targets():
    summary = _result()["summary"]
    assert summary["qlora_dist"]["step_s"]["ratio_median"] == 0.9
    assert summary["qlora_dist_packed"]["tokens_per_s"]["ratio_median"] == 1.6
    assert bench.targets(summary) == {"b_not_slower": True, "c_tokens_1_5x": True}
    text = bench.format_table(summary, markdown=True)
    throughput, comm = text.split("\n\n")
    assert throughput.count("\n") == 4 and "0.90 [0.90-0.90] (1.80 s)" in throughput
    # Communication: LoRA bytes against a full fine-tune's, and time in flight as a share of the step.
    assert comm.count("\n") == 4
    assert "| (b) qlora_dist | 256.00 KiB (1/8 of full) | 2.00 MiB | 50.0 ms (2.8% of the step) |" in comm


def test_markdown_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    bench.write_section(path, "## Training throughput\n\nOLD-CONTENT\n")
    assert path.read_text() == "# Benchmarks\n\n## Training throughput\n\nOLD-CONTENT\n"
    path.write_text(path.read_text() + "\n## Merge\n\nmerge numbers\n")
    section = bench.markdown_section(_result(), "python -m benchmarks.throughput")
    bench.write_section(path, section)
    text = path.read_text()
    assert "OLD-CONTENT" not in text and text.count("## Training throughput") == 1
    assert text.endswith("## Merge\n\nmerge numbers\n"), "the other engineer's section is untouched"
    assert "ratios from one invocation" in text and "**met**" in text

    # A run at another micro-batch size keeps a section of its own beside the default one.
    other = {**_result(), "setup": {**vars(bench.Setup()), "micro_batch_size": 8}}
    bench.write_section(path, bench.markdown_section(other, "python -m benchmarks.throughput --micro-batch-size 8"))
    text = path.read_text()
    assert text.count("## Training throughput\n") == 1 and text.count("## Training throughput, 8 rows per process") == 1
    # The CPU note, once, in the default section.
    note = 0 if torch.cuda.is_available() else 1
    assert text.split("## Training throughput, 8 rows")[0].count("Reading these numbers") == note


def test_a_partial_rerun_replaces_only_its_own_tables(tmp_path):
    """``benchmarks.memory --only wait`` rewrites the rank-wait table and the section's header, and keeps the
    loss and start-up tables (and the notes under them) it did not measure."""
    from benchmarks.common import write_subsections

    path = tmp_path / "BENCHMARKS.md"
    path.write_text(
        "# Benchmarks\n\n## Memory and start-up\n\nMeasured old.\n\n### Loss: shape (measured 1)\n\nloss table\n\n"
        "### Rank wait: 2 ranks (measured 1)\n\nold wait\n\n### Start-up: 2 ranks (measured 1)\n\nstart-up table\n\n"
        "Notes kept.\n\n## Merge\n\nmerge numbers\n"
    )
    write_subsections(
        path, "## Memory and start-up\n\nMeasured new.\n\n### Rank wait: 2 ranks (measured 2)\n\nnew wait\n"
    )
    text = path.read_text()
    assert "old wait" not in text and "new wait" in text and "Measured new." in text and "Measured old." not in text
    assert (
        "loss table" in text
        and "start-up table\n\nNotes kept." in text
        and text.endswith("## Merge\n\nmerge numbers\n")
    )
    assert text.index("### Loss") < text.index("### Rank wait") < text.index("### Start-up"), "the order stays"
