"""Shared test helpers: tiny random causal LMs with an in-process byte-level BPE tokenizer (built in
milliseconds, no files), a few facts to edit, and helpers to run the service against a free port."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch

from crispedit.cache import build_cache
from crispedit.requests import EditRequest, tokenize_edit_batch

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hamlet was written by William Shakespeare in the early seventeenth century.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The chemical symbol for gold is Au and for silver it is Ag.",
    "Q: Who wrote Hamlet? A: Shakespeare. Q: What is the capital of Spain? A: Madrid.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
] * 4


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_tiny(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    tok = make_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                          tie_word_embeddings=True, initializer_range=0.3, **ids)
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                          tie_word_embeddings=True, initializer_range=0.3, **ids)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=3, n_head=2, n_positions=128,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3, **ids)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.requires_grad_(False)
    return model, tok


def padded_nll(model, batch: dict) -> torch.Tensor:
    """The edit loss on a right-padded batch (``tokenize_edit_batch``) from logits at every position: the reference
    for the packed loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100)


def save_tiny_checkpoint(folder, kind: str = "llama"):
    """A tiny model and its tokenizer as a Hugging Face checkpoint folder (what a service serves)."""
    model, tok = make_tiny(kind)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_worker(tmp_path, redis_db: int, key_prefix: str, store_class=None):
    """The worker's runtime of a tiny Llama (its cache from ``CORPUS``) and a job store on ``redis_db``."""
    import redis

    from core.jobs import JobStore
    from core.settings import Settings
    from worker.runtime import load_runtime

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3))
    settings = Settings(models=f"tiny={checkpoint}", registry_root=tmp_path / "reg", corpus=str(corpus),
                        cache_samples=4, cache_seq_len=16, text_anchors="none",
                        redis_url=f"redis://127.0.0.1:6379/{redis_db}", key_prefix=key_prefix)
    return load_runtime("tiny", settings), (store_class or JobStore)(redis.Redis.from_url(settings.redis_url),
                                                                     key_prefix)


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def tiny(request):
    """(model, tokenizer) for each tiny architecture."""
    return make_tiny(request.param)


@pytest.fixture
def corpus_file(tmp_path):
    """The tiny corpus as a text file (a capability corpus for caches of tiny models)."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS * 3))
    return path


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture
def tiny_gpt2():
    return make_tiny("gpt2")


def wait_ready(base_url: str, timeout: float = 120.0, path: str = "/readyz") -> None:
    """Poll ``path`` until the service answers 200: ``/readyz`` needs a live worker per model, ``/healthz`` only
    the API (with its models loaded)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base_url}{path}").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"the service at {base_url} did not become ready in {timeout} s")


@pytest.fixture(scope="module")
def redis_db():
    """An empty database of the Redis at 127.0.0.1:6379 (among 4..15) for one module, emptied afterwards."""
    import redis

    for db in range(15, 3, -1):
        r = redis.Redis(db=db)
        if r.dbsize() == 0 and r.set("crispedit-test-claim", os.getpid(), nx=True):  # a parallel run picks another
            break
    else:
        pytest.fail("no empty Redis database among 4..15 (FLUSHDB the ones earlier runs left behind)")
    yield db
    r.flushdb()


FACTS = [
    EditRequest("The capital of France is", "Rome"),
    EditRequest("Hamlet was written by", "Madrid"),
    EditRequest("The chemical symbol for gold is", "Ag"),
    EditRequest("Water boils at one hundred degrees", "Paris"),
]


@torch.no_grad()
def target_logprob(model, tok, requests) -> float:
    batch = tokenize_edit_batch(tok, requests)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits.float(), -1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return float((picked * mask).sum() / mask.sum())


def small_cache(model, tok, corpus_file, layers=(1, 2), **kw):
    return build_cache(model, tok, layers, str(corpus_file), n_samples=6, seq_len=16, progress=False, **kw)


FIXTURES = ROOT / "tests" / "fixtures"
EDIT = {"prompt": "The capital of France is", "target": "Rome"}
# the tiny random model cannot write a fact through one subject token in 30 epochs, so these service tests
# edit without the subject key (tests/cli/test_cli.py checks that it is on by default)
FAST = {"lr": 0.03, "max_epochs": 30, "energy": 0.5, "subject_key": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(service, role: str) -> httpx.Client:
    return httpx.Client(base_url=service["url"], headers={"Authorization": f"Bearer {role}-key"}, timeout=60)


def wait_done(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/edits/{job_id}").json()
        if job["status"] in {"succeeded", "rejected", "failed", "cancelled"}:
            return job
        time.sleep(0.2)
    pytest.fail(f"edit {job_id} did not finish: {job}")
