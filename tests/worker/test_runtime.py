"""The worker's start-up: a curvature cache saved for other layers (an older default) is rebuilt."""

from conftest import CORPUS, save_tiny_checkpoint

from core.settings import Settings
from crispedit.arch import default_layers
from crispedit.cache import CurvatureCache, build_cache
from crispedit.models import load_model
from worker.runtime import curvature_path, load_runtime


def test_a_cache_of_other_layers_is_rebuilt_for_the_default_layers(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3))
    settings = Settings(models=f"tiny={checkpoint}", registry_root=tmp_path / "reg", corpus=str(corpus),
                        cache_samples=4, cache_seq_len=16, text_anchors="none")
    model, tok = load_model(str(checkpoint))
    stale = build_cache(model, tok, (0,), str(corpus), n_samples=4, seq_len=16, progress=False)
    stale.save(curvature_path(settings, "tiny"))
    assert stale.layers != default_layers(model)

    runtime = load_runtime("tiny", settings)
    assert runtime.capability.layers == default_layers(model)
    assert CurvatureCache.load(curvature_path(settings, "tiny"), model=model).layers == default_layers(model)
