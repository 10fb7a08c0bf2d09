"""Mixed capability sets (issue 8): the model's own answers as corpus, and mixtures of parts' K-FAC factors."""

import pytest
import torch
from conftest import CORPUS

from crispedit.arch import editable_modules
from crispedit.cache import CurvatureCache, build_cache, parse_mixture
from crispedit.corpus import answer_from_model, batches_of, capability_windows
from crispedit.kfac import KFACFactors, kfac_factors, merge_factors, mix_factors

CHAT_TEMPLATE = ("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}A:{% endif %}")


def random_factors(d_in: int, d_out: int, n: int, seed: int) -> KFACFactors:
    g = torch.Generator().manual_seed(seed)
    a, s = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    return KFACFactors(A=a.T @ a / n, S=s.T @ s / n, num_tokens=n)


def test_mixture_is_the_weighted_average_and_token_weights_give_the_merge():
    p, q = random_factors(5, 3, 10, 0), random_factors(5, 3, 30, 1)
    mixed = mix_factors([p, q], [0.25, 0.75])
    torch.testing.assert_close(mixed.A, 0.25 * p.A + 0.75 * q.A)
    torch.testing.assert_close(mixed.S, 0.25 * p.S + 0.75 * q.S)
    assert mixed.num_tokens == 40
    merged = merge_factors([p, q])
    by_tokens = mix_factors([p, q], [10, 30])
    torch.testing.assert_close(by_tokens.A, merged.A)
    torch.testing.assert_close(by_tokens.S, merged.S)
    with pytest.raises(ValueError, match="non-negative"):
        mix_factors([p, q], [-1, 2])
    with pytest.raises(ValueError, match="one weight per part"):
        mix_factors([p, q], [1])


def test_parse_mixture():
    assert parse_mixture("self") == [("self", 1.0)]
    assert parse_mixture("a.txt=0.5, self-chat:q.txt=0.25") == [("a.txt", 0.5), ("self-chat:q.txt", 0.25)]
    with pytest.raises(ValueError, match="not a number"):
        parse_mixture("a.txt=lots")
    with pytest.raises(ValueError, match="empty source"):
        parse_mixture("a.txt,,b.txt")


def test_variable_length_batches_give_the_per_sequence_factors(tiny_llama):
    """Padding is masked: factors of a padded batch equal the token-weighted merge of each sequence alone."""
    model, tok = tiny_llama
    modules = editable_modules(model, (1,))
    seqs = [tok(t)["input_ids"] for t in ("The capital of France is Paris.", "Water boils", "Hamlet was written by")]
    together = kfac_factors(model, modules, batches_of(seqs, 3))["model.layers.1.mlp.down_proj"]
    alone = merge_factors([kfac_factors(model, modules, batches_of([s], 1))["model.layers.1.mlp.down_proj"]
                           for s in seqs])
    assert together.num_tokens == sum(len(s) - 1 for s in seqs)
    torch.testing.assert_close(together.A, alone.A, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together.S, alone.S, rtol=1e-4, atol=1e-6)


def test_answers_from_the_model_follow_each_prompt_and_stop_at_the_end_token(tiny_llama):
    model, tok = tiny_llama
    prompts = ["Who wrote Hamlet?", "What is the capital of Spain?"]
    out = answer_from_model(model, tok, prompts, max_new_tokens=6, chat=False, progress=False)
    for prompt, seq in zip(prompts, out, strict=True):
        head = tok(prompt)["input_ids"]
        assert seq[: len(head)] == head
        answer = seq[len(head) :]
        assert 1 <= len(answer) <= 6
        assert tok.eos_token_id not in answer[:-1]  # nothing after an end token


def test_self_raw_and_self_chat_corpora_build_caches(tiny_llama, tmp_path):
    model, tok = tiny_llama
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who wrote Hamlet?\nWhat is the capital of Spain?\nWhat is gold?\n")
    raw = build_cache(model, tok, (1,), f"self-raw:{prompts}", n_samples=2, seq_len=5, progress=False)
    assert raw.meta["corpus"] == f"self-raw:{prompts}" and raw.num_tokens >= 2 * len(tok("What is gold?")["input_ids"])
    with pytest.raises(ValueError, match="chat template"):
        capability_windows(model, tok, f"self-chat:{prompts}", 2, 5)
    tok.chat_template = CHAT_TEMPLATE
    chat = capability_windows(model, tok, f"self-chat:{prompts}", 3, 4)
    assert len(chat) == 3 and all(tok.decode(w).startswith("Q: ") for w in chat)


def test_a_mixed_cache_equals_the_weighted_parts(tiny_llama, tmp_path):
    model, tok = tiny_llama
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(CORPUS * 3))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who wrote Hamlet?\nWhat is the capital of Spain?\n")
    spec = f"{text}=0.7,self-raw:{prompts}=0.3"
    mixed = build_cache(model, tok, (1, 2), spec, n_samples=2, seq_len=8, progress=False)
    parts = [build_cache(model, tok, (1, 2), source, n_samples=2, seq_len=8, progress=False)
             for source, _ in parse_mixture(spec)]
    for name, f in mixed.factors.items():
        torch.testing.assert_close(f.A, 0.7 * parts[0].factors[name].A + 0.3 * parts[1].factors[name].A)
        torch.testing.assert_close(f.S, 0.7 * parts[0].factors[name].S + 0.3 * parts[1].factors[name].S)
    assert [p["weight"] for p in mixed.meta["parts"]] == [0.7, 0.3]
    path = mixed.save(tmp_path / "mixed.safetensors")
    again = CurvatureCache.load(path, model=model, layers=(1, 2))
    assert again.meta["parts"] == mixed.meta["parts"]
    other = build_cache(model, tok, (1,), str(text), n_samples=2, seq_len=8, progress=False)
    with pytest.raises(ValueError, match="same model and layers"):
        CurvatureCache.mixed([parts[0], other], [1, 1])
