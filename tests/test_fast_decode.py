"""The static-cache decode path (stepaudio.llm.fast_decode) against the model's normal forward.

Every logit the fast path produces (after a prefill and after each decode step, for rows of
different lengths that join and leave a running batch) must equal what ``Step1ForCausalLM`` gives
for that row alone with its ``DynamicCache``. On CPU the same static-cache code runs eagerly; the
Triton kernels are checked through Triton's CPU interpreter (fp32: its bf16 dot is not usable) and
compiled for sm_90 so a kernel that would not build on the GPU fails here first.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from stepaudio.llm import Step1Config, Step1ForCausalLM
from stepaudio.llm.compat import CACHE_FIELD, DTYPE_KWARG
from stepaudio.llm.fast_decode import (
    HAS_TRITON,
    SlotError,
    Step1FastDecoder,
    pack_step1_weights,
    parameter_bytes,
)

ATOL = 1e-4


def tiny_model(
    heads: int = 4, groups: int = 2, hidden: int = 64, seed: int = 0
) -> Step1ForCausalLM:
    """A random fp32 Step1 small enough for CPU, with head_dim 16 (the Triton kernels' minimum)."""
    torch.manual_seed(seed)
    config = Step1Config(hidden_size=hidden, intermediate_size=96, num_attention_heads=heads,
                         num_attention_groups=groups, num_hidden_layers=2, vocab_size=256)
    return Step1ForCausalLM(config).eval()


def reference_logits(model: Step1ForCausalLM, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """Logits after the prompt and after each later token: the model's own forward with a cache."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = model(ids[:, :prompt_len], use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        rows = [out.logits[0, -1]]
        for t in range(prompt_len, len(tokens)):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_FIELD: cache})
            rows.append(out.logits[0, -1])
    return torch.stack(rows)


@dataclass
class Request:
    prompt: list[int]
    slot: int
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def run_scenario(dec: Step1FastDecoder, seed: int = 0,
                 prompt_lens: tuple[int, int, int, int] = (5, 9, 3, 4)) -> list[Request]:
    """Batch 1, then rows joining mid-way (to 3 rows, a padded bucket), one leaving, its slot
    reused by a shorter request over stale cache entries, and the batch order shuffled."""
    rng = random.Random(seed)
    vocab = dec.config.vocab_size

    def join(n: int) -> Request:
        prompt = [rng.randrange(vocab) for _ in range(n)]
        req = Request(prompt=prompt, slot=dec.allocate(), tokens=list(prompt))
        req.logits.append(dec.prefill(req.slot, prompt).float().clone())
        return req

    def step(reqs: list[Request]) -> None:
        toks = [rng.randrange(vocab) for _ in reqs]
        out = dec.decode([r.slot for r in reqs], toks)
        assert out.shape == (len(reqs), vocab)
        for req, tok, row in zip(reqs, toks, out, strict=True):
            req.tokens.append(tok)
            req.logits.append(row.float().clone())

    a = join(prompt_lens[0])
    step([a])
    step([a])
    b = join(prompt_lens[1])
    for _ in range(2):
        step([a, b])
    c = join(prompt_lens[2])
    for _ in range(3):
        step([a, b, c])
    dec.release(a.slot)
    d = join(prompt_lens[3])
    assert d.slot == a.slot  # the freed slot is reused; its old, longer cache rows are stale
    for _ in range(2):
        step([c, d, b])
    return [a, b, c, d]


def assert_scenario_matches(model: Step1ForCausalLM, reqs: list[Request], atol: float = ATOL):
    for req in reqs:
        ref = reference_logits(model, req.tokens, len(req.prompt))
        got = torch.stack(req.logits)
        assert got.shape == ref.shape
        err = (got - ref.float()).abs().max().item()
        assert err <= atol, f"slot {req.slot}: max |fast - model| = {err:.3g}"


@pytest.fixture()
def model() -> Step1ForCausalLM:
    return tiny_model()


@pytest.fixture(scope="module")
def golden_model(golden_dir: Path) -> Step1ForCausalLM:
    m = AutoModelForCausalLM.from_pretrained(
        golden_dir / "step1" / "model", **{DTYPE_KWARG: torch.float32}
    )
    return m.eval()


def test_batch_of_one_equals_model_forward_with_cache(model):
    dec = Step1FastDecoder(model, max_batch=2, max_len=64)
    assert dec.kernels == "torch" and not dec.use_cuda_graphs  # CPU: same code, eagerly
    rng = random.Random(1)
    prompt = [rng.randrange(256) for _ in range(7)]
    slot = dec.allocate()
    logits = [dec.prefill(slot, prompt).clone()]
    tokens = list(prompt)
    for _ in range(6):
        tok = rng.randrange(256)
        tokens.append(tok)
        logits.append(dec.decode([slot], [tok])[0].clone())
    assert dec.length(slot) == 13
    ref = reference_logits(model, tokens, len(prompt))
    torch.testing.assert_close(torch.stack(logits), ref, atol=ATOL, rtol=0)


def test_rows_at_different_lengths_joining_and_leaving(model):
    dec = Step1FastDecoder(model, max_batch=4, max_len=64)
    assert dec.bucket_for(3) == 4  # three rows run in the 4-row bucket with one padding row
    assert_scenario_matches(model, run_scenario(dec))


def test_golden_checkpoint_non_power_of_two_heads(golden_model):
    # 6 heads in 2 groups (3 query heads per group), head_dim 4: the torch kernels' path.
    dec = Step1FastDecoder(golden_model, max_batch=4, max_len=64)
    assert_scenario_matches(golden_model, run_scenario(dec, seed=3))


def test_model_forward_unchanged_and_weights_not_copied(golden_model, golden_dir: Path):
    before = parameter_bytes(golden_model)
    Step1FastDecoder(golden_model, max_batch=2, max_len=16)
    packs = pack_step1_weights(golden_model)  # a second decoder reuses the packing
    attn = golden_model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == packs[0][0].data_ptr()
    assert attn.k_proj.weight.data_ptr() == packs[0][0][attn.q_proj.weight.shape[0]].data_ptr()
    assert parameter_bytes(golden_model) == before
    ids = torch.from_numpy(np.load(golden_dir / "step1" / "seqA_input_ids.npy"))
    with torch.no_grad():
        logits = golden_model(ids).logits.numpy()
    ref = np.load(golden_dir / "step1" / "seqA_logits.npy")
    np.testing.assert_allclose(logits, ref, atol=ATOL, rtol=0)


def test_truncate_rolls_back_a_cancelled_continuation(model):
    dec = Step1FastDecoder(model, max_batch=2, max_len=64)
    prompt = [3, 14, 15, 92, 65]
    slot = dec.allocate()
    dec.prefill(slot, prompt)
    for tok in (7, 8, 9):
        dec.decode([slot], [tok])
    dec.truncate(slot, len(prompt) + 1)  # keep the first generated token only
    got = [dec.decode([slot], [tok])[0].clone() for tok in (40, 41)]
    ref = reference_logits(model, [*prompt, 7, 40, 41], len(prompt))
    torch.testing.assert_close(torch.stack(got), ref[-2:], atol=ATOL, rtol=0)


def test_prefill_appends_to_a_running_slot(model):
    dec = Step1FastDecoder(model, max_batch=2, max_len=64)
    slot = dec.allocate()
    dec.prefill(slot, [5, 6, 7])
    dec.decode([slot], [8])
    last = dec.prefill(slot, [9, 10, 11])  # e.g. the next user turn, appended
    ref = reference_logits(model, [5, 6, 7, 8, 9, 10, 11], 7)
    torch.testing.assert_close(last, ref[0], atol=ATOL, rtol=0)
    assert dec.length(slot) == 7


def test_device_tensor_token_ids_are_accepted(model):
    dec = Step1FastDecoder(model, max_batch=2, max_len=32)
    a, b = dec.allocate(), dec.allocate()
    dec.prefill(a, [1, 2])
    dec.prefill(b, [3])
    out = dec.decode([b, a], torch.tensor([[4], [5]]))
    ref_a = reference_logits(model, [1, 2, 5], 2)[-1]
    torch.testing.assert_close(out[1], ref_a, atol=ATOL, rtol=0)


def test_slot_misuse_is_refused(model):
    dec = Step1FastDecoder(model, max_batch=2, max_len=8)
    a, b = dec.allocate(), dec.allocate()
    with pytest.raises(SlotError):
        dec.allocate()
    with pytest.raises(SlotError):
        dec.decode([a], [1])  # empty: nothing prefilled yet
    dec.prefill(a, [1, 2, 3, 4, 5, 6, 7])
    dec.prefill(b, [1])
    with pytest.raises(SlotError):
        dec.decode([a, a], [1, 2])
    with pytest.raises(ValueError):
        dec.decode([a, b], [1])
    dec.decode([a], [8])  # the 8th and last position
    with pytest.raises(SlotError):
        dec.decode([a], [9])
    with pytest.raises(SlotError):
        dec.prefill(b, list(range(8)))
    with pytest.raises(SlotError):
        dec.truncate(b, 5)
    dec.release(b)
    with pytest.raises(SlotError):
        dec.decode([b], [1])
    assert dec.free_slots == [1] and dec.active_slots == [0]


def test_padding_rows_never_run_out_of_room(model):
    # Three rows run in the 4-row bucket: its padding row writes the scratch slot every step,
    # far more steps in total than max_len; the scratch length must be reset each time.
    dec = Step1FastDecoder(model, max_batch=4, max_len=8)
    for _ in range(4):
        slots = [dec.allocate() for _ in range(3)]
        for slot in slots:
            dec.prefill(slot, [1])
        for tok in range(7):
            dec.decode(slots, [tok] * 3)
        for slot in slots:
            dec.release(slot)
    assert int(dec.lengths_dev[dec.scratch]) == 0


def test_triton_kernels_refused_where_they_cannot_run(golden_model):
    with pytest.raises(ValueError):
        Step1FastDecoder(golden_model, max_batch=1, max_len=8, kernels="triton")  # head_dim 4
    with pytest.raises(ValueError):
        Step1FastDecoder(golden_model, max_batch=1, max_len=8, use_cuda_graphs=True)


_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    import test_fast_decode as t
    from stepaudio.llm.fast_decode import Step1FastDecoder
    torch.set_num_threads(1)
    model = t.tiny_model(heads=6, groups=2, hidden=96)  # head_dim 16, 3 query heads per group
    dec = Step1FastDecoder(model, max_batch=4, max_len=96, kernels="triton", block_n=16)
    dec.num_sms = 8  # 1 and 2 rows: key splits and a combine kernel; 4 rows: one split
    assert (dec.splits_for(1), dec.splits_for(2), dec.splits_for(4)) == (4, 2, 1)
    t.assert_scenario_matches(model, t.run_scenario(dec, seed=5, prompt_lens=(40, 17, 33, 21)))
    print("ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_match_model_in_interpreter():
    # TRITON_INTERPRET is read when kernels are defined, hence a fresh interpreter process.
    tests = str(Path(__file__).parent)
    root = str(Path(__file__).parent.parent)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def _nvidia_compiler_available() -> bool:
    if not HAS_TRITON:
        return False
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _nvidia_compiler_available(), reason="no Triton CUDA backend")
@pytest.mark.parametrize("dtype,precision", [("bf16", "tf32"), ("fp32", "ieee")])
def test_triton_kernels_compile_for_hopper(dtype: str, precision: str):
    """Ahead-of-time compile to sm_90 cubin (no GPU needed) at the TTS-3B attention shape."""
    import triton
    from triton.backends.compiler import GPUTarget

    from stepaudio.llm import fast_decode as fd

    target = GPUTarget("cuda", 90, 32)

    def build(fn, signature: dict[str, str], constexprs: dict[str, object], warps: int) -> None:
        sig = {**signature, **{name: "constexpr" for name in constexprs}}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        compiled = triton.compile(src, target=target, options={"num_warps": warps})
        assert "cubin" in compiled.asm

    p = f"*{dtype}"
    build(fd._rmsnorm_kernel, {"x_ptr": p, "w_ptr": p, "out_ptr": p, "stride_x": "i32",
                               "stride_out": "i32", "n_cols": "i32", "eps": "fp32"},
          {"BLOCK": 4096}, 8)
    build(fd._silu_mul_kernel, {"gu_ptr": p, "out_ptr": p, "stride_gu": "i32",
                                "stride_out": "i32", "n_inter": "i32"}, {"BLOCK": 1024}, 4)
    for splits in (1, 16):
        scratch = "*fp32" if splits > 1 else p
        build(fd._decode_attn_kernel,
              {"qkv_ptr": p, "kc_ptr": p, "vc_ptr": p, "slots_ptr": "*i64", "pos_ptr": "*i64",
               "slopes_ptr": "*fp32", "out_ptr": p, "ml_ptr": scratch, "part_ptr": scratch,
               "stride_qkv": "i32", "stride_cs": "i32", "stride_cg": "i32", "stride_out": "i32",
               "scale": "fp32"},
              {"H": 48, "G": 4, "REP": 12, "D": 64, "HB": 16, "BLOCK_N": 64, "SPLITS": splits,
               "PRECISION": precision}, 4)
    build(fd._combine_kernel, {"ml_ptr": "*fp32", "part_ptr": "*fp32", "out_ptr": p,
                               "stride_out": "i32"},
          {"G": 4, "REP": 12, "D": 64, "HB": 16, "SPLITS": 16}, 4)


def test_a_prompt_sharing_a_kept_prefix_copies_it_and_computes_the_same_logits(model):
    dec = Step1FastDecoder(model, max_batch=2, max_len=96, prefix_slots=2, min_prefix=8)
    rng = random.Random(4)
    voice = [rng.randrange(256) for _ in range(40)]  # e.g. a TTS speaker prompt
    first = voice + [rng.randrange(256) for _ in range(5)]
    second = voice + [rng.randrange(256) for _ in range(7)]
    a = dec.allocate()
    assert dec.reuse_prefix(a, first) == 0  # nothing kept yet
    dec.prefill(a, first)
    dec.keep_prefix(a, first)
    dec.decode([a], [11])  # the first request goes on; its kept prompt is a copy
    dec.release(a)
    b = dec.allocate()
    assert dec.reuse_prefix(b, second) == 40 and dec.length(b) == 40
    logits = [dec.prefill(b, second[40:]).clone()]
    logits.append(dec.decode([b], [12])[0].clone())
    ref = reference_logits(model, [*second, 12], len(second))
    torch.testing.assert_close(torch.stack(logits), ref, atol=ATOL, rtol=0)
    dec.keep_prefix(b, second)  # it extends the kept prompt: replaces it
    # the whole prompt again: all but its last token are copied (the prefill gives the logits)
    c = dec.allocate()
    assert dec.reuse_prefix(c, second) == len(second) - 1 and dec.prefix_hits == 40 + 46
    torch.testing.assert_close(dec.prefill(c, second[-1:]), ref[0], atol=ATOL, rtol=0)


def test_prefix_slots_keep_the_most_recently_used_prompts(model):
    dec = Step1FastDecoder(model, max_batch=1, max_len=64, prefix_slots=2, min_prefix=4)
    prompts = [[k] * 10 + [1, 2, 3] for k in (5, 6, 7)]
    for p in prompts:
        s = dec.allocate()
        dec.prefill(s, p)
        dec.keep_prefix(s, p)
        dec.release(s)
    s = dec.allocate()
    assert dec.reuse_prefix(s, prompts[0]) == 0  # evicted by the third
    assert dec.reuse_prefix(s, prompts[2]) == 12
