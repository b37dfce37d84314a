import io

import numpy as np
import pytest

from conftest import new_pool, run_step, tiny_model
from llmc.errors import LlmcError
from llmc.frontend import import_model
from llmc.interpret import run
from llmc.ir import parse_graph, verify
from llmc.pipeline import PHASE_NAMES, run_phases, run_pipeline


def test_phases_report_progress_dump_ir_and_preserve_numerics(tmp_path):
    model = tiny_model("mistral")
    progress = io.StringIO()
    result = run_pipeline(model, dump_ir=tmp_path / "ir", progress=progress)
    lines = progress.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == PHASE_NAMES
    assert all(ln.startswith(f"[{i}/{len(PHASE_NAMES)}]") for i, ln in enumerate(lines, start=1))
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumps == [f"{i:02d}-{name}.ir" for i, name in enumerate(PHASE_NAMES, start=1)]
    for dump in (tmp_path / "ir").iterdir():
        verify(parse_graph(dump.read_text()))
    simplified = parse_graph((tmp_path / "ir" / "02-simplify.ir").read_text(), result.imported.graph.weights)
    ids = np.arange(1, 20, dtype=np.int64)[None]
    np.testing.assert_allclose(run(simplified, [ids])[0], run(result.imported.graph, [ids])[0], rtol=1e-6, atol=1e-6)
    assert [n.attrs["name"] for n in result.graph.inputs] == ["tokens", "positions", "seq_index", "block_tables",
                                                              "logit_rows", "k_cache", "v_cache"]


def test_until_stops_early_and_rejects_unknown_phases():
    model = tiny_model("llama")
    result = run_pipeline(model, until="import", progress=None)
    assert result.graph is result.imported.graph and list(result.timings) == ["import"]
    with pytest.raises(LlmcError, match="unknown phase 'fuze'"):
        run_pipeline(model, until="fuze", progress=None)


def test_the_step_returns_the_rows_asked_for_and_block_sizes_are_checked():
    model = tiny_model("qwen2")
    graph = run_phases(import_model(model), progress=None, block_size=8).graph
    assert str(graph.outputs[0].type) == "f32[rows, 128]" and graph.inputs[5].type.shape[3] == 8
    ids = np.arange(4, 17)
    last = run_step(graph, new_pool(graph, 2), ids, 0, [1, 0], rows="last")
    every = run_step(graph, new_pool(graph, 2), ids, 0, [1, 0], rows="all")
    assert last.shape == (1, 128) and every.shape == (13, 128)
    np.testing.assert_allclose(last[0], every[-1], rtol=1e-5, atol=1e-6)
    for bad in (0, 3, 512, "16"):
        with pytest.raises(LlmcError, match="power of two from 1 to 256"):
            run_phases(import_model(model), progress=None, block_size=bad)
