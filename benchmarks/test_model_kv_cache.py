"""Generation speed: fastgpt's KV-cache loop vs the seed's no-cache loop vs transformers' ``generate``.

One set of weights -- a seeded random GPT-2 small (with QKV biases, as GPT-2
has them) written by ``save_pretrained`` and loaded by both libraries --,
greedy decoding, a 200-token prompt and 64 new tokens, batch 1. Without a GPU
(CI) GPT-2 small's width and vocabulary with 2 blocks, a 100-token prompt and 32
new tokens: the harness and the cache's clear win, in seconds. Targets on a CPU
(GPT-2 small, 64 tokens): the cache ≥ 10× the no-cache loop and ≥ 1.25× transformers. The last test prints the tokens/s and ratios,
and checks the three produced the same tokens.

    pytest benchmarks/test_model_kv_cache.py
"""

import pytest
import torch

import fastgpt
from timing import ON_GPU, synchronized

transformers = pytest.importorskip("transformers")

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
PROMPT_TOKENS, NEW_TOKENS, CONTEXT = (200, 64, 1024) if ON_GPU else (100, 32, 1024)
CPU_SIZE = {} if ON_GPU else {"n_layers": 2}  # GPT-2 small's width and vocabulary, 2 of its 12 blocks
# The no-cache loop takes seconds a run on a 2-core CPU at these sizes: one timed run is enough there.
# On a shared CPU the fastest of several rounds is the figure least disturbed by other processes;
# CI's CPU run proves the harness, so it keeps to two.
ROUNDS = {"kv cache": 5, "no cache (seed loop)": 3, "transformers": 5} if ON_GPU else \
    {"kv cache": 2, "no cache (seed loop)": 1, "transformers": 2}

results: dict[str, dict] = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2-small")
    torch.manual_seed(123)
    fastgpt.GPTModel(fastgpt.gpt2_config("gpt2-small", qkv_bias=True, **CPU_SIZE)).save_pretrained(folder)
    ours = fastgpt.from_pretrained(folder, device=DEVICE)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).to(DEVICE).eval()
    prompt = torch.randint(0, 50257, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return ours, hf, prompt


def _generators(ours, hf, prompt):
    def transformers_generate():
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=50256)

    return {
        "kv cache": lambda: fastgpt.generate_text_simple(ours, prompt, NEW_TOKENS, CONTEXT),
        "no cache (seed loop)": lambda: fastgpt.generate_text_simple(ours, prompt, NEW_TOKENS, CONTEXT,
                                                                     use_cache=False),
        "transformers": transformers_generate,
    }


@pytest.mark.parametrize("name", list(ROUNDS))
def test_generation(benchmark, models, name):
    ours, hf, prompt = models
    run = synchronized(_generators(ours, hf, prompt)[name], DEVICE)
    benchmark.group = f"generate {NEW_TOKENS} tokens after {PROMPT_TOKENS}, batch 1, greedy, {DEVICE.type}"
    benchmark.extra_info["model"] = "gpt2-small" if ON_GPU else "gpt2-small width, 2 blocks"
    out = benchmark.pedantic(run, rounds=ROUNDS[name], iterations=1, warmup_rounds=0 if name.startswith("no") else 1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, untimed
        return
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["tokens/s"] = round(NEW_TOKENS / seconds, 2)
    results[name] = {"seconds": seconds, "tokens": out.cpu()}


def test_summary_and_agreement():
    if len(results) < len(ROUNDS):
        pytest.skip("needs the three timed runs above in the same session")
    cached = results["kv cache"]
    lines = [f"{name:22s} {NEW_TOKENS / r['seconds']:8.2f} tokens/s  {r['seconds']:7.2f} s  "
             f"kv cache ×{r['seconds'] / cached['seconds']:.2f} faster" for name, r in results.items()]
    print("\n" + "\n".join(lines))
    assert cached["tokens"].shape == (1, PROMPT_TOKENS + NEW_TOKENS)
    # Greedy tokens agree; on a GPU TF32 matmuls may flip a near-tie, so only the CPU insists.
    for name in ("no cache (seed loop)", "transformers"):
        if not ON_GPU:
            assert torch.equal(results[name]["tokens"], cached["tokens"]), name
    # The cache must do at least a clear part of its job, whatever the machine's load.
    assert results["no cache (seed loop)"]["seconds"] > 3 * cached["seconds"]
