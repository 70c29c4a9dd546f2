"""Make tests/fixtures/cosyvoice_stream/: CosyVoice's own streaming token-to-wav, run on the tiny
checkpoints, as the expected output of stepaudio's ``cosyvoice`` streaming mode.

Not part of the package and not run by the tests. It runs CosyVoice's classes and its
``CosyVoiceModel.tts(stream=True)`` loop unchanged (commit ffa28e3, see the fixture's README.md
for why that one), with only these patches, none of which changes the arithmetic:

1. ``token_min_hop_len`` and ``token_max_hop_len`` are made ints (``int(2 * 125/3) = 83``,
   ``int(4 * 125/3) = 166``). The code computes them as ``2 * input_frame_rate`` and slices the
   token list with them; with Step-Audio's 125/3 tokens a second the slice raises TypeError.
2. The random draws (``torch.randn_like`` in ``ConditionalCFM.forward`` and ``SineGen.forward``,
   ``Uniform.sample`` in ``SineGen.forward``) return values from tests/cosyvoice_reference.py, so
   the tests can regenerate them; every other draw is left alone (the one in
   ``SourceModuleHnNSF.forward`` only feeds an output HiFT discards).
3. The LLM is a stand-in whose ``inference`` yields the case's tokens (``tts`` runs it in its
   thread as it would run the LM); only the flow and HiFT are loaded.
4. Matcha-TTS's ``matcha/utils/__init__.py`` imports its training tools (hydra, lightning, rich);
   it is replaced by an empty package module, and ``lightning.pytorch.utilities.rank_zero_only``
   (used by ``matcha.utils.pylogger`` at import) by the identity.
5. The tiny ``cosyvoice.yaml`` names Step-Audio's vendored ``cosyvoice.matcha.audio`` for the
   feature extractor; CosyVoice has it at ``matcha.utils.audio``. It is not used here.
6. ``tts`` is iterated under ``torch.inference_mode()``. On the CPU, ``fade_in_out``'s
   ``.cpu()`` returns the flow's output itself, an inference tensor, and its in-place cross-fade
   is refused outside inference mode (on CUDA ``.cpu()`` copies, so the code works there); the
   mode changes no value.

Usage (in a scratch venv with the packages named in the README)::

    python -m stepaudio tiny TINY
    python tools/make_cosyvoice_stream_fixture.py --cosyvoice COSYVOICE_CHECKOUT \\
        --matcha MATCHA_CHECKOUT --folder TINY/Step-Audio-TTS-3B/CosyVoice-300M-25Hz \\
        --out tests/fixtures/cosyvoice_stream
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import types
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

#: (name, tokens, seed of the tokens, prompt and draws): one utterance that ends within the first
#: chunk, one whose last chunk is exactly the 20-token overlap, one spanning several hops.
CASES = (("short", 60, 11), ("two_hops", 186, 12), ("long", 300, 13))
PROMPT_TOKENS, PROMPT_FRAMES = 30, 62


def stub_modules(matcha: Path) -> None:
    """Patch 4: matcha.utils as a bare package, lightning's rank_zero_only as the identity."""
    utils = types.ModuleType("matcha.utils")
    utils.__path__ = [str(matcha / "matcha" / "utils")]
    sys.modules["matcha.utils"] = utils
    import matcha

    matcha.utils = utils
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["lightning.pytorch.utilities"].rank_zero_only = lambda fn: fn


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("torch", "numpy", "diffusers", "hyperpyyaml", "conformer", "einops", "omegaconf",
                "scipy", "huggingface_hub"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cosyvoice", type=Path, required=True, help="CosyVoice checkout at ffa28e3")
    ap.add_argument("--matcha", type=Path, required=True, help="Matcha-TTS checkout at dd9105b")
    ap.add_argument("--folder", type=Path, required=True, help="tiny CosyVoice-300M-25Hz folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    sys.path[:0] = [str(args.cosyvoice), str(args.matcha), str(REPO / "tests"), str(REPO)]
    stub_modules(args.matcha)
    import torch
    from cosyvoice_reference import checkpoint_fingerprint, normal, phases
    from hyperpyyaml import load_hyperpyyaml

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the one draw left to torch (discarded by HiFT) is reproducible too
    from cosyvoice.cli.model import CosyVoiceModel
    from cosyvoice.flow.flow_matching import ConditionalCFM
    from cosyvoice.hifigan.generator import SineGen

    text = (args.folder / "cosyvoice.yaml").read_text(encoding="utf-8")
    text = text.replace("cosyvoice.matcha.audio.mel_spectrogram", "matcha.utils.audio.mel_spectrogram")
    configs = load_hyperpyyaml(text)

    # -- patch 2: the draws ---------------------------------------------------------------------
    state = {"seed": 0, "count": {}, "log": []}
    randn_like, uniform_sample = torch.randn_like, torch.distributions.Uniform.sample

    def served(kind: str, value: torch.Tensor) -> torch.Tensor:
        k = state["count"].get(kind, 0)
        state["count"][kind] = k + 1
        state["log"].append((kind, k, tuple(value.shape), float(value.double().sum())))
        return value

    def caller_is(cls: type) -> bool:
        return isinstance(sys._getframe(2).f_locals.get("self"), cls)

    def patched_randn_like(x: torch.Tensor, *a, **kw) -> torch.Tensor:  # noqa: ANN002, ANN003
        for cls, kind in ((ConditionalCFM, "flow"), (SineGen, "source")):
            if caller_is(cls):
                k = state["count"].get(kind, 0)
                value = normal(state["seed"], kind, k, tuple(x.shape)).to(x.device, x.dtype)
                return served(kind, value)
        return randn_like(x, *a, **kw)

    def patched_sample(self, sample_shape=torch.Size()) -> torch.Tensor:  # noqa: ANN001
        if not caller_is(SineGen):
            return uniform_sample(self, sample_shape)
        k = state["count"].get("phase", 0)
        batch, harmonics, _ = sample_shape
        assert batch == 1, "one utterance at a time"
        value = phases(state["seed"], k, harmonics)
        return served("phase", value)

    torch.randn_like = patched_randn_like
    torch.distributions.Uniform.sample = patched_sample

    # -- the model, as CosyVoiceModel.load builds it (flow and HiFT only: patch 3) ------------------
    class StandInLLM:
        tokens: list[int] = []

        def inference(self, **_: object):  # noqa: ANN201
            yield from self.tokens

    llm = StandInLLM()
    model = CosyVoiceModel(llm, configs["flow"], configs["hift"])
    for module, name in ((model.flow, "flow.pt"), (model.hift, "hift.pt")):
        module.load_state_dict(torch.load(args.folder / name, map_location=model.device))
        module.to(model.device).eval()
    # patch 1
    model.token_min_hop_len = int(model.token_min_hop_len)
    model.token_max_hop_len = int(model.token_max_hop_len)

    calls: list[tuple[list[int], bool]] = []
    token2wav = model.token2wav

    def recorded_token2wav(token, *a, finalize=False, **kw):  # noqa: ANN001, ANN002, ANN003
        calls.append((token[0].tolist(), bool(finalize)))
        return token2wav(token, *a, finalize=finalize, **kw)

    model.token2wav = recorded_token2wav
    hift_mels: list[np.ndarray] = []
    hift_inference = model.hift.inference

    def recorded_hift(mel, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        hift_mels.append(mel[0].float().cpu().numpy().copy())
        return hift_inference(mel, *a, **kw)

    model.hift.inference = recorded_hift

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cosyvoice_commit": "ffa28e3", "matcha_commit": "dd9105b",
            "checkpoint_fingerprint": checkpoint_fingerprint(args.folder),
            "input_frame_rate": float(model.flow.input_frame_rate),
            "token_min_hop_len": model.token_min_hop_len,
            "token_max_hop_len": model.token_max_hop_len,
            "token_overlap_len": model.token_overlap_len, "mel_overlap_len": model.mel_overlap_len,
            "mel_cache_len": model.mel_cache_len, "source_cache_len": model.source_cache_len,
            "stream_scale_factor": model.stream_scale_factor, "environment": versions(),
            "cases": {}}
    for name, n_tokens, seed in CASES:
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, model.flow.vocab_size, n_tokens).tolist()
        prompt_token = rng.integers(0, model.flow.vocab_size, (1, PROMPT_TOKENS))
        prompt_feat = rng.normal(-4.0, 2.0, (1, PROMPT_FRAMES, 80)).astype(np.float32)
        embedding = rng.normal(0.0, 1.0, (1, 192)).astype(np.float32)
        llm.tokens = tokens
        state.update(seed=seed, count={}, log=[])
        calls.clear()
        hift_mels.clear()
        with torch.inference_mode():  # patch 6
            chunks = [out["tts_speech"][0].numpy().copy() for out in model.tts(
                text=torch.zeros(1, 1, dtype=torch.int32),
                flow_embedding=torch.from_numpy(embedding),
                llm_embedding=torch.from_numpy(embedding),
                flow_prompt_speech_token=torch.from_numpy(prompt_token).to(torch.int32),
                prompt_speech_feat=torch.from_numpy(prompt_feat), stream=True)]
        ranges = []  # (first token, end, finalize) of each token2wav call
        for chunk_tokens, final in calls:
            at = next(i for i in range(n_tokens) if tokens[i: i + len(chunk_tokens)] == chunk_tokens)
            ranges.append([at, at + len(chunk_tokens), final])
        arrays = {
            "tokens": np.array(tokens, np.int64), "prompt_token": prompt_token.astype(np.int64),
            "prompt_feat": prompt_feat, "embedding": embedding,
            "chunk_samples": np.array([len(c) for c in chunks], np.int64),
            "wav": np.concatenate(chunks).astype(np.float32),  # the chunks, one after another
        }
        for i, mel in enumerate(hift_mels):  # HiFT's input: flow output after fades and caches
            arrays[f"hift_mel_{i}"] = mel.astype(np.float32)
        np.savez_compressed(args.out / f"{name}.npz", **arrays)
        meta["cases"][name] = {
            "tokens": n_tokens, "seed": seed, "chunks": len(chunks),
            "chunk_tokens": ranges,
            "chunk_samples": [len(c) for c in chunks],
            "draws": [{"kind": k, "chunk": i, "shape": list(shape), "sum": total}
                      for k, i, shape, total in state["log"]]}
        print(f"{name}: {n_tokens} tokens → {len(chunks)} chunks "
              f"{[len(c) for c in chunks]} samples, draws {state['count']}")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
