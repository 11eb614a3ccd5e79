"""Real checkpoints come in many architectures: tiny random-weight Llama, Qwen2, GPT-NeoX, GPT-2
and OLMo-2 models, saved as HF directories, go through loading, generation, causal tracing and
unlearning."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Olmo2Config,
    Qwen2Config,
)

from unlearn import run
from unlearn.data import load_lume
from unlearn.measure.generation import (
    _cache_layers_known,
    generate_one_by_one,
    greedy_generate,
    preallocated_cache_fits,
)
from unlearn.models import load_model
from unlearn.tracing.trace import Tracer, encode, facts_from

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=512)
CONFIGS = {
    "llama": lambda v: LlamaConfig(vocab_size=v, num_key_value_heads=2, **TINY),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, num_key_value_heads=2, **TINY),
    "gpt_neox": lambda v: GPTNeoXConfig(vocab_size=v, rotary_pct=0.5, **TINY),
    "olmo2": lambda v: Olmo2Config(vocab_size=v, **TINY),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                 n_positions=512),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tiny_target, tmp_path_factory):
    _, tokenizer = load_model(tiny_target[0])
    torch.manual_seed(0)
    config = CONFIGS[request.param](len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = None  # like OLMo: no pad token of its own
    out = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_batched_generation_matches_one_by_one(checkpoint, synth_dir):
    model, tokenizer = load_model(checkpoint)
    assert tokenizer.pad_token_id is not None
    prompts = [r.input for r in load_lume(synth_dir).rows[:12]]
    official = generate_one_by_one(model, tokenizer, prompts, 12)
    fast = greedy_generate(model, tokenizer, prompts, max_new_tokens=12)
    assert [g.text for g in fast] == official
    # the fallback for models the preallocated cache does not know: batched `generate`, with
    # the early exit of question rows as a stopping criterion
    answers = [r.output if r.kind == "qa" else None for r in load_lume(synth_dir).rows[:12]]
    fallback = greedy_generate(model, tokenizer, prompts, 12, answers=answers, fast=False)
    # all five architectures attend fully: only a transformers whose cache layers are unknown
    # (below the pinned versions) may send them through `generate` instead
    assert preallocated_cache_fits(model) == _cache_layers_known()
    if _cache_layers_known():
        assert fallback == greedy_generate(model, tokenizer, prompts, 12, answers=answers,
                                           fast=True)
    assert [g.text for g in fallback if not g.stopped_early] == [
        t for t, g in zip(official, fallback) if not g.stopped_early]


def test_sliding_window_models_are_generated_through_generate():
    config = Qwen2Config(vocab_size=64, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=16, max_window_layers=1, **TINY)
    assert "sliding_attention" in config.layer_types
    assert not preallocated_cache_fits(AutoModelForCausalLM.from_config(config))


def test_full_and_lora_unlearning_touch_only_what_was_chosen(checkpoint, synth_dir, tmp_path):
    source = load_model(checkpoint)[0].state_dict()
    run("gd", checkpoint, synth_dir, tmp_path / "full", mia=None, epochs=1, batch_size=8,
        layers="last:1", modules="mlp", lr=1e-3, profile="paper")
    after = load_model(tmp_path / "full")[0].state_dict()
    changed = {k for k in source if not torch.equal(after[k], source[k])}
    assert changed and all(".1.mlp." in k for k in changed), changed
    # LoRA on q, v, up and down projections, under whatever names this architecture uses
    run("sugd", checkpoint, synth_dir, tmp_path / "lora", mia=None, epochs=1, chunk_size=64,
        lora=True, lr=1e-3, profile="paper", layers="last:1")
    merged = load_model(tmp_path / "lora")[0].state_dict()
    assert set(merged) == set(source)  # merged back into the plain architecture
    changed = {k for k in source if not torch.equal(merged[k], source[k])}
    assert changed and all(".1." in k for k in changed), changed


def test_causal_tracing_patches_each_architectures_blocks(checkpoint, synth_dir):
    model, tokenizer = load_model(checkpoint)
    fact = next(e for f in facts_from(load_lume(synth_dir).rows)
                if (e := encode(tokenizer, f)) is not None)
    result = Tracer(model, noise=1.0, samples=2).trace(fact)
    restored = result["restored"]
    # the whole last layer's output at the last position restores the clean prediction exactly
    assert restored["residual"][-1, -1].item() == pytest.approx(result["clean"], rel=1e-4)
    # the attention and MLP blocks were found and patched: restoring them moves the prediction
    for kind in ("attn", "mlp"):
        assert (restored[kind][-1] - result["corrupted"]).abs().max() > 0, kind
